"""Merge PEFT LoRA adapter folders into one, streaming module by module.

The base model is never loaded: a module's merge needs only the adapters' factors for that
module. Checks run before anything is written, and name the adapter and module at fault.
The output folder is written atomically by `save_adapter`; its provenance file records the
method, its parameters and the input adapters.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from soups.adapters import LoraAdapter, LoraModule, layer_shapes, save_adapter
from soups.compose.merge.lowrank import truncate_dense
from soups.compose.merge.methods import REGISTRY
from soups.compose.merge.registry import MergeError, MergeMethod, Space
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)


def list_methods() -> list[MergeMethod]:
    return [REGISTRY.get(name) for name in REGISTRY.names()]


def method_parameters(name: str) -> set[str] | None:
    """The parameter names a merge method takes, or None if no method has that name."""
    return set(REGISTRY.get(name).parameters) if name in REGISTRY else None


def merge_adapters(
    adapter_dirs: Sequence[str | Path],
    method: str,
    out_dir: str | Path,
    progress: Callable[[int, int, str], None] | None = None,
    **params: Any,
) -> Path:
    """Merge the adapters with `method` and write a PEFT adapter folder to `out_dir`.

    `params` are the method's parameters (see `soups merge --list`); `progress(done, total,
    module)` is called after each module."""
    spec = REGISTRY.get(method)
    adapters = [LoraAdapter.open(d) for d in adapter_dirs]
    if not adapters:
        raise MergeError("no adapters to merge")
    bound = spec.bind(params, len(adapters))
    names = _check_compatible(spec, adapters)
    merged: dict[str, LoraModule] = {}
    for done, name in enumerate(names, 1):
        inputs = [a.module(name) if name in a.module_names else None for a in adapters]
        merged[name] = _merge_module(spec, name, inputs, dict(bound))
        if not (torch.isfinite(merged[name].A).all() and torch.isfinite(merged[name].B).all()):
            raise MergeError(f"method {method!r}, module {name}: the merge produced NaN or Inf")
        if progress is not None:
            progress(done, len(names), name)
    record = {
        "method": method,
        "space": spec.space.value,
        "parameters": bound,
        "adapters": [str(a.path) for a in adapters],
    }
    return save_adapter(out_dir, merged, adapters[0].config, provenance={"merge": record})


def _check_compatible(spec: MergeMethod, adapters: list[LoraAdapter]) -> list[str]:
    """Same base model and layer shapes everywhere; factor space also needs the same modules
    and ranks. Returns the modules to merge (the union, sorted)."""
    first = adapters[0]
    for other in adapters[1:]:
        if other.base_model != first.base_model:
            raise MergeError(f"adapter {other.path} is for base model {other.base_model!r}, "
                             f"adapter {first.path} for {first.base_model!r}")
        if bool(other.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
            raise MergeError(f"adapter {other.path} has fan_in_fan_out="
                             f"{bool(other.config.get('fan_in_fan_out'))}, adapter {first.path} "
                             f"{bool(first.config.get('fan_in_fan_out'))}: not the same layers")
    names = sorted(set().union(*(a.module_names for a in adapters)))
    shapes = [layer_shapes(a.path) for a in adapters]
    for name in names:
        seen = {a.path: s[name] for a, s in zip(adapters, shapes, strict=True) if name in s}
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{path}: {out} x {in_}" for path, (out, in_) in seen.items())
            raise MergeError(f"module {name} is a layer of different shapes in the adapters "
                             f"({detail}): adapters of different base models")
    if not spec.mixes_factors:
        return names
    for adapter in adapters:
        missing = sorted(set(names) - set(adapter.module_names))
        if missing:
            raise MergeError(f"method {spec.name!r} mixes A and B entry by entry and needs the "
                             f"same modules in every adapter: adapter {adapter.path} lacks "
                             f"module {missing[0]} (use cat, task_arithmetic or svd)")
    for name in names:
        ranks = {a.path: a.rank_of(name) for a in adapters}
        if len(set(ranks.values())) > 1:
            detail = ", ".join(f"{path}: r={r}" for path, r in ranks.items())
            raise MergeError(f"method {spec.name!r} needs equal ranks, module {name} has "
                             f"{detail} (use cat, task_arithmetic or svd)")
    return names


def _module_generator(seed: int, name: str) -> torch.Generator:
    """A generator per (seed, module): the masks of one module do not depend on which other
    modules were merged before it, so a merge is reproducible module by module. (The CPU
    generator keeps only 32 bits of its seed, so seed and name are hashed together.)"""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def _merge_module(spec: MergeMethod, name: str, inputs: list[LoraModule | None],
                  bound: dict[str, Any]) -> LoraModule:
    weights = bound.pop("weights")
    if spec.random:
        bound["generator"] = _module_generator(bound.pop("seed"), name)
    present = [(m, w) for m, w in zip(inputs, weights, strict=True) if m is not None]
    if spec.space is Space.LORA:
        return spec.fn([m for m, _ in present], [w for _, w in present], **bound)
    if spec.space is Space.FACTOR:
        # PEFT's split of w_i s_i over the two factors: sqrt on each, the sign on A only.
        roots = torch.tensor([abs(w * m.scaling) ** 0.5 for m, w in present])
        signs = torch.tensor([1.0 if w * m.scaling >= 0 else -1.0 for m, w in present])
        a = spec.fn(torch.stack([m.A for m, _ in present]), roots * signs, **bound)
        b = spec.fn(torch.stack([m.B for m, _ in present]), roots, **bound)
        return LoraModule(A=a, B=b, scaling=1.0)
    rank = bound.pop("rank") or max(m.rank for m, _ in present)
    deltas = torch.stack([m.delta() for m, _ in present])
    dense = spec.fn(deltas, torch.tensor([w for _, w in present]), **bound)
    return truncate_dense(dense, rank, block=sum(m.rank for m, _ in present))
