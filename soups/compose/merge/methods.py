"""The merge methods: each a small function registered by name with the space it works in.

Factor-space methods have PEFT 0.21 `add_weighted_adapter` semantics (the paper's baselines):
they see the stacked A factors, then the stacked B factors, with weights +-sqrt(|w_i s_i|).
Delta-space methods see dW_i = s_i B_i A_i with weights w_i and the space truncates their
result to `rank`. LoRA-space methods receive the modules and stay low-rank throughout.

TIES, DARE and magnitude pruning are configurations of `sparsify_and_merge` (sparsify.py),
so a method here only says which sparsifier and which consensus it uses. KnOTS (knots.py) and
LoRA-LEGO (lora_lego.py) are LoRA-space methods with modules of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field

from soups.adapters import LoraModule
from soups.compose.merge import knots as knots_module
from soups.compose.merge import lora_lego as lora_lego_module
from soups.compose.merge.lowrank import concatenate, truncate_lora
from soups.compose.merge.registry import (
    Density,
    ExactRank,
    MajoritySign,
    MergeError,
    MethodRegistry,
    OptionalDensity,
    Rank,
    Space,
)
from soups.compose.merge.sparsify import dare_drop, magnitude_trim, sparsify_and_merge
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

REGISTRY = MethodRegistry()
register = REGISTRY.register

TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
TIES = "https://arxiv.org/abs/2306.01708"
DARE = "https://arxiv.org/abs/2311.03099"
LORA_SOUPS = "https://arxiv.org/abs/2410.13025"
SVD_MERGE = "https://github.com/kohya-ss/sd-scripts/blob/main/networks/svd_merge_lora.py"
KNOTS = "https://arxiv.org/abs/2410.19735"
LORA_LEGO = "https://arxiv.org/abs/2409.16167"

KnotsMerge = Annotated[Literal["task_arithmetic", "ties", "dare_ties"], Field(
    description="merge of the aligned task rows: task_arithmetic, ties or dare_ties")]


@register("linear", Space.FACTOR, TASK_ARITHMETIC)
def linear(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the A factors and of the B factors (PEFT `linear`; equal ranks)."""
    return sparsify_and_merge(tensors, weights)


@register("ties", Space.FACTOR, TIES)
@register("ties_svd", Space.DELTA, TIES)
def ties(tensors: torch.Tensor, weights: torch.Tensor, density: Density,
         majority_sign_method: MajoritySign = "total") -> torch.Tensor:
    """TIES: trim to the largest `density` magnitudes, elect a sign, disjoint mean."""
    return sparsify_and_merge(tensors, weights, lambda t, _: magnitude_trim(t, density),
                              consensus=majority_sign_method)


@register("magnitude_prune", Space.FACTOR, TIES)
@register("magnitude_prune_svd", Space.DELTA, TIES)
def magnitude_prune(tensors: torch.Tensor, weights: torch.Tensor,
                    density: Density) -> torch.Tensor:
    """Trim each input to its largest `density` magnitudes, then the weighted sum."""
    return sparsify_and_merge(tensors, weights, lambda t, _: magnitude_trim(t, density))


@register("dare_linear", Space.FACTOR, DARE)
@register("dare_linear_svd", Space.DELTA, DARE)
def dare_linear(tensors: torch.Tensor, weights: torch.Tensor, density: Density,
                generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries at random (keep `density`, rescale by 1/density), weighted sum."""
    return sparsify_and_merge(tensors, weights, lambda t, _: dare_drop(t, density, generator))


@register("dare_ties", Space.FACTOR, DARE)
@register("dare_ties_svd", Space.DELTA, DARE)
def dare_ties(tensors: torch.Tensor, weights: torch.Tensor, density: Density,
              generator: torch.Generator,
              majority_sign_method: MajoritySign = "total") -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean."""
    return sparsify_and_merge(tensors, weights, lambda t, _: dare_drop(t, density, generator),
                              consensus=majority_sign_method)


@register("cat", Space.LORA, LORA_SOUPS, default_weights="ones")
def cat(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """Static concatenation: sum_i w_i s_i B_i A_i exactly, rank sum(r_i) (PEFT `cat`)."""
    return concatenate(modules, weights)


@register("task_arithmetic", Space.LORA, TASK_ARITHMETIC, default_weights="ones")
def task_arithmetic(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """Task arithmetic on dW: sum_i w_i dW_i exactly, stored as a concatenated LoRA."""
    return concatenate(modules, weights)


@register("svd", Space.LORA, SVD_MERGE)
def svd(modules: Sequence[LoraModule], weights: Sequence[float], rank: Rank = None) -> LoraModule:
    """Truncated SVD of sum_i w_i dW_i to `rank` (default: the largest input rank), exact
    from the factors (QR of the concatenated factors and an SVD of the small core)."""
    return truncate_lora(concatenate(modules, weights), rank or max(m.rank for m in modules))


@register("knots", Space.LORA, KNOTS, default_weights="ones")
def knots(modules: Sequence[LoraModule], weights: Sequence[float], generator: torch.Generator,
          merge: KnotsMerge = "ties", density: OptionalDensity = None,
          majority_sign_method: MajoritySign = "total", rank: ExactRank = None) -> LoraModule:
    """KnOTS: one SVD of the concatenated updates [dW_1 .. dW_k] = U S [V_1 .. V_k] puts them
    in a shared basis; the rows S V_i merge by `merge` (ties and dare_ties need `density`,
    task_arithmetic ignores it) and U S V_merged is exact at rank <= sum(r_i)."""
    if merge != "task_arithmetic" and density is None:
        raise MergeError(f"method 'knots' with merge={merge!r} needs parameter 'density' "
                         "(fraction of entries kept, in (0, 1])")
    # Weights 1 by default: TIES' disjoint mean already averages, task arithmetic sums.
    row_merges = {
        "task_arithmetic": lambda rows, w: sparsify_and_merge(rows, w),
        "ties": lambda rows, w: ties(rows, w, density, majority_sign_method),
        "dare_ties": lambda rows, w: dare_ties(rows, w, density, generator,
                                               majority_sign_method),
    }
    return knots_module.knots(modules, weights, row_merges[merge], rank)


@register("lora_lego", Space.LORA, LORA_LEGO, default_weights="ones")
def lora_lego(modules: Sequence[LoraModule], weights: Sequence[float],
              generator: torch.Generator, rank: Rank = None) -> LoraModule:
    """LoRA-LEGO: k-means of every adapter's rank-1 units (b_j, a_j) into `rank` clusters,
    whose centroids (norm-rescaled, output scaled by sqrt(r / rank)) are the merged LoRA."""
    return lora_lego_module.lora_lego(modules, weights, rank or max(m.rank for m in modules),
                                      generator)
