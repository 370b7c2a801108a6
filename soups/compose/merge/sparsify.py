"""Sparsify, then reach consensus: the one generalized merge that linear, TIES, DARE and
magnitude pruning are configurations of.

    merged = consensus_k( w_k * sparsify(t_k) )

- sparsify: keep the `density` largest magnitudes (TIES "trim", Yadav et al. 2023,
  https://arxiv.org/abs/2306.01708), or keep a random `density` fraction and rescale it by
  1/density (DARE "drop and rescale", Yu et al. 2024, https://arxiv.org/abs/2311.03099),
  or keep everything;
- consensus: the weighted sum (task arithmetic, Ilharco et al. 2023,
  https://arxiv.org/abs/2212.04089), or TIES "elect sign" + "disjoint merge".

Steps, order and arithmetic follow PEFT 0.21 (`peft/utils/merge_utils.py`), so results
match `add_weighted_adapter`: the sign is elected on the unweighted sparsified tensors, the
weights apply before the disjoint merge, which divides by the number of agreeing entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

# (tensor, index of its adapter) -> sparsified tensor of the same shape
Sparsifier = Callable[["torch.Tensor", int], "torch.Tensor"]  # strings: torch loads lazily


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest (any shape):
    PEFT's top-k set. The threshold comes from a linear-time selection (numpy's introselect
    on CPU, several times faster than a top-k of half a 45M-entry delta); entries tied with
    the threshold are kept in index order up to the count."""
    if density >= 1:
        return tensor
    keep_count = int(density * tensor.numel())
    if keep_count == 0:
        return torch.zeros_like(tensor)
    magnitude = tensor.detach().abs().flatten()
    position = magnitude.numel() - keep_count  # the keep_count-th largest, ascending order
    if magnitude.device.type == "cpu":
        values = magnitude.float().numpy()
        threshold = torch.tensor(float(np.partition(values, position)[position]))
    else:
        threshold = magnitude.kthvalue(position + 1).values
    keep = magnitude > threshold.to(magnitude.dtype)
    missing = keep_count - int(keep.sum())
    if missing > 0:  # ties at the threshold (rare for trained weights, common for zeros)
        keep[(magnitude == threshold).nonzero().flatten()[:missing]] = True
    return tensor * keep.view_as(tensor)


def dare_keep_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep mask (float 0/1) drawn from `generator`."""
    return (torch.rand(shape, generator=generator) < density).float()


def dare_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability 1 - density, rescale the kept ones by 1/density
    (so the expectation is the tensor itself)."""
    if density >= 1:
        return tensor
    return tensor * dare_keep_mask(tensor.shape, density, generator) / density


def elect_sign(tensors: torch.Tensor, method: Literal["total", "frequency"]) -> torch.Tensor:
    """TIES "elect sign": tensors (k, *shape) -> bool (k, *shape), True where an entry's sign
    agrees with the majority sign (sign of the sum, or of the count of signs; 0 counts +)."""
    signs = tensors.sign()
    votes = tensors.sum(dim=0) if method == "total" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    return signs == majority


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge": (k, *shape) weighted tensors and agreement mask -> (*shape),
    the sum of agreeing entries divided by their count (at least 1)."""
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def sparsify_and_merge(
    tensors: torch.Tensor,
    weights: torch.Tensor,
    sparsify: Sparsifier | None = None,
    consensus: Literal["total", "frequency"] | None = None,
) -> torch.Tensor:
    """The generalized merge: tensors (k, *shape), weights (k,) -> (*shape).

    `sparsify` None keeps everything; `consensus` None is the weighted sum, else TIES sign
    election by that method followed by the disjoint mean."""
    if sparsify is not None:
        tensors = torch.stack([sparsify(t, i) for i, t in enumerate(tensors)])
    weighted = tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))
    if consensus is None:
        return weighted.sum(dim=0)
    return disjoint_mean(weighted, elect_sign(tensors, consensus))
