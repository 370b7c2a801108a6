"""The single-process training loop shared by the plain LoRA fine-tune
(`soups.training.lora_training.train_lora`) and CAT training (`soups.compose.cat.train.train_cat`).

`optimizer_steps` runs seeded, shuffled micro-batches epoch after epoch (one stream: an
accumulation window may span two epochs), accumulates `loss / grad_accumulation`, clips the
gradient norm when `max_grad_norm` is set and > 0, steps AdamW and the warm-up schedule, and
yields one `OptimizerStep` after each optimizer step, until `total_steps`. What happens
between steps (held-out evaluation, best weights, callbacks, stopping early: leave the loop)
is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from soups.training.text_batches import batches
from soups.training.train_settings import TrainSettings

Encoded = Sequence[tuple[list[int], list[int]]]


@dataclass(frozen=True)
class OptimizerStep:
    step: int  # optimizer steps done, from 1
    train_loss: float  # sum of loss / grad_accumulation over this step's micro-batches
    learning_rate: float  # the schedule's rate after this step
    tokens: int  # non-padding tokens of every micro-batch so far


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def adamw_with_warmup(params, settings: TrainSettings):
    """AdamW on `params` and its schedule: linear warm-up over `warmup_steps`, then
    constant."""
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(settings.warmup_steps))
    return optimizer, scheduler


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


def optimizer_steps(model, params: list[torch.Tensor], encoded: Encoded,
                    settings: TrainSettings, pad_id: int) -> Iterator[OptimizerStep]:
    """Train `params` of `model` (in train mode) on `encoded` (ids, labels) examples; yields
    after each of the `settings.total_steps(len(encoded))` optimizer steps."""
    if not encoded:  # no batch would ever come: the loop below would never end
        raise ValueError("training: no examples to train on")
    optimizer, scheduler = adamw_with_warmup(params, settings)
    total_steps = settings.total_steps(len(encoded))
    generator = torch.Generator().manual_seed(settings.seed)
    clip = settings.max_grad_norm is not None and settings.max_grad_norm > 0
    model.train()
    step, micro, tokens, running = 0, 0, 0, 0.0
    while True:
        for batch in batches(encoded, settings.micro_batch_size, pad_id, generator):
            loss = model(**batch).loss / settings.grad_accumulation
            loss.backward()
            running += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % settings.grad_accumulation:
                continue
            if clip:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            yield OptimizerStep(step, running, scheduler.get_last_lr()[0], tokens)
            running = 0.0
            if step >= total_steps:
                return
