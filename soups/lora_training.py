"""A plain single-process PEFT fine-tune of one LoRA (settings: `soups.train_settings`).

What a quick experiment (and the fine-tune overhead benchmark's peer) uses, and the
reference the Ray Train + DeepSpeed trainable (`trainables/`) is checked against: AdamW,
linear warm-up then constant, gradient clipping, seeded (`soups.training_loop`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soups.text_batches import encode_dataset, pad_token_id
from soups.train_settings import LoraSettings, TrainSettings
from soups.training_loop import held_out_loss, optimizer_steps


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int
    history: list[dict] = field(default_factory=list)


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
    save it with `save_pretrained` (safetensors) to `out_dir`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    step, tokens, start, history = 0, 0, time.perf_counter(), []
    for done in optimizer_steps(model, params, encoded, train, pad_id):
        step, tokens = done.step, done.tokens
        record = {"step": step, "train_loss": done.train_loss, "tokens": tokens}
        if held_out is not None and train.eval_every and step % train.eval_every == 0:
            record["eval_loss"] = held_out_loss(model, held_out, train.micro_batch_size, pad_id)
        history.append(record)
        if on_step is not None:
            on_step(record)
    eval_loss = (held_out_loss(model, held_out, train.micro_batch_size, pad_id)
                 if held_out is not None else None)
    model.save_pretrained(str(out_dir))
    recent = [h["train_loss"] for h in history[-10:]]
    return TrainResult(steps=step, train_loss=sum(recent) / max(len(recent), 1),
                       eval_loss=eval_loss, seconds=time.perf_counter() - start,
                       tokens=tokens, history=history)
