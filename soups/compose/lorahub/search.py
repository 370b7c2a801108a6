"""LoraHub's gradient-free search of one weight per LoRA (Huang et al. 2023,
https://arxiv.org/abs/2307.13269): Nevergrad's NGOpt over the box `bounds`, started at
`init` (0 each), minimising loss(w) + l1 * mean |w|, with exactly `budget` evaluations.

As in LoraHub's `lorahub_learning` (https://github.com/sail-sg/lorahub): `ng.p.Array(init,
lower, upper)` and `ng.optimizers.NGOpt(parametrization, budget)`. Unlike it: ask/tell
instead of `minimize`, so each evaluation is reported as it happens; the optimizer is seeded
through its parametrization's random state, not numpy's global one; and the result is the
best evaluated point (its objective is known), with NGOpt's own recommendation beside it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from soups.compose.lorahub.settings import LorahubError, LorahubSettings

OnEvaluation = Callable[[dict], None]


@dataclass
class LorahubResult:
    weights: list[float]  # the best evaluated weights, one per adapter
    objective: float  # their loss + l1 * mean |w|
    loss: float
    step: int  # the evaluation (from 1) that found them
    recommended_weights: list[float]  # NGOpt's recommendation after the last evaluation
    evaluations: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    adapter_dir: Path | None = None  # where `lorahub_merge` wrote the composed adapter

    def summary(self) -> dict:
        """Everything but the history (for provenance and trackers)."""
        return {k: (str(v) if isinstance(v, Path) else v)
                for k, v in self.__dict__.items() if k != "history"}


def regularised(loss: float, weights: Sequence[float], l1: float) -> float:
    """LoraHub's objective: loss + l1 * mean |w| (`default_l1_regularization`)."""
    return loss + l1 * sum(abs(w) for w in weights) / len(weights)


def search_weights(loss_of: Callable[[list[float]], float], k: int,
                   settings: LorahubSettings = LorahubSettings(),
                   on_evaluation: OnEvaluation | None = None) -> LorahubResult:
    """Minimise `regularised(loss_of(w), w, settings.l1)` over w in bounds^k with NGOpt, in
    exactly `settings.budget` calls of `loss_of`. After each, `on_evaluation(record)` gets
    {"step", "weights", "loss", "regularised_loss" (loss + l1 term: the objective),
    "best_regularised_loss"}. Seeded by `settings.seed`.
    A non-finite loss is told to the optimizer as +inf (the worst value) and recorded."""
    import nevergrad as ng  # lazy: nevergrad
    import numpy as np  # lazy: numpy

    if k < 1:
        raise LorahubError("LoraHub: no adapters to weigh")
    low, high = settings.bounds
    parametrization = ng.p.Array(init=np.array(settings.initial_weights(k), dtype=float),
                                 lower=np.full(k, low), upper=np.full(k, high))
    parametrization.random_state = np.random.RandomState(settings.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=settings.budget,
                                    num_workers=1)
    start = time.perf_counter()
    history: list[dict] = []
    best: dict | None = None
    with warnings.catch_warnings():
        # NGOpt's COBYLA (scipy) resets an option nevergrad sets, at every ask: not the user's.
        warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)
        # A non-finite objective is told as inf on purpose; nevergrad clips it and says so.
        warnings.filterwarnings("ignore", message="Clipping very high value")
        for step in range(1, settings.budget + 1):
            best = _evaluate(optimizer, loss_of, settings, step, history, best, on_evaluation)
        recommended = [float(w) for w in optimizer.provide_recommendation().value]
    if best is None:
        raise LorahubError(f"LoraHub: every one of the {settings.budget} evaluations gave a "
                           f"non-finite objective (last loss {history[-1]['loss']})")
    return LorahubResult(weights=best["weights"], objective=best["regularised_loss"],
                         loss=best["loss"], step=best["step"], recommended_weights=recommended,
                         evaluations=len(history), seconds=time.perf_counter() - start,
                         history=history)


def _evaluate(optimizer, loss_of, settings: LorahubSettings, step: int, history: list[dict],
              best: dict | None, on_evaluation: OnEvaluation | None) -> dict | None:
    """One ask, evaluation and tell; appends the record and returns the best record so far."""
    candidate = optimizer.ask()
    weights = [float(w) for w in candidate.value]
    loss = float(loss_of(weights))
    objective = regularised(loss, weights, settings.l1)
    optimizer.tell(candidate, objective if math.isfinite(objective) else math.inf)
    record = {"step": step, "weights": weights, "loss": loss, "regularised_loss": objective}
    if math.isfinite(objective) and (best is None or objective < best["regularised_loss"]):
        best = record
    record["best_regularised_loss"] = best["regularised_loss"] if best is not None else math.inf
    history.append(record)
    if on_evaluation is not None:
        on_evaluation(record)
    return best
