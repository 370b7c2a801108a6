"""Settings of a CAT run: how the learned weights are shaped and started, and the paper's
training recipe as a preset.

CAT (LoRA Soups, Prabhakar et al. 2024, https://arxiv.org/abs/2410.13025) learns one scalar
per (module, LoRA). The official code uses one logit per LoRA per wrapped module, drawn from
N(0, 1) and normalised with a softmax across the LoRAs of that module; the other values below
are the variants listed in `method.md`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from soups.errors import SoupsError
from soups.training.train_settings import TrainSettings

Granularity = Literal["module", "layer", "global"]
Normalisation = Literal["softmax", "none"]
Init = Literal["randn", "uniform", "ones", "norm", "values"]

GRANULARITIES: tuple[str, ...] = ("module", "layer", "global")
NORMALISATIONS: tuple[str, ...] = ("softmax", "none")
INITS: tuple[str, ...] = ("randn", "uniform", "ones", "norm", "values")


class CatError(SoupsError):
    """CAT settings or inputs that cannot work together (init values that do not match the
    adapters, a skill mix larger than the skills, ...); the message names the value."""


@dataclass(frozen=True)
class CatSettings:
    """Shape and start of the learned weights.

    - granularity: `module` = one weight per LoRA per wrapped module (official);
      `layer` = shared by the modules of one transformer layer; `global` = one per LoRA.
    - normalisation: `softmax` over the LoRAs present in a module (official), or `none`
      (the weights are free scalars).
    - init: the starting mixture a (after normalisation): `randn` = logits N(0, 1) (official,
      seeded; under `none` the scalars themselves are N(0, 1)); `uniform` = 1/k each;
      `ones` = 1 each (needs `none`: a softmax cannot give it); `norm` = proportional to
      1 / ||s_i B_i A_i||_F of each LoRA in the group, scaled to sum to 1; `values` = the
      k numbers in `init_values` (under softmax: positive and summing to 1).
    """

    granularity: Granularity = "module"
    normalisation: Normalisation = "softmax"
    init: Init = "randn"
    init_values: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise CatError(f"CAT granularity must be one of {GRANULARITIES}, "
                           f"got {self.granularity!r}")
        if self.normalisation not in NORMALISATIONS:
            raise CatError(f"CAT normalisation must be one of {NORMALISATIONS}, "
                           f"got {self.normalisation!r}")
        if self.init not in INITS:
            raise CatError(f"CAT init must be one of {INITS} (or explicit values), "
                           f"got {self.init!r}")
        if self.init == "ones" and self.normalisation == "softmax":
            raise CatError("CAT init 'ones' needs normalisation 'none': a softmax over k "
                           "LoRAs sums to 1, so it cannot start every weight at 1")
        if (self.init == "values") != (self.init_values is not None):
            raise CatError("CAT init 'values' and init_values go together: give "
                           f"init='values' with init_values, got init={self.init!r}, "
                           f"init_values={self.init_values!r}")
        if self.init_values is not None:
            values = tuple(float(v) for v in self.init_values)
            object.__setattr__(self, "init_values", values)
            if not values or not all(math.isfinite(v) for v in values):
                raise CatError(f"CAT init_values must be finite numbers, got {values}")
            if self.normalisation == "softmax" and (
                min(values) <= 0 or abs(sum(values) - 1.0) > 1e-6
            ):
                raise CatError(
                    "CAT init_values under softmax are the starting mixture: positive and "
                    f"summing to 1, got {list(values)} (sum {sum(values):g})"
                )


# The paper's CAT recipe (method.md): one epoch, AdamW lr 1e-4, 100 warm-up steps,
# micro-batch 6, length 256, loss on the whole sequence.
PAPER_CAT_TRAIN = TrainSettings(
    learning_rate=1e-4, epochs=1.0, micro_batch_size=6, max_length=256, warmup_steps=100,
    weight_decay=0.0, loss_on="all", eval_every=100,
)
PAPER_HELD_OUT = 120  # held-out examples for best-checkpoint selection
PAPER_FRACTION = 0.05  # share of each skill's training data in the CAT mix
