"""The folder of a mixture of LoRA experts: what it holds, how it is written, how it is
recognised. A mixture is not one static LoRA (its gates depend on the input), so it cannot
be a PEFT adapter folder; it is written in the project's own format, safetensors and JSON
only (never pickle):

    moe.json                format marker and version, the base model it is for, expert
                            names, top_k, per-module routing, training summary
    router.safetensors      `<module>.weight` (kp x in) and `<module>.bias` (kp) per module,
                            float32; kp = the experts present in that module, in order
    experts/<name>/         each expert's PEFT adapter, copied (adapter_config.json,
                            adapter_model.safetensors)
    README.md               a model card saying how to load it (`soups.compose.moe.load_moe`)

This module loads no torch until a mixture is written (`is_moe_folder` is cheap: the
evaluator asks it of every candidate).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from soups.adapters import CONFIG_FILE, MOE_CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE
from soups.compose.moe.settings import MoeError

FORMAT = "soups-lora-moe"
VERSION = 1
ROUTER_FILE = "router.safetensors"
EXPERTS_DIR = "experts"
README = "README.md"
# What identifies a base model here, from its config (the loader compares these).
BASE_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "vocab_size")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_moe_folder(path: str | Path | None) -> bool:
    """Whether `path` is a folder holding `moe.json` (a mixture of LoRA experts; its
    contents are checked when it is read, `read_moe_config`)."""
    return path is not None and (Path(path) / MOE_CONFIG_FILE).is_file()


def read_moe_config(folder: str | Path) -> dict:
    """The validated `moe.json` of a mixture folder; MoeError naming the folder otherwise."""
    folder = Path(folder)
    if not is_moe_folder(folder):
        raise MoeError(f"{folder}: not a mixture of LoRA experts folder (no {MOE_CONFIG_FILE})")
    try:
        config = json.loads((folder / MOE_CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise MoeError(f"{folder}: {MOE_CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MoeError(f"{folder}: {MOE_CONFIG_FILE} is not of format {FORMAT!r}")
    if config.get("version") != VERSION:
        raise MoeError(f"{folder}: {MOE_CONFIG_FILE} version {config.get('version')!r}; this "
                       f"code reads version {VERSION}")
    missing = [k for k in ("experts", "top_k", "modules", "router") if k not in config]
    if missing:
        raise MoeError(f"{folder}: {MOE_CONFIG_FILE} lacks {', '.join(missing)}")
    for name in config["experts"]:
        if not (folder / EXPERTS_DIR / name / WEIGHTS_FILE).is_file():
            raise MoeError(f"{folder}: expert {name!r} has no {EXPERTS_DIR}/{name}/{WEIGHTS_FILE}")
    if not (folder / ROUTER_FILE).is_file():
        raise MoeError(f"{folder}: missing {ROUTER_FILE}")
    return config


def expert_names(adapter_dirs: Sequence[str | Path]) -> list[str]:
    """Folder-safe, distinct names of the experts: each adapter folder's name (characters
    other than letters, digits, `._-` replaced), `-2`, `-3`, ... added to repeats."""
    names: list[str] = []
    for path in adapter_dirs:
        stem = _UNSAFE.sub("_", Path(path).resolve().name).strip("._") or "expert"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def base_model_record(model, model_dir: str | Path | None = None) -> dict:
    """What `moe.json` says of the base model: where it came from and its `BASE_CONFIG_KEYS`."""
    config = model.config.to_dict()
    name = str(model_dir) if model_dir is not None else config.get("_name_or_path")
    return {"name_or_path": name, **{k: config.get(k) for k in BASE_CONFIG_KEYS}}


def export_moe(moe, out_dir: str | Path, model_dir: str | Path | None = None,
               summary: dict | None = None) -> Path:
    """Write the mixture `moe` (a `soups.compose.moe.model.MoeModel`) to `out_dir`: moe.json, the
    routers, each expert's adapter files and the model card. `out_dir` must be absent,
    empty, or an earlier mixture (replaced); written beside it first, then renamed."""
    from safetensors.torch import save_file  # lazy: safetensors.torch

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_moe_folder(out))):
        raise MoeError(f"refusing to write a mixture of LoRA experts into {out}: it exists "
                       "and is not an empty folder or an earlier mixture")
    names = expert_names([a.path for a in moe.adapters])
    modules = {}
    for name, layer in sorted(moe.layers.items()):
        modules[name] = {"experts": [names[i] for i in layer.present],
                         "in_features": layer.in_features, "top_k": layer.top_k}
    config = {
        "format": FORMAT, "version": VERSION,
        "description": "A mixture of LoRA experts: a frozen base model, frozen LoRA experts and "
                       "a learned router per wrapped linear layer. Not a PEFT adapter.",
        "base_model": base_model_record(moe.model, model_dir),
        "experts": names,
        "expert_sources": [str(a.path) for a in moe.adapters],
        "top_k": moe.settings.top_k,
        "router": {"file": ROUTER_FILE, "per": "module", "input": "the wrapped layer's input",
                   "gate": "softmax over the top_k logits, 0 for the others",
                   "bias": moe.settings.bias, "dtype": "float32"},
        "modules": modules,
        "settings": asdict(moe.settings),
        "training": summary or {},
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, adapter in zip(names, moe.adapters, strict=True):
        target = tmp / EXPERTS_DIR / name
        target.mkdir(parents=True)
        for file in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE):
            if (Path(adapter.path) / file).is_file():
                shutil.copyfile(Path(adapter.path) / file, target / file)
    save_file(moe.router_state(), str(tmp / ROUTER_FILE), metadata={"format": "pt"})
    (tmp / MOE_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    (tmp / README).write_text(model_card(config))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_card(config: dict) -> str:
    """README.md of a mixture folder."""
    base = config["base_model"].get("name_or_path")
    training = config.get("training") or {}
    trained = (f"Routers trained for {training['steps']} steps; held-out loss "
               f"{training['initial_eval_loss']:.4f} at the start, best "
               f"{training['best_eval_loss']:.4f} (step {training['best_step']}).\n\n"
               if {"steps", "initial_eval_loss", "best_eval_loss", "best_step"} <= training.keys()
               else "")
    return (
        "# Mixture of LoRA experts\n\n"
        "This folder is a **mixture of LoRA experts** (the MoE baseline of LoRA Soups, "
        "arXiv 2410.13025, built as mergoo does): every wrapped linear layer of the base model "
        "keeps its frozen weight and adds the frozen LoRA experts, weighted per token by a "
        f"learned router (softmax over the top {config['top_k']} of its logits).\n\n"
        "**It is not a PEFT adapter and PEFT alone cannot load it**: the gates depend on the "
        "input, so the mixture is not one static LoRA and cannot be merged into one. Load it "
        "with:\n\n"
        "```python\nfrom soups.compose.moe import load_moe\n\n"
        "model = load_moe(this_folder, base_model_dir)  # the base model, MoE layers installed\n"
        "```\n\n"
        "`soups evaluate --adapter this_folder` and the study's evaluators accept it too.\n\n"
        f"Base model: `{base}`. Experts ({len(config['experts'])}): "
        + ", ".join(f"`{n}`" for n in config["experts"])
        + f" (their PEFT adapters under `{EXPERTS_DIR}/`). Routers: `{ROUTER_FILE}`, one per "
        f"wrapped module ({len(config['modules'])} modules); format and settings in "
        f"`{MOE_CONFIG_FILE}`.\n\n" + trained
    )
