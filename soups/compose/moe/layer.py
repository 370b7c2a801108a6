"""The mixture-of-LoRA-experts linear layer: a frozen base `nn.Linear`, the k frozen LoRA
experts that carry this module, and a learned router on the layer's input.

For a token whose input to this layer is x (mergoo's `LoRAMoeLayer`,
https://github.com/Leeroo-AI/mergoo, `compose_layers.py`):

    logits = W_r x (+ b)                      W_r: (kp x in), kp = experts present here
    g = softmax over the top_k logits, 0 for the others
    y = W0 x + sum_j g_j s_j B_j A_j x

One router per wrapped module, as mergoo: each of its LoRA MoE layers owns a
`gate = nn.Linear(hidden_size, num_experts, bias=False)` applied to that layer's input.
(mergoo sizes the gate by the hidden size; here it is the layer's `in_features`, the same
for q/k/v/up and the right size for down_proj, whose input is the intermediate width.)

The experts' deltas are computed as CAT computes its sum (`soups.compose.cat.layer`): one matmul
with A_cat = [A_1; ...; A_kp], a per-token, per-rank scale g_j s_j, one matmul with B_cat. Every
expert's A x is computed, also for experts a token does not use (their scale is 0): with the
few experts of skill composition this is cheaper than gathering tokens per expert. Factors
and router sit on the base weight's device; factors in PEFT's adapter dtype (float32 on a
float16 / bfloat16 base, `soups.adapters.factor_dtype`), the router in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soups.adapters import LoraModule, factor_dtype
from soups.compose.moe.settings import MoeError


def top_k_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gates (..., kp) from router logits (..., kp): a softmax over each token's top_k
    logits, 0 elsewhere (equal logits: torch.topk picks)."""
    if top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    top, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))


def new_router(in_features: int, experts: int, bias: bool, device) -> nn.Linear:
    """A float32 router (experts x in_features), zero-initialised (the caller draws)."""
    router = nn.Linear(in_features, experts, bias=bias, device=device, dtype=torch.float32)
    with torch.no_grad():
        router.weight.zero_()
        if router.bias is not None:
            router.bias.zero_()
    return router


class MoeLinear(nn.Module):
    """`base(x) + sum_j g_j(x) s_j B_j A_j x` over the experts `present` in this module.

    `factors[i]` is expert i's LoRA on this module, None where expert i does not carry it
    (it gets no logit: the gate runs over the present experts only). The factors are
    non-persistent buffers (frozen, never in a state dict); `router` (kp x in, float32) is
    the layer's only parameter. The base layer is left as it is (its weights and flags).
    """

    def __init__(self, base: nn.Linear, factors: Sequence[LoraModule | None],
                 router: nn.Linear, top_k: int, name: str = "?"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise MoeError(f"MoE wraps nn.Linear modules only; {name} is {type(base).__name__}")
        present = [i for i, f in enumerate(factors) if f is not None]
        if not present:
            raise MoeError(f"module {name}: no expert carries it")
        modules = [factors[i] for i in present]
        for i, m in zip(present, modules, strict=True):
            if m.A.shape[1] != base.in_features or m.B.shape[0] != base.out_features:
                raise MoeError(f"module {name}, expert {i}: factors A{tuple(m.A.shape)} "
                               f"B{tuple(m.B.shape)} do not fit the base layer "
                               f"({base.out_features} x {base.in_features})")
        if tuple(router.weight.shape) != (len(present), base.in_features):
            raise MoeError(f"module {name}: router of shape {tuple(router.weight.shape)}, "
                           f"expected ({len(present)}, {base.in_features})")
        weight = base.weight
        dtype = factor_dtype(weight.dtype)
        self.base = base
        self.name = name
        self.present = tuple(present)
        self.top_k = min(top_k, len(present))
        self.router = router.to(device=weight.device, dtype=torch.float32)
        self.register_buffer("lora_A", torch.cat([m.A for m in modules]).to(
            weight.device, dtype), persistent=False)
        self.register_buffer("lora_B", torch.cat([m.B for m in modules], dim=1).to(
            weight.device, dtype), persistent=False)
        self.register_buffer("scaling", torch.tensor([m.scaling for m in modules],
                                                     dtype=dtype, device=weight.device),
                             persistent=False)
        ranks = torch.tensor([m.rank for m in modules], device=weight.device)
        self.register_buffer("segment", torch.repeat_interleave(
            torch.arange(len(modules), device=weight.device), ranks), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `proj.weight.dtype`
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g (..., kp), float32, of inputs x (..., in)."""
        return top_k_gates(self.router(x.to(torch.float32)), self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        h = x.to(self.lora_A.dtype)
        # Per token: g_j s_j repeated over expert j's rank rows, between the two matmuls.
        scale = (self.gates(x).to(h.dtype) * self.scaling).index_select(-1, self.segment)
        delta = F.linear(F.linear(h, self.lora_A) * scale, self.lora_B)
        return (result + delta).to(result.dtype)  # PEFT's order: add, then cast back
