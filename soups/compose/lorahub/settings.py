"""Settings of a LoraHub search (Huang et al. 2023, https://arxiv.org/abs/2307.13269, code
https://github.com/sail-sg/lorahub): how many objective evaluations, on how many skill-mix
examples, within which bounds, composed how, regularised how much. Pure: no torch here, so
the command line and a trial's parameter check read the defaults for free.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

from soups.errors import SoupsError

Composition = Literal["lorahub", "exact"]
COMPOSITION_NAMES: tuple[str, ...] = ("lorahub", "exact")  # soups.compose.lorahub.compose

# The defaults, each with its reason.
BUDGET = 40  # LoraHub's `max_inference_step`: objective evaluations of one search
EXAMPLES = 20  # few-shot rows of the skill mix (LoraHub uses 5 to 20 examples per task)
BOUNDS = (-1.5, 1.5)  # LoraHub's ng.p.Array(lower=[-1.5] * k, upper=[1.5] * k)
L1 = 0.05  # LoraHub's default_l1_regularization: 0.05 * mean |w|
BATCH_SIZE = 20  # rows per forward pass; LoraHub scores its few examples as one batch


class LorahubError(SoupsError):
    """LoraHub settings or inputs that cannot work together; the message names the value."""


def _is_int(value) -> bool:  # numpy integers too (a search space may sample them)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class LorahubSettings:
    """One LoraHub search.

    - budget: objective evaluations (each one composes the LoRAs and scores the examples);
    - examples: rows drawn from the skill mix (`soups.compose.cat.mix.skill_mix`, evenly over the
      skills' training rows), scored by teacher forcing on their completion tokens;
    - bounds: (low, high) box of every weight;
    - composition: `lorahub` = A = sum w_i A_i, B = sum w_i B_i (LoraHub's own code: cross
      terms B_i A_j, equal ranks and the same modules needed); `exact` = sum w_i s_i B_i A_i
      as one concatenated LoRA of rank sum r_i (as `task_arithmetic`);
    - l1: weight of the regulariser mean |w| added to the loss;
    - seed: of the skill mix and of the optimizer;
    - init: the starting weights (default 0 each, as LoraHub), one per adapter;
    - batch_size, max_length: how the examples are scored (max_length None: the model's
      context length, as `soups.evaluation.evaluate.completion_loss`).
    """

    budget: int = BUDGET
    examples: int = EXAMPLES
    bounds: tuple[float, float] = BOUNDS
    composition: Composition = "lorahub"
    l1: float = L1
    seed: int = 0
    init: tuple[float, ...] | None = None
    batch_size: int = BATCH_SIZE
    max_length: int | None = None

    def __post_init__(self):
        for name in ("budget", "examples", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise LorahubError(f"LoraHub {name} must be an integer >= 1, got {value!r}")
        if self.max_length is not None and (not _is_int(self.max_length)
                                            or self.max_length < 2):
            raise LorahubError(f"LoraHub max_length must be an integer >= 2 or None, got "
                               f"{self.max_length!r}")
        if self.composition not in COMPOSITION_NAMES:
            raise LorahubError(f"LoraHub composition must be one of {COMPOSITION_NAMES}, got "
                               f"{self.composition!r}")
        bounds = tuple(self.bounds)
        if len(bounds) != 2 or not all(_finite(b) for b in bounds):
            raise LorahubError(f"LoraHub bounds must be two finite numbers (low, high), got "
                               f"{self.bounds!r}")
        low, high = (float(b) for b in bounds)
        if low >= high:
            raise LorahubError(f"LoraHub bounds: low must be below high, got low={low:g}, "
                               f"high={high:g}")
        object.__setattr__(self, "bounds", (low, high))
        if not _finite(self.l1) or self.l1 < 0:
            raise LorahubError(f"LoraHub l1 must be a finite number >= 0, got {self.l1!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise LorahubError(f"LoraHub seed must be an integer >= 0, got {self.seed!r}")
        if self.init is None and not low <= 0.0 <= high:
            raise LorahubError(f"LoraHub bounds [{low:g}, {high:g}] exclude the default "
                               "start 0: give init weights inside them")
        if self.init is not None:
            init = tuple(self.init)
            if not init or not all(_finite(v) for v in init):
                raise LorahubError(f"LoraHub init must be finite numbers, got {self.init!r}")
            outside = [v for v in init if not low <= v <= high]
            if outside:
                raise LorahubError(f"LoraHub init {list(init)}: {outside[0]:g} is outside "
                                   f"the bounds [{low:g}, {high:g}]")
            object.__setattr__(self, "init", tuple(float(v) for v in init))
        # Plain Python numbers (a search space may sample numpy ones) in records and JSON.
        for name in ("budget", "examples", "batch_size", "seed", "max_length"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "l1", float(self.l1))

    def initial_weights(self, k: int) -> list[float]:
        """The k starting weights: `init`, else 0 each (LoraHub's `init=[0] * k`)."""
        if self.init is None:
            return [0.0] * k
        if len(self.init) != k:
            raise LorahubError(f"LoraHub init has {len(self.init)} weights for {k} adapters")
        return list(self.init)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
        value)
