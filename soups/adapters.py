"""PEFT LoRA adapter folders: read lazily, module by module, and write back.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r).
Module `m` contributes dW_m = s_m * B_m @ A_m with s_m = alpha_m / r_m, where r_m and
alpha_m come from `rank_pattern` / `alpha_pattern` when a pattern matches the module
(PEFT's `get_pattern_key` rule), else from `r` / `lora_alpha`.

With rslora, s_m = alpha_m / sqrt(r_m). Conv1D layers (GPT-2; `fan_in_fan_out`) store the
factors as linear layers do; only the base weight is transposed, so they merge alike.
Only safetensors are read (never pickle). Variants whose dW is not s * B @ A (DoRA, trained
biases, embedding LoRA, ...) are refused with an error naming the adapter, rather than merged
silently wrong. Written adapters describe exactly their modules (`save_adapter`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from soups.errors import SoupsError
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROVENANCE_FILE = "soups_provenance.json"  # beside the adapter: how it was made
# The marker of a mixture of LoRA experts folder (`soups.compose.moe`): not a PEFT adapter, refused
# here by name rather than read as one.
MOE_CONFIG_FILE = "moe.json"
KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class AdapterError(SoupsError):
    """An adapter folder that cannot be read or merged; the message names adapter and module."""


@dataclass(frozen=True)
class LoraModule:
    """One wrapped module's factors: A (r x in), B (out x r), scaling s = alpha / r."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """Dense dW = s * B @ A, shape (out, in). Only for small modules and tests."""
        return self.scaling * (self.B.float() @ self.A.float())


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name ending in `.<key>` or equal to it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder opened lazily: tensors are read per module on demand."""

    path: Path
    config: dict
    module_names: list[str]  # module paths without the `base_model.model.` prefix, sorted

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        path = Path(path)
        config = read_config(path)
        _check_supported(path, config)
        with safe_open(path / WEIGHTS_FILE, framework="pt") as handle:
            keys = list(handle.keys())
        names = _module_names(path, keys)
        return cls(path=path, config=config, module_names=names)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))

    def scaling_of(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rslora."""
        rank = self.rank_of(module)
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module,
                               self.config["lora_alpha"])
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def module(self, name: str) -> LoraModule:
        """Read one module's factors (float32) and check shapes and finiteness."""
        if name not in self.module_names:
            raise AdapterError(f"adapter {self.path}: has no module {name}")
        with safe_open(self.path / WEIGHTS_FILE, framework="pt") as handle:
            a = handle.get_tensor(KEY_PREFIX + name + _A_SUFFIX).float()
            b = handle.get_tensor(KEY_PREFIX + name + _B_SUFFIX).float()
        rank = self.rank_of(name)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"adapter {self.path}, module {name}: factor shapes A{tuple(a.shape)} "
                f"B{tuple(b.shape)} do not match rank {rank}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {self.path}, module {name}: NaN or Inf in the weights")
        return LoraModule(A=a, B=b, scaling=self.scaling_of(name))

    def modules(self) -> Iterator[tuple[str, LoraModule]]:
        for name in self.module_names:
            yield name, self.module(name)


def read_config(path: Path) -> dict:
    """The adapter_config.json of a PEFT adapter folder that holds safetensors weights; an
    AdapterError naming the folder when it is not one."""
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: " + ("not a folder" if path.exists()
                                                  else "no such folder"))
    if (path / MOE_CONFIG_FILE).is_file():
        raise AdapterError(
            f"adapter {path}: a mixture of LoRA experts ({MOE_CONFIG_FILE}: a router and "
            "several LoRAs), not a PEFT adapter: PEFT cannot load it and it cannot be merged "
            "as one LoRA; load it with soups.compose.moe.load_moe(folder, model_dir)")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise AdapterError(f"adapter {path}: missing {CONFIG_FILE} (not a PEFT adapter folder)")
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"adapter {path}: only adapter_model.bin (pickle) found; "
                f"save it with safetensors ({WEIGHTS_FILE})"
            )
        raise AdapterError(f"adapter {path}: missing {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not a JSON object")
    return config


def layer_shapes(path: str | Path) -> dict[str, tuple[int | None, int | None]]:
    """(out, in) of the layer each module's factors are for (B: out x r, A: r x in), from the
    safetensors header of the folder (no tensor is read; tensors other than A / B are
    ignored, None where a module lacks one of the two)."""
    shapes: dict[str, list[int | None]] = {}
    with safe_open(Path(path) / WEIGHTS_FILE, framework="pt") as handle:
        for key in handle.keys():
            for suffix, index, dim in ((_B_SUFFIX, 0, 0), (_A_SUFFIX, 1, -1)):
                if key.startswith(KEY_PREFIX) and key.endswith(suffix):
                    shape = shapes.setdefault(key[len(KEY_PREFIX):-len(suffix)], [None, None])
                    shape[index] = handle.get_slice(key).get_shape()[dim]
    return {name: (out, in_) for name, (out, in_) in shapes.items()}


def check_fits(path: str | Path, model) -> None:
    """Every module of the adapter folder is a layer of `model` of the shape its factors are
    for; else an AdapterError naming the adapter, the module and both shapes (an adapter of
    another base model, most often), where PEFT would print a page of size mismatches.
    Checks only the folder and the factor shapes, so it accepts whatever PEFT loads."""
    path = Path(path)
    transposed = bool(read_config(path).get("fan_in_fan_out"))  # Conv1D: weight is in x out
    layers = dict(model.named_modules())
    for name, shape in sorted(layer_shapes(path).items()):
        layer = layers.get(name)
        if layer is None:
            raise AdapterError(f"adapter {path}: module {name} is not in the base model")
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2:
            continue  # not a linear layer: PEFT checks it
        has = tuple(weight.shape[::-1] if transposed else weight.shape)
        if any(want is not None and want != got for want, got in zip(shape, has, strict=True)):
            raise AdapterError(f"adapter {path}, module {name}: factors for a {shape[0]} x "
                               f"{shape[1]} layer, the base model's is {has[0]} x {has[1]} "
                               "(an adapter of another base model?)")


# Config fields whose adapters are not s * B @ A on the wrapped weight; refused by name.
UNSUPPORTED = {
    "use_dora": "DoRA (magnitude vectors)",
    "lora_bias": "LoRA with a trained bias on B",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens",
    "modules_to_save": "fully trained modules (modules_to_save)",
}


def _check_supported(path: Path, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {peft_type!r} is not LORA")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"adapter {path}: {CONFIG_FILE} lacks {key!r}")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"adapter {path}: {what} ({key}={config[key]!r}) is not "
                               "supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path}: trained biases (bias={config['bias']!r}) "
                           "are not supported")


def _module_names(path: Path, keys: list[str]) -> list[str]:
    embedding = next((key for key in keys if ".lora_embedding_" in key), None)
    if embedding is not None:
        raise AdapterError(f"adapter {path}: embedding LoRA is not supported ({embedding!r}); "
                           "train LoRA on linear layers only")
    a_names, b_names = set(), set()
    for key in keys:
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"adapter {path}: unexpected tensor {key!r}")
        if key.endswith(_A_SUFFIX):
            a_names.add(key[len(KEY_PREFIX):-len(_A_SUFFIX)])
        elif key.endswith(_B_SUFFIX):
            b_names.add(key[len(KEY_PREFIX):-len(_B_SUFFIX)])
        else:
            raise AdapterError(f"adapter {path}: unsupported tensor {key!r} (only LoRA A/B)")
    if a_names != b_names:
        odd = sorted(a_names ^ b_names)[0]
        raise AdapterError(f"adapter {path}, module {odd}: has only one of lora_A / lora_B")
    if not a_names:
        raise AdapterError(f"adapter {path}: no LoRA weights")
    return sorted(a_names)


# PEFT fields a merged adapter takes from its inputs: what the adapter is for and how its
# base layers store weights. Every other field describes modules, initialisation or
# training, so it is written anew for exactly the modules in the folder.
INHERITED = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out")


def save_adapter(
    out_dir: str | Path,
    modules: dict[str, LoraModule] | Iterator[tuple[str, LoraModule]],
    base_config: dict,
    provenance: dict | None = None,
) -> Path:
    """Write a PEFT LoRA folder from per-module factors.

    The config describes exactly the modules written: `target_modules` lists their full
    names (PEFT matches a name exactly), layer selections and exclusions are reset, and
    `init_lora_weights` is true, so PEFT creates these modules and no other, and a module
    without weights (there is none) would start at zero, never at random. Each module keeps
    its own rank and scaling through `rank_pattern` / `alpha_pattern`. `base_config` supplies
    the `INHERITED` fields; `provenance` (how the adapter was made) goes to a sidecar file,
    so `adapter_config.json` stays exactly PEFT's.
    """
    out = Path(out_dir)
    items = dict(modules)
    if not items:
        raise AdapterError(f"refusing to write an adapter without modules to {out}")
    ranks = {name: m.rank for name, m in items.items()}
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, module in items.items():
        tensors[KEY_PREFIX + name + _A_SUFFIX] = module.A.contiguous()
        tensors[KEY_PREFIX + name + _B_SUFFIX] = module.B.contiguous()
        # alpha = s * r reproduces the module's scaling exactly in PEFT (s = alpha / r).
        alpha = module.scaling * module.rank
        if module.rank != default_rank:
            rank_pattern[_exact(name)] = module.rank
        alpha_pattern[_exact(name)] = alpha
    alphas = set(alpha_pattern.values())
    default_alpha = alphas.pop() if len(alphas) == 1 else None
    if default_alpha is not None and math.isfinite(default_alpha):
        alpha_pattern = {}
    else:
        default_alpha = float(default_rank)
    config = {key: base_config[key] for key in INHERITED if base_config.get(key) is not None}
    config.update(
        peft_type="LORA",
        r=default_rank,
        lora_alpha=default_alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=sorted(items),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        modules_to_save=None,
        init_lora_weights=True,
        use_rslora=False,
        use_dora=False,
        bias="none",
        lora_dropout=0.0,
        inference_mode=True,
    )
    config.setdefault("task_type", "CAUSAL_LM")
    config.setdefault("fan_in_fan_out", False)
    out.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so a crash never leaves a half-written adapter.
    files = {WEIGHTS_FILE: None, CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)}
    if provenance is not None:
        files[PROVENANCE_FILE] = json.dumps(provenance, indent=2, sort_keys=True, default=str)
    from safetensors.torch import save_file  # lazy: safetensors.torch

    for name, text in files.items():
        tmp = out / (name + ".tmp")
        if text is None:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            tmp.write_text(text)
    for name in files:
        (out / (name + ".tmp")).replace(out / name)
    return out


def read_provenance(adapter_dir: str | Path) -> dict | None:
    """How an adapter written by `save_adapter` was made (None for other adapters)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _exact(name: str) -> str:
    """A pattern key for this module alone: PEFT matches `(.*\\.)?(key)$` against the
    module path, and a full escaped path is a suffix of no other module's path."""
    return re.escape(name)


def factor_dtype(weight_dtype):
    """The dtype PEFT keeps LoRA factors in on a base layer of `weight_dtype`: float32 for
    float16 and bfloat16 (its `autocast_adapter_dtype`), else the weight's own."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
