"""One CAT run end to end: load the base model, attach the skill LoRAs, build the skill mix,
train the weights, export the folded PEFT adapter (what `soups cat` and the
`cat_learned` merge method call). `PreparedRun` (the base model and the encoded mix) is
shared with the router training of `soups.compose.moe`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from soups.compose.cat.export import export_cat
from soups.compose.cat.mix import skill_mix
from soups.compose.cat.model import CatModel
from soups.compose.cat.settings import (
    PAPER_CAT_TRAIN,
    PAPER_FRACTION,
    PAPER_HELD_OUT,
    CatError,
    CatSettings,
)
from soups.compose.cat.train import CatTrainResult, train_cat
from soups.evaluation.evaluate import resolve_device as evaluation_device
from soups.training.base_model import load_pretrained
from soups.training.text_batches import encode_dataset, pad_token_id
from soups.training.train_settings import TrainSettings
from soups.training.training_loop import Encoded


def resolve_device(device: str | None = None, dtype: str = "auto") -> tuple[torch.device,
                                                                             torch.dtype]:
    """As `soups.evaluation.evaluate.resolve_device` (CUDA when present, else the CPU; bf16 on a GPU
    that supports it: the frozen base and factors, the CAT logits stay float32), except
    that `auto` never picks float16: training in float16 without loss scaling underflows."""
    dev, torch_dtype = evaluation_device(device or "auto", dtype)
    if dtype == "auto" and torch_dtype == torch.float16:
        torch_dtype = torch.float32
    return dev, torch_dtype


@dataclass
class PreparedRun:
    """What a run that trains weights over a frozen base needs (CAT, and the routers of
    `soups.compose.moe`): the tokenizer, the base model on its device, and the encoded skill mix."""

    tokenizer: object
    base: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    train_encoded: Encoded
    held_out_encoded: Encoded

    @classmethod
    def load(cls, model_dir: str | Path, skills: Sequence[Sequence[dict]], train: TrainSettings,
             fraction: float | None, count: int | None, held_out: int,
             device: str | None = None, dtype: str = "auto", label: str = "CAT"
             ) -> PreparedRun:
        """The skill mix (`skill_mix`, seeded by `train.seed`) and the base model on
        `resolve_device(device, dtype)`; torch is seeded with `train.seed`."""
        if held_out < 1:  # before the model loads: the best weights are picked on these rows
            raise CatError(f"{label}: held_out must be at least 1 (best-checkpoint selection "
                           f"needs held-out rows), got {held_out}")
        dev, torch_dtype = resolve_device(device, dtype)
        train_rows, held_rows = skill_mix(skills, fraction, count, held_out, train.seed, label)
        torch.manual_seed(train.seed)
        tokenizer, base = load_pretrained(model_dir, torch_dtype)
        encoded = encode_dataset(tokenizer, train_rows, train.max_length, train.loss_on)
        held = encode_dataset(tokenizer, held_rows, train.max_length, train.loss_on)
        return cls(tokenizer, base.to(dev), dev, torch_dtype, encoded, held)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def describe(self) -> str:
        return (f"{len(self.train_encoded)} training / {len(self.held_out_encoded)} held-out "
                f"examples on {self.device} ({self.dtype})")

    def summary(self, result: CatTrainResult, train: TrainSettings, fraction: float | None,
                count: int | None) -> dict:
        """The training record an export keeps."""
        return {**result.summary(), "train_examples": len(self.train_encoded),
                "held_out_examples": len(self.held_out_encoded), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "train_settings": asdict(train), "fraction": fraction, "count": count}


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
    run = PreparedRun.load(model_dir, skills, train, fraction, count, held_out, device, dtype)
    model = CatModel.attach(run.base, adapter_dirs, cat)
    if log is not None:
        log(f"CAT: {len(adapter_dirs)} LoRAs, {len(model.layers)} wrapped modules, "
            f"{run.describe()}")
    result = train_cat(model, run.train_encoded, run.held_out_encoded, train, run.pad_id,
                       on_step, log)
    export_cat(model, out_dir, run.summary(result, train, fraction, count))
    return result
