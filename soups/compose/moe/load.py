"""Loading a mixture of LoRA experts folder (`soups.compose.moe.folder`) onto a base model.

`load_moe` returns the base model itself (a transformers causal LM) with `MoeLinear` layers
installed, so `soups.evaluation.evaluate.generate` / `evaluate_rows` use it as any model;
`installed_moe` puts the layers on an already loaded model for a `with` block and takes them
off after, leaving the model as it was (the resident evaluator). Experts and routers go to
the base weight's device; the experts in PEFT's adapter dtype, the routers in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from soups.adapters import LoraAdapter, check_fits
from soups.compose.moe.folder import BASE_CONFIG_KEYS, EXPERTS_DIR, ROUTER_FILE, read_moe_config
from soups.compose.moe.layer import MoeLinear, new_router
from soups.compose.moe.model import expert_factors, install, remove
from soups.compose.moe.settings import MoeError
from soups.evaluation.evaluate import load_model


def install_moe(model: nn.Module, folder: str | Path) -> dict[str, MoeLinear]:
    """Install the mixture of `folder` on `model` (in place); returns the layers by module.
    MoeError / AdapterError name the folder when it does not fit `model`."""
    folder = Path(folder)
    config = read_moe_config(folder)
    _check_base(folder, config, model)
    names = config["experts"]
    adapters = [LoraAdapter.open(folder / EXPERTS_DIR / name) for name in names]
    for adapter in adapters:
        check_fits(adapter.path, model)
    factors = expert_factors(adapters)
    if set(factors) != set(config["modules"]):
        odd = sorted(set(factors) ^ set(config["modules"]))[0]
        raise MoeError(f"{folder}: module {odd} is in the experts or in moe.json, not both")
    device = next(model.parameters()).device
    state = load_file(str(folder / ROUTER_FILE))
    routers = {}
    for module, per_expert in factors.items():
        carried = [names[i] for i, f in enumerate(per_expert) if f is not None]
        if carried != config["modules"][module]["experts"]:
            raise MoeError(f"{folder}, module {module}: experts {carried} carry it, moe.json "
                           f"says {config['modules'][module]['experts']}")
        router = new_router(model.get_submodule(module).in_features, len(carried),
                            bool(config["router"]["bias"]), device)
        routers[module] = _load_router(folder, module, router, state)
    extra = sorted(set(state) - {f"{m}.{k}" for m in routers for k in routers[m].state_dict()})
    if extra:
        raise MoeError(f"{folder}: {ROUTER_FILE} holds {extra[0]!r}, which no module uses")
    return install(model, factors, routers, int(config["top_k"]))


def _load_router(folder: Path, module: str, router: nn.Linear,
                 state: dict[str, torch.Tensor]) -> nn.Linear:
    for key, param in router.named_parameters():
        value = state.get(f"{module}.{key}")
        if value is None or tuple(value.shape) != tuple(param.shape):
            got = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise MoeError(f"{folder}: router {module}.{key} is {got}, expected "
                           f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(torch.float32))
    return router.requires_grad_(False)


def _check_base(folder: Path, config: dict, model: nn.Module) -> None:
    recorded = config.get("base_model") or {}
    have = model.config.to_dict()
    for key in BASE_CONFIG_KEYS:
        if recorded.get(key) is not None and recorded[key] != have.get(key):
            raise MoeError(f"{folder}: a mixture for a base model with {key} {recorded[key]!r} "
                           f"(`{recorded.get('name_or_path')}`), this one has {have.get(key)!r}")


@contextmanager
def installed_moe(model: nn.Module, folder: str | Path) -> Iterator[dict[str, MoeLinear]]:
    """The mixture of `folder` installed on `model` for the `with` block; on exit, normal or
    not, the original layers are back."""
    layers = install_moe(model, folder)
    try:
        yield layers
    finally:
        remove(model, layers)


def load_moe(folder: str | Path, base_model_dir: str | Path, device: str = "auto",
             dtype: str = "auto") -> nn.Module:
    """The base model of `base_model_dir` on `device` in `dtype` (as
    `soups.evaluation.evaluate.load_model` loads it, `resolve_device`), with the mixture of `folder`
    installed, in eval mode."""
    model, _ = load_model(base_model_dir, folder, device, dtype)
    return model
