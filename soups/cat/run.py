"""One CAT run end to end: load the base model, attach the skill LoRAs, build the skill mix,
train the weights, export the folded PEFT adapter (what `soups cat` and the
`cat_learned` merge method call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from soups.base_model import load_pretrained
from soups.cat.export import export_cat
from soups.cat.mix import skill_mix
from soups.cat.model import CatModel
from soups.cat.settings import (
    PAPER_CAT_TRAIN,
    PAPER_FRACTION,
    PAPER_HELD_OUT,
    CatError,
    CatSettings,
)
from soups.cat.train import CatTrainResult, train_cat
from soups.text_batches import encode_dataset, pad_token_id
from soups.train_settings import TrainSettings


def resolve_device(device: str | None = None, dtype: str = "auto") -> tuple[torch.device,
                                                                             torch.dtype]:
    """As `soups.evaluate.resolve_device` (CUDA when present, else the CPU; bf16 on a GPU
    that supports it: the frozen base and factors, the CAT logits stay float32), except
    that `auto` never picks float16: training in float16 without loss scaling underflows."""
    from soups.evaluate import resolve_device as evaluation_device

    dev, torch_dtype = evaluation_device(device or "auto", dtype)
    if dtype == "auto" and torch_dtype == torch.float16:
        torch_dtype = torch.float32
    return dev, torch_dtype


def learn_cat(
    adapter_dirs: Sequence[str | Path],
    model_dir: str | Path,
    skills: Sequence[Sequence[dict]],
    out_dir: str | Path,
    cat: CatSettings = CatSettings(),
    train: TrainSettings = PAPER_CAT_TRAIN,
    fraction: float | None = PAPER_FRACTION,
    count: int | None = None,
    held_out: int = PAPER_HELD_OUT,
    device: str | None = None,
    dtype: str = "auto",
    on_step: Callable[[dict], bool | None] | None = None,
    log: Callable[[str], None] | None = print,
) -> CatTrainResult:
    """Train CAT weights for `adapter_dirs` on a mix of the `skills` rows (prompt/completion)
    and export the result to `out_dir` (PEFT adapter + cat_weights.json)."""
    if held_out < 1:  # before the model loads: CAT keeps the weights best on held-out rows
        raise CatError(f"CAT: held_out must be at least 1 (best-checkpoint selection needs "
                       f"held-out rows), got {held_out}")
    dev, torch_dtype = resolve_device(device, dtype)
    torch.manual_seed(train.seed)
    tokenizer, base = load_pretrained(model_dir, torch_dtype)
    base = base.to(dev)
    model = CatModel.attach(base, adapter_dirs, cat)
    train_rows, held_rows = skill_mix(skills, fraction, count, held_out, train.seed)
    encoded = encode_dataset(tokenizer, train_rows, train.max_length, train.loss_on)
    held = encode_dataset(tokenizer, held_rows, train.max_length, train.loss_on)
    if log is not None:
        log(f"CAT: {len(adapter_dirs)} LoRAs, {len(model.layers)} wrapped modules, "
            f"{len(encoded)} training / {len(held)} held-out examples on {dev} ({torch_dtype})")
    result = train_cat(model, encoded, held, train, pad_token_id(tokenizer), on_step, log)
    summary = {**result.summary(), "train_examples": len(encoded), "held_out_examples": len(held),
               "device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."),
               "train_settings": asdict(train), "fraction": fraction, "count": count}
    export_cat(model, out_dir, summary)
    return result
