"""Training of the CAT weights only: AdamW with linear warm-up, held-out loss every
`eval_every` steps, best weights by held-out loss, seeded; a per-step callback can stop it.

Base model and every LoRA factor are frozen (`CatModel` registers the factors as buffers),
so the optimizer sees one tensor: the logits (n_groups x k). The held-out loss is also
taken before the first step, so a run whose training never beats the initial mixture keeps
the initial mixture (LoRA Soups keeps the checkpoint with the lowest held-out loss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from soups.cat.model import CatModel
from soups.cat.settings import CatError
from soups.train_settings import TrainSettings
from soups.training_loop import Encoded, held_out_loss, optimizer_steps


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an `on_step` callback to end training now; the best weights are kept."""


@dataclass
class CatTrainResult:
    steps: int
    trainable_parameters: int
    initial_eval_loss: float
    best_eval_loss: float
    best_step: int
    final_train_loss: float
    stopped_early: bool
    seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the per-step history (for `cat_weights.json` and trackers)."""
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def train_cat(
    model: CatModel,
    train_encoded: Encoded,
    held_out_encoded: Encoded,
    settings: TrainSettings,
    pad_id: int,
    on_step: Callable[[dict], bool | None] | None = None,
    log: Callable[[str], None] | None = print,
) -> CatTrainResult:
    """Train `model.weights` on encoded (ids, labels) examples and leave the best weights
    (lowest held-out loss) in the model.

    `on_step(record)` gets {"step", "train_loss", "learning_rate", "tokens", "seconds",
    "best_eval_loss"} plus "eval_loss" on evaluation steps; returning True (or raising
    `StopTraining`) stops training after that step.
    """
    if not train_encoded:
        raise CatError("CAT training: no training examples")
    if not held_out_encoded:
        raise CatError("CAT training: no held-out examples (needed to pick the best weights)")
    logits = model.weights.logits
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and p is not logits]
    if frozen:
        raise ValueError(f"CAT training: parameters other than the CAT weights are trainable: "
                         f"{frozen[:3]}")
    trainable = model.trainable_parameters()
    if log is not None:
        log(f"CAT: {trainable} trainable parameters ({len(model.group_names)} weight groups x "
            f"{len(model.adapters)} LoRAs); base model and LoRA factors frozen")
    batch_size = settings.micro_batch_size

    def evaluate() -> float:
        return held_out_loss(model, held_out_encoded, batch_size, pad_id)

    start = time.perf_counter()
    initial = evaluate()
    best_loss, best_step, best_logits = initial, 0, logits.detach().clone()
    history: list[dict] = []
    step, stopped, evaluated_last = 0, False, True
    for done in optimizer_steps(model, [logits], train_encoded, settings, pad_id):
        step = done.step
        record = {"step": step, "train_loss": done.train_loss,
                  "learning_rate": done.learning_rate, "tokens": done.tokens,
                  "seconds": time.perf_counter() - start}
        evaluated_last = bool(settings.eval_every) and step % settings.eval_every == 0
        if evaluated_last:
            record["eval_loss"] = evaluate()
            if record["eval_loss"] < best_loss:
                best_loss, best_step = record["eval_loss"], step
                best_logits = logits.detach().clone()
        record["best_eval_loss"] = best_loss
        history.append(record)
        try:
            stopped = bool(on_step(record)) if on_step is not None else False
        except StopTraining:
            stopped = True
        if stopped:
            break
    if not evaluated_last:
        final = evaluate()
        history[-1]["eval_loss"] = final
        if final < best_loss:
            best_loss, best_step, best_logits = final, step, logits.detach().clone()
    with torch.no_grad():
        logits.copy_(best_logits)
    recent = [h["train_loss"] for h in history[-10:]]
    result = CatTrainResult(
        steps=step, trainable_parameters=trainable, initial_eval_loss=initial,
        best_eval_loss=best_loss, best_step=best_step,
        final_train_loss=sum(recent) / max(len(recent), 1), stopped_early=stopped,
        seconds=time.perf_counter() - start, history=history,
    )
    if log is not None:
        log(f"CAT: {step} steps in {result.seconds:.1f} s; held-out loss {initial:.4f} at "
            f"start, best {best_loss:.4f} at step {best_step}")
    return result
