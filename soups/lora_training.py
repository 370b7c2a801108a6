"""LoRA fine-tuning settings and a plain single-process PEFT training loop.

The settings dataclasses are the one description of a skill fine-tune: the Ray Train +
DeepSpeed trainable (`trainables/`) and this plain loop both take them, and the adapter
cache hashes them. The plain loop is what a quick experiment (and the fine-tune overhead
benchmark's peer) uses: AdamW, linear warm-up then constant, gradient clipping, seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from soups.text_batches import LossOn, batches, encode_dataset

# The paper's skill LoRAs (LLaMA-7B): r=32, alpha=64, dropout 0.05 on q,k,v,up,down.
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PAPER_TARGETS

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 3e-4
    epochs: float = 3.0  # fractional epochs allowed; `max_steps` wins when set
    max_steps: int | None = None
    micro_batch_size: int = 16
    grad_accumulation: int = 1
    max_length: int = 256
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_on: LossOn = "completion"
    seed: int = 0
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 = once per epoch

    def steps_per_epoch(self, n_examples: int, world_size: int = 1) -> int:
        """Optimizer steps in one pass over `n_examples` when each step takes
        `micro_batch_size * grad_accumulation` examples on each of `world_size` workers."""
        global_batch = self.micro_batch_size * self.grad_accumulation * world_size
        return max(1, math.ceil(n_examples / global_batch))

    def total_steps(self, n_examples: int, world_size: int = 1) -> int:
        per_epoch = self.steps_per_epoch(n_examples, world_size)
        return self.max_steps or max(1, math.ceil(per_epoch * self.epochs))


# The paper's skill fine-tune recipe (method.md), as a preset.
PAPER_LORA = LoraSettings(rank=32, alpha=64.0, dropout=0.05)
PAPER_TRAIN = TrainSettings(learning_rate=3e-4, epochs=3.0, micro_batch_size=16, max_length=256)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int
    history: list[dict] = field(default_factory=list)


def settings_dict(lora: LoraSettings, train: TrainSettings) -> dict:
    return {"lora": asdict(lora), "train": asdict(train)}


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


@torch.no_grad()
def held_out_loss(model, encoded, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over `encoded` examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(encoded, batch_size, pad_id, shuffle=False):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


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
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate,
                                  weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(train.warmup_steps))
    total_steps = train.total_steps(len(encoded))
    generator = torch.Generator().manual_seed(train.seed)
    pad_id = tokenizer.pad_token_id
    model.train()
    step, tokens, start, history = 0, 0, time.perf_counter(), []
    running, micro = 0.0, 0
    loss = torch.tensor(float("nan"))
    while step < total_steps:
        for batch in batches(encoded, train.micro_batch_size, pad_id, generator):
            loss = model(**batch).loss / train.grad_accumulation
            loss.backward()
            running += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % train.grad_accumulation:
                continue
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "train_loss": running, "tokens": tokens}
            running = 0.0
            if held_out is not None and train.eval_every and step % train.eval_every == 0:
                record["eval_loss"] = held_out_loss(model, held_out, train.micro_batch_size,
                                                    pad_id)
            history.append(record)
            if on_step is not None:
                on_step(record)
            if step >= total_steps:
                break
    eval_loss = (held_out_loss(model, held_out, train.micro_batch_size, pad_id)
                 if held_out is not None else None)
    model.save_pretrained(str(out_dir))
    recent = [h["train_loss"] for h in history[-10:]]
    return TrainResult(steps=step, train_loss=sum(recent) / max(len(recent), 1),
                       eval_loss=eval_loss, seconds=time.perf_counter() - start,
                       tokens=tokens, history=history)
