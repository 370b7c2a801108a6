"""Defaults of the trials that learn on the skill mix (learned CAT, the mixture of LoRA
experts): the study file's `cat` section, which a search space may override per method.
Pure: pydantic only, so the study spec and the candidate registry read the same fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CatTraining(BaseModel):
    """Defaults of CAT weight (and MoE router) training in trials."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(5e-3, gt=0)
    max_steps: int = Field(60, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    warmup_steps: int = Field(10, ge=0)
    fraction: float = Field(0.1, gt=0, le=1)  # share of each skill's training data
    # Or a fixed size: this many examples in all, split evenly over the skills (the paper:
    # one epoch over 10k); it wins over `fraction` when set.
    count: int | None = Field(None, ge=1)
    held_out: int = Field(64, ge=1)  # examples for the best-checkpoint loss
    eval_every: int = Field(10, ge=1)
