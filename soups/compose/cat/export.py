"""Export a trained CAT as one standard PEFT LoRA, exactly.

Concatenation has no cross terms (LoRA Soups, https://arxiv.org/abs/2410.13025):

    sum_i a_i s_i B_i A_i = [a_1 s_1 B_1, ..., a_k s_k B_k] [A_1; ...; A_k]

so module m exports as rank R_m = sum of the present r_i with B' = [a_i s_i B_i] (the weights
folded into B), A' = [A_i] and scaling 1 (`lora_alpha` = rank, no rslora). The factors are
re-read from the adapter folders in float32, so a model trained in bf16 still exports the
exact weighted sum of the original LoRAs. `cat_weights.json` records every a_i^m.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from soups.adapters import INHERITED, LoraModule, save_adapter
from soups.compose.cat.model import CatModel

WEIGHTS_JSON = "cat_weights.json"


def folded_modules(cat: CatModel) -> dict[str, LoraModule]:
    """Per module: A' (R x in), B' (out x R) with the learned weights folded into B', s = 1."""
    out = {}
    for name, weights in cat.mixtures().items():
        a_rows, b_cols = [], []
        for adapter, a in zip(cat.adapters, weights, strict=True):
            if a is None:
                continue
            m = adapter.module(name)
            a_rows.append(m.A)
            b_cols.append(m.B * (a * m.scaling))
        out[name] = LoraModule(A=torch.cat(a_rows), B=torch.cat(b_cols, dim=1), scaling=1.0)
    return out


def export_cat(cat: CatModel, out_dir: str | Path, summary: dict | None = None) -> Path:
    """Write the folded PEFT adapter and `cat_weights.json` (a_i^m per module) to `out_dir`."""
    first = cat.adapters[0]
    base_config = {key: first.config.get(key) for key in INHERITED}
    record = {
        "method": "cat_learned",
        "adapters": cat.adapter_names,
        "settings": asdict(cat.settings),
        "training": summary or {},
    }
    out = save_adapter(out_dir, folded_modules(cat), base_config, provenance=record)
    weights = {**record, "groups": cat.group_names, "weights": cat.mixtures()}
    (out / WEIGHTS_JSON).write_text(json.dumps(weights, indent=2))
    return out
