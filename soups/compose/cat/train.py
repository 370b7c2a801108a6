"""Training of the CAT weights only: AdamW with linear warm-up, held-out loss every
`eval_every` steps, best weights by held-out loss, seeded; a per-step callback can stop it.

Base model and every LoRA factor are frozen (`CatModel` registers the factors as buffers),
so the optimizer sees one tensor: the logits (n_groups x k). `train_weights` is the same
loop over any set of parameters of an otherwise frozen model: the routers of a mixture of
LoRA experts (`soups.compose.moe`) are trained with it too. The held-out loss is also
taken before the first step, so a run whose training never beats the initial mixture keeps
the initial mixture (LoRA Soups keeps the checkpoint with the lowest held-out loss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from soups.compose.cat.model import CatModel
from soups.compose.cat.settings import CatError
from soups.training.train_settings import TrainSettings
from soups.training.training_loop import Encoded, held_out_loss, optimizer_steps


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
    (lowest held-out loss) in the model (`train_weights` with the CAT logits)."""
    if log is not None:
        log(f"CAT: {model.trainable_parameters()} trainable parameters "
            f"({len(model.group_names)} weight groups x {len(model.adapters)} LoRAs); base "
            "model and LoRA factors frozen")
    return train_weights(model, [model.weights.logits], train_encoded, held_out_encoded,
                         settings, pad_id, on_step, log)


def train_weights(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    train_encoded: Encoded,
    held_out_encoded: Encoded,
    settings: TrainSettings,
    pad_id: int,
    on_step: Callable[[dict], bool | None] | None = None,
    log: Callable[[str], None] | None = print,
    label: str = "CAT",
) -> CatTrainResult:
    """Train `params`, the only trainable parameters of `model` (everything else frozen:
    the CAT logits, or the routers of a mixture of LoRA experts, `soups.compose.moe`), on encoded
    (ids, labels) examples and leave the best values (lowest held-out loss) in them.

    `on_step(record)` gets {"step", "train_loss", "learning_rate", "tokens", "seconds",
    "best_eval_loss"} plus "eval_loss" on evaluation steps; returning True (or raising
    `StopTraining`) stops training after that step. `label` names the run in messages.
    """
    if not train_encoded:
        raise CatError(f"{label} training: no training examples")
    if not held_out_encoded:
        raise CatError(f"{label} training: no held-out examples (needed to pick the best "
                       "weights)")
    chosen = {id(p) for p in params}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
    if frozen:
        raise ValueError(f"{label} training: parameters other than the {label} weights are "
                         f"trainable: {frozen[:3]}")
    trainable = sum(p.numel() for p in params)
    batch_size = settings.micro_batch_size

    def evaluate() -> float:
        return held_out_loss(model, held_out_encoded, batch_size, pad_id)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    start = time.perf_counter()
    initial = evaluate()
    best_loss, best_step, best_values = initial, 0, snapshot()
    history: list[dict] = []
    step, stopped, evaluated_last = 0, False, True
    for done in optimizer_steps(model, params, train_encoded, settings, pad_id):
        step = done.step
        record = {"step": step, "train_loss": done.train_loss,
                  "learning_rate": done.learning_rate, "tokens": done.tokens,
                  "seconds": time.perf_counter() - start}
        evaluated_last = bool(settings.eval_every) and step % settings.eval_every == 0
        if evaluated_last:
            record["eval_loss"] = evaluate()
            if record["eval_loss"] < best_loss:
                best_loss, best_step = record["eval_loss"], step
                best_values = snapshot()
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
            best_loss, best_step, best_values = final, step, snapshot()
    with torch.no_grad():
        for param, best in zip(params, best_values, strict=True):
            param.copy_(best)
    recent = [h["train_loss"] for h in history[-10:]]
    result = CatTrainResult(
        steps=step, trainable_parameters=trainable, initial_eval_loss=initial,
        best_eval_loss=best_loss, best_step=best_step,
        final_train_loss=sum(recent) / max(len(recent), 1), stopped_early=stopped,
        seconds=time.perf_counter() - start, history=history,
    )
    if log is not None:
        log(f"{label}: {step} steps in {result.seconds:.1f} s; held-out loss {initial:.4f} at "
            f"start, best {best_loss:.4f} at step {best_step}")
    return result
