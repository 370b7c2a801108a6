"""The two ways a LoraHub search composes k LoRAs with one weight w_i each, per module.

Module m of LoRA i has A_i (r_i x in), B_i (out x r_i) and scaling s_i. Both compositions
return one LoRA with scaling 1, so the model that is scored is the adapter that is written.

- `lorahub`: LoraHub's own code (https://github.com/sail-sg/lorahub, `get_score`) sums the
  PEFT state dicts, A = sum w_i A_i and B = sum w_i B_i, so dW = s (sum w_i B_i)(sum w_i A_i)
  with cross terms B_i A_j and w_i^2 on each LoRA's own term. It needs one rank per module
  and every module in every adapter. LoraHub assumes one scaling s for all; here s_i is
  folded as sqrt(|s_i|) into both factors (its sign into A), which is LoraHub's product
  exactly when the s_i are equal.
- `exact`: sum_i w_i s_i B_i A_i, no cross terms, as one LoRA of rank sum r_i
  (`soups.compose.merge.lowrank.concatenate`, as the `task_arithmetic` merge); modules that only
  some adapters carry mix those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from soups.adapters import LoraAdapter, LoraModule
from soups.compose.lorahub.settings import LorahubError
from soups.compose.merge.lowrank import concatenate

Factors = dict[str, list[LoraModule | None]]  # module -> its factors in each adapter


def compose_lorahub(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """A = sum_i w_i sign(s_i) sqrt|s_i| A_i (r x in), B = sum_i w_i sqrt|s_i| B_i (out x r),
    scaling 1: LoraHub's weighted sum of the factors (equal ranks r)."""
    roots = [math.sqrt(abs(m.scaling)) for m in modules]
    a = sum(w * math.copysign(c, m.scaling) * m.A
            for m, w, c in zip(modules, weights, roots, strict=True))
    b = sum(w * c * m.B for m, w, c in zip(modules, weights, roots, strict=True))
    return LoraModule(A=a, B=b, scaling=1.0)


def compose_exact(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """sum_i w_i s_i B_i A_i exactly: A = [w_i s_i A_i] (sum r_i x in), B = [B_i], scaling 1."""
    return concatenate(modules, weights)


@dataclass(frozen=True)
class Composition:
    compose: Callable[[Sequence[LoraModule], Sequence[float]], LoraModule]
    mixes_factors: bool  # sums A and B entry by entry: the same modules and ranks needed


COMPOSITIONS: dict[str, Composition] = {
    "lorahub": Composition(compose_lorahub, mixes_factors=True),
    "exact": Composition(compose_exact, mixes_factors=False),
}


def compose_all(factors: Factors, weights: Sequence[float], composition: str
                ) -> dict[str, LoraModule]:
    """Every module composed from the adapters that carry it, with their weights."""
    compose = COMPOSITIONS[composition].compose
    out = {}
    for name, modules in factors.items():
        present = [(m, float(w)) for m, w in zip(modules, weights, strict=True) if m is not None]
        out[name] = compose([m for m, _ in present], [w for _, w in present])
    return out


def check_composable(adapters: Sequence[LoraAdapter], composition: str) -> list[str]:
    """The modules to compose (the union of the adapters', sorted). A composition that mixes
    factors needs every module in every adapter, with one rank: else a LorahubError naming
    the module, the adapter and the ranks."""
    names = sorted(set().union(*(a.module_names for a in adapters)))
    if not COMPOSITIONS[composition].mixes_factors:
        return names
    for adapter in adapters:
        missing = [n for n in names if n not in adapter.module_names]
        if missing:
            raise LorahubError(f"composition {composition!r} sums A and B entry by entry and "
                               f"needs the same modules in every adapter: adapter "
                               f"{adapter.path} lacks module {missing[0]} (use composition "
                               "'exact')")
    for name in names:
        ranks = {str(a.path): a.rank_of(name) for a in adapters}
        if len(set(ranks.values())) > 1:
            detail = ", ".join(f"{path}: r={r}" for path, r in ranks.items())
            raise LorahubError(f"composition {composition!r} needs equal ranks, module {name} "
                               f"has {detail} (use composition 'exact')")
    return names
