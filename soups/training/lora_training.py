"""A plain single-process PEFT fine-tune of one LoRA (settings: `soups.training.train_settings`).

What a quick experiment (and the fine-tune overhead benchmark's peer) uses, and the
reference the Ray Train + DeepSpeed trainable (`trainables/`) is checked against: AdamW,
linear warm-up then constant, gradient clipping, seeded (`soups.training.training_loop`). With a
held-out set, the loss on it is evaluated at the trainable's report steps
(`TrainSettings.eval_steps`); with `keep_best` the saved adapter is the evaluated one with
the lowest such loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soups.training.text_batches import encode_dataset, pad_token_id
from soups.training.train_settings import LoraSettings, TrainSettings
from soups.training.training_loop import held_out_loss, optimizer_steps


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None  # keep_best with a held-out set: the saved adapter's step
    best_eval_loss: float | None = None  # ... and its held-out loss


class BestWeights:
    """A CPU copy of the trainable (LoRA) parameters at the lowest held-out loss so far: a
    LoRA is small, so a copy per improvement costs little next to a forward pass."""

    def __init__(self, model):
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.step: int | None = None
        self.eval_loss: float | None = None
        self._copy: dict[str, torch.Tensor] = {}

    def offer(self, step: int, eval_loss: float) -> None:
        if self.eval_loss is not None and eval_loss >= self.eval_loss:
            return  # ties keep the earlier step
        self.step, self.eval_loss = step, eval_loss
        self._copy = {n: p.detach().to("cpu", copy=True) for n, p in self._params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._copy[name])


def train_lora(
    model_dir: str | Path,
    train_rows,
    out_dir: str | Path,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    eval_rows=None,
    on_step: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune one LoRA on `train_rows` (dicts with prompt/completion) in this process and
    save it with `save_pretrained` (safetensors) to `out_dir`. `eval_rows`: held-out rows,
    scored at `train.eval_steps` (the last step's loss is the result's `eval_loss`)."""
    from peft import get_peft_model  # lazy: peft
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers

    torch.manual_seed(train.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, lora.peft_config())
    encoded = encode_dataset(tokenizer, train_rows, train.max_length, train.loss_on)
    held_out = (
        encode_dataset(tokenizer, eval_rows, train.max_length, train.loss_on)
        if eval_rows is not None else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = pad_token_id(tokenizer)
    evals = train.eval_steps(len(encoded)) if held_out is not None else set()
    best = BestWeights(model) if train.keep_best and held_out is not None else None
    step, tokens, start, history = 0, 0, time.perf_counter(), []
    for done in optimizer_steps(model, params, encoded, train, pad_id):
        step, tokens = done.step, done.tokens
        record = {"step": step, "train_loss": done.train_loss, "tokens": tokens}
        if step in evals:
            record["eval_loss"] = held_out_loss(model, held_out, train.micro_batch_size, pad_id)
            if best is not None:
                best.offer(step, record["eval_loss"])
        history.append(record)
        if on_step is not None:
            on_step(record)
    if best is not None:
        best.restore()
    model.save_pretrained(str(out_dir))
    recent = [h["train_loss"] for h in history[-10:]]
    return TrainResult(steps=step, train_loss=sum(recent) / max(len(recent), 1),
                       eval_loss=history[-1].get("eval_loss") if history else None,
                       seconds=time.perf_counter() - start, tokens=tokens, history=history,
                       best_step=best.step if best else None,
                       best_eval_loss=best.eval_loss if best else None)
