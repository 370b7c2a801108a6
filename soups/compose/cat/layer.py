"""The CAT linear layer: a frozen base `nn.Linear` plus k frozen LoRAs mixed by learned weights.

For wrapped module m with LoRAs i = 1..k (factors A_i: r_i x in, B_i: out x r_i, scaling s_i)
and learned weights a_i (LoRA Soups, https://arxiv.org/abs/2410.13025):

    y = W0 x + sum_i a_i s_i B_i A_i x = W0 x + B_cat diag(c) A_cat x

with A_cat = [A_1; ...; A_k] (R x in), B_cat = [B_1, ..., B_k] (out x R), R = sum r_i, and c
the rank-length vector holding a_i s_i on LoRA i's segment. So the forward is one matmul with
A_cat, a per-rank scale, one matmul with B_cat, instead of k separate LoRA passes; the
backward needs no weight gradients for A or B, only the R-vector gradient of c, reduced to k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soups.adapters import LoraModule


class CatWeights(nn.Module):
    """The only trainable tensor of CAT: logits (n_groups x k), float32.

    A module in group g that carries the LoRAs `present` mixes them with
    softmax(logits[g, present]) (normalisation `softmax`) or logits[g, present] (`none`).
    """

    def __init__(self, logits: torch.Tensor, normalisation: str):
        super().__init__()
        if normalisation not in ("softmax", "none"):
            raise ValueError(f"normalisation must be 'softmax' or 'none', got {normalisation!r}")
        self.logits = nn.Parameter(logits.detach().to(torch.float32).clone())
        self.normalisation = normalisation

    def mixture(self, group: int, present: torch.Tensor) -> torch.Tensor:
        """Weights a of the LoRAs `present` (long, kp) in a module of `group`; shape (kp,)."""
        raw = self.logits[group].index_select(0, present)
        return torch.softmax(raw, dim=0) if self.normalisation == "softmax" else raw


class CatLinear(nn.Module):
    """`base(x) + B_cat diag(a s) A_cat x` over the LoRAs present in this module.

    The factors are non-persistent buffers (frozen, moved with the module, never in a
    state dict); the weights live in the shared `CatWeights`, held outside module
    registration so that `CatModel` owns them exactly once.
    """

    def __init__(self, base: nn.Linear, factors: Sequence[LoraModule | None], group: int,
                 weights: CatWeights, name: str = "?"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"CAT wraps nn.Linear modules only; {name} is {type(base).__name__}")
        present = [i for i, f in enumerate(factors) if f is not None]
        if not present:
            raise ValueError(f"module {name}: no LoRA carries it")
        modules = [factors[i] for i in present]
        for i, m in zip(present, modules, strict=True):
            if m.A.shape[1] != base.in_features or m.B.shape[0] != base.out_features:
                raise ValueError(
                    f"module {name}, LoRA {i}: factors A{tuple(m.A.shape)} B{tuple(m.B.shape)} "
                    f"do not fit the base layer ({base.out_features} x {base.in_features})"
                )
        weight = base.weight
        self.base = base.requires_grad_(False)
        self.name = name
        self.group = group
        self.register_buffer("lora_A", torch.cat([m.A for m in modules]).to(
            weight.device, weight.dtype), persistent=False)
        self.register_buffer("lora_B", torch.cat([m.B for m in modules], dim=1).to(
            weight.device, weight.dtype), persistent=False)
        self.register_buffer("present", torch.tensor(present, device=weight.device),
                             persistent=False)
        self.register_buffer("scaling", torch.tensor([m.scaling for m in modules],
                                                     dtype=torch.float32, device=weight.device),
                             persistent=False)
        ranks = torch.tensor([m.rank for m in modules], device=weight.device)
        self.register_buffer("segment", torch.repeat_interleave(
            torch.arange(len(modules), device=weight.device), ranks), persistent=False)
        self._weights = (weights,)

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `proj.weight.dtype`
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def mixture(self) -> torch.Tensor:
        """Learned weights a of the present LoRAs, shape (kp,), float32."""
        return self._weights[0].mixture(self.group, self.present)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # c = a_i s_i repeated over LoRA i's rank rows: one (R,) scale between the two matmuls.
        scale = (self.mixture() * self.scaling).index_select(0, self.segment)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * scale.to(self.lora_A.dtype)
        return out + F.linear(h, self.lora_B).to(out.dtype)


def delta_norm(module: LoraModule) -> float:
    """||s B A||_F without forming B A (out x in): ||B A||_F^2 = sum((B^T B) * (A A^T)),
    two r x r products."""
    a, b = module.A.double(), module.B.double()
    squared = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(module.scaling) * max(squared, 0.0) ** 0.5
