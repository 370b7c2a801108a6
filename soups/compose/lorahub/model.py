"""The base model, loaded once, with one composed LoRA per module that each LoraHub
evaluation overwrites in place (LoraHub itself reloads a PEFT state dict per evaluation).

Every module that an adapter carries becomes a `CatLinear` (soups/compose/cat/layer.py) over one
LoRA, the composition, with the fixed weight 1: y = W0 x + B (A x). `install(weights)`
composes the adapters' factors (soups/compose/lorahub/compose.py, the same function that writes the
adapter) and copies A (R x in) and B (out x R) into the layer's buffers; R is fixed per
module (the common rank, or the sum of the ranks), so nothing is reallocated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from soups.compose.cat.layer import CatLinear, CatWeights
from soups.compose.lorahub.compose import Factors, compose_all
from soups.compose.lorahub.settings import LorahubError


class ComposedLoras:
    """`model` (wrapped in place, frozen) with the composition of `factors` installed."""

    def __init__(self, model: nn.Module, factors: Factors, composition: str,
                 weights: Sequence[float]):
        self.model = model.requires_grad_(False)
        self.factors = factors
        self.composition = composition
        device = next(model.parameters()).device
        # The one "LoRA" of every layer carries weight 1: the weights live in the factors.
        self._unit = CatWeights(torch.ones(1, 1), "none").to(device).requires_grad_(False)
        available = dict(model.named_modules())
        self.layers: dict[str, CatLinear] = {}
        for name, module in compose_all(factors, weights, composition).items():
            base = available.get(name)
            if not isinstance(base, nn.Linear):
                kind = "not in the base model" if base is None else type(base).__name__
                raise LorahubError(f"LoraHub composes LoRAs on nn.Linear layers only; module "
                                   f"{name} is {kind}")
            parent_name, _, child = name.rpartition(".")
            layer = CatLinear(base, [module], 0, self._unit, name)
            setattr(available[parent_name] if parent_name else model, child, layer)
            self.layers[name] = layer

    @torch.no_grad()
    def install(self, weights: Sequence[float]) -> None:
        """Overwrite every layer's factors with the composition under `weights` (k,)."""
        for name, module in compose_all(self.factors, weights, self.composition).items():
            layer = self.layers[name]
            if module.scaling != 1.0:  # the layer's rank scale was fixed at 1 on creation
                raise AssertionError(f"module {name}: composed scaling {module.scaling}")
            layer.lora_A.copy_(module.A)
            layer.lora_B.copy_(module.B)
