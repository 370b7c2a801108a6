"""`MoeModel`: a frozen causal LM whose LoRA-targeted linear layers are `MoeLinear` modules
(frozen base + frozen LoRA experts + a router each); the routers are its only trainable
parameters.

Every module that at least one expert carries is wrapped; there the router has one logit
per expert present (`soups.compose.moe.layer`). `install` and `remove` put the layers on a model and
take them off again, leaving the original layer objects, untouched, where they were (the
resident evaluator relies on it, `soups.evaluation.resident.ResidentModel.mixture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from soups.adapters import LoraAdapter, LoraModule, check_fits
from soups.compose.moe.layer import MoeLinear, new_router
from soups.compose.moe.settings import MoeError, MoeSettings

Factors = dict[str, list[LoraModule | None]]  # module -> each expert's factors (None: not)


def expert_factors(adapters: Sequence[LoraAdapter]) -> Factors:
    """Each module any adapter carries (sorted) -> every adapter's factors there."""
    names = sorted(set().union(*(a.module_names for a in adapters)))
    return {n: [a.module(n) if n in a.module_names else None for a in adapters]
            for n in names}


def initial_routers(model: nn.Module, factors: Factors, settings: MoeSettings
                    ) -> dict[str, nn.Linear]:
    """A fresh float32 router per module on the model's device: `zeros`, or weights drawn
    N(0, init_std^2) from one generator seeded with `settings.seed`, modules in sorted
    order (the bias, if any, starts at 0)."""
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    routers = {}
    for name in sorted(factors):
        present = sum(f is not None for f in factors[name])
        router = new_router(model.get_submodule(name).in_features, present, settings.bias,
                            device)
        if settings.router_init == "normal":
            drawn = torch.randn(router.weight.shape, generator=generator) * settings.init_std
            with torch.no_grad():
                router.weight.copy_(drawn)
        routers[name] = router
    return routers


def install(model: nn.Module, factors: Factors, routers: dict[str, nn.Linear],
            top_k: int) -> dict[str, MoeLinear]:
    """Replace each module of `factors` in `model` by its `MoeLinear`; on an error, every
    layer installed so far is taken off again."""
    layers: dict[str, MoeLinear] = {}
    try:
        for name, per_expert in factors.items():
            if name not in routers:
                raise MoeError(f"module {name}: no router")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = MoeLinear(getattr(parent, child), per_expert, routers[name], top_k, name)
            setattr(parent, child, layer)
            layers[name] = layer
    except BaseException:
        remove(model, layers)
        raise
    return layers


def remove(model: nn.Module, layers: dict[str, MoeLinear]) -> None:
    """Put each layer's original base module back."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)


class MoeModel(nn.Module):
    """`model` (frozen, wrapped in place) with the k `adapters` as experts of every module
    they carry; `routers` (module -> float32 router over the experts present there) default
    to fresh ones (`initial_routers`)."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter],
                 settings: MoeSettings = MoeSettings(),
                 routers: dict[str, nn.Linear] | None = None):
        super().__init__()
        if not adapters:
            raise MoeError("a mixture of LoRA experts needs at least one adapter")
        settings.check_experts(len(adapters))
        self.model = model
        self.settings = settings
        self.adapters = list(adapters)
        model.requires_grad_(False)
        for adapter in adapters:
            check_fits(adapter.path, model)  # each module is a layer of the model's shape
        factors = expert_factors(adapters)
        if routers is None:
            routers = initial_routers(model, factors, settings)
        self.layers = install(model, factors, routers, settings.top_k)

    @classmethod
    def attach(cls, model: nn.Module, adapter_dirs: Sequence[str | Path],
               settings: MoeSettings = MoeSettings()) -> MoeModel:
        """Open the adapter folders and wrap `model` in place (its parameters are frozen)."""
        return cls(model, [LoraAdapter.open(d) for d in adapter_dirs], settings)

    def router_parameters(self) -> list[nn.Parameter]:
        """Every router's weight (and bias), modules in sorted order."""
        return [p for name in sorted(self.layers) for p in self.layers[name].router.parameters()]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def router_state(self) -> dict[str, torch.Tensor]:
        """`<module>.weight` (kp x in) and `<module>.bias` (kp) of every router, float32, CPU."""
        return {f"{name}.{key}": value.detach().cpu().contiguous()
                for name, layer in sorted(self.layers.items())
                for key, value in layer.router.state_dict().items()}

    def forward(self, **batch):
        """The wrapped model's forward; tensors in `batch` are moved to the model's device."""
        device = next(self.model.parameters()).device
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.model(**moved)
