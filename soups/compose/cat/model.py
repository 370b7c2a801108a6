"""`CatModel`: a frozen causal LM with k frozen skill LoRAs attached through `CatLinear`
modules, whose only trainable tensor is the CAT weight logits (n_groups x k).

Every module named by at least one adapter is wrapped; a module that only some adapters
carry mixes those (the softmax runs over the LoRAs present in it). Groups follow the
granularity: `module` = one group per wrapped module, `layer` = one per transformer layer
(the module path up to its first numeric component, e.g. `model.layers.3`), `global` = one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from soups.adapters import LoraAdapter, LoraModule, check_fits
from soups.compose.cat.layer import CatLinear, CatWeights, delta_norm
from soups.compose.cat.settings import CatError, CatSettings

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def group_key(module: str, granularity: str) -> str:
    """Name of the weight group a module belongs to under `granularity`."""
    if granularity == "module":
        return module
    if granularity == "global":
        return "global"
    if granularity == "layer":
        match = _LAYER.match(module)
        if match is None:
            raise CatError(f"granularity 'layer': module {module} has no layer index in its "
                           "path; use granularity 'module' or 'global'")
        return match.group(1)
    raise CatError(f"unknown granularity {granularity!r}")


def initial_logits(settings: CatSettings, norms: torch.Tensor,
                   adapter_names: Sequence[str], group_names: Sequence[str]) -> torch.Tensor:
    """Starting logits (n_groups x k) for `settings.init`.

    `norms` (n_groups x k, float64) holds ||dW|| of each LoRA over each group's modules,
    0 where the LoRA has no module in the group; only the `norm` init reads the values.
    """
    n_groups, k = norms.shape
    softmax = settings.normalisation == "softmax"
    if settings.init == "randn":
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.randn(n_groups, k, generator=generator, dtype=torch.float64)
    if settings.init == "uniform":
        return torch.zeros(n_groups, k) if softmax else torch.full((n_groups, k), 1.0 / k)
    if settings.init == "ones":
        return torch.ones(n_groups, k)
    if settings.init == "values":
        values = torch.tensor(settings.init_values, dtype=torch.float64)
        if values.numel() != k:
            raise CatError(f"CAT init_values has {values.numel()} numbers for {k} LoRAs "
                           f"({list(adapter_names)})")
        return (values.log() if softmax else values).expand(n_groups, k).clone()
    # `norm`: a_i proportional to 1 / ||dW_i||, so every LoRA starts with the same update size.
    carried = norms > 0
    inverse = torch.where(carried, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    mixture = inverse / inverse.sum(dim=1, keepdim=True)
    if not softmax:
        return mixture
    # log a reproduces a under the softmax; LoRAs absent from a group get 0 (never used there).
    return torch.where(carried, mixture.clamp_min(1e-300).log(), torch.zeros_like(mixture))


class CatModel(nn.Module):
    """A causal LM whose LoRA-carrying linear modules compute
    W0 x + sum_i a_i^m s_i B_i^m A_i^m x, with a from the trainable `CatWeights`."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter],
                 settings: CatSettings = CatSettings()):
        super().__init__()
        if len(adapters) < 1:
            raise CatError("CAT needs at least one adapter")
        self.model = model
        self.settings = settings
        self.adapters = list(adapters)
        model.requires_grad_(False)
        for adapter in adapters:
            check_fits(adapter.path, model)  # each module is a layer of the model's shape
        names = sorted(set().union(*(a.module_names for a in adapters)))
        available = dict(model.named_modules())
        self.group_names = sorted({group_key(n, settings.granularity) for n in names})
        group_index = {g: i for i, g in enumerate(self.group_names)}
        factors = {n: [a.module(n) if n in a.module_names else None for a in adapters]
                   for n in names}
        norms = torch.zeros(len(self.group_names), len(adapters), dtype=torch.float64)
        if settings.init == "norm":
            norms = self._group_norms(factors, group_index, settings.granularity)
        logits = initial_logits(settings, norms, self.adapter_names, self.group_names)
        weight = next(model.parameters())
        self.weights = CatWeights(logits, settings.normalisation).to(weight.device)
        self.layers: dict[str, CatLinear] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = available[parent_name] if parent_name else model
            layer = CatLinear(available[name], factors[name],
                              group_index[group_key(name, settings.granularity)],
                              self.weights, name)
            setattr(parent, child, layer)
            self.layers[name] = layer

    @classmethod
    def attach(cls, model: nn.Module, adapter_dirs: Sequence[str | Path],
               settings: CatSettings = CatSettings()) -> CatModel:
        """Open the adapter folders and wrap `model` in place (its parameters are frozen)."""
        return cls(model, [LoraAdapter.open(d) for d in adapter_dirs], settings)

    @property
    def adapter_names(self) -> list[str]:
        return [str(a.path) for a in self.adapters]

    def _group_norms(self, factors: dict[str, list[LoraModule | None]],
                     group_index: dict[str, int], granularity: str) -> torch.Tensor:
        squared = torch.zeros(len(group_index), len(self.adapters), dtype=torch.float64)
        for name, modules in factors.items():
            g = group_index[group_key(name, granularity)]
            for i, m in enumerate(modules):
                if m is None:
                    continue
                n = delta_norm(m)
                if n == 0 or not math.isfinite(n):
                    raise CatError(f"CAT init 'norm': adapter {self.adapters[i].path} has "
                                   f"dW norm {n} in module {name}; norm init is undefined")
                squared[g, i] += n * n
        return squared.sqrt()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def mixtures(self) -> dict[str, list[float | None]]:
        """a_i^m of every wrapped module, None where LoRA i does not carry module m."""
        out = {}
        for name, layer in self.layers.items():
            values: list[float | None] = [None] * len(self.adapters)
            for i, a in zip(layer.present.tolist(), layer.mixture().tolist(), strict=True):
                values[i] = a
            out[name] = values
        return out

    def forward(self, **batch):
        """The wrapped model's forward; tensors in `batch` are moved to the model's device."""
        device = self.weights.logits.device
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.model(**moved)
