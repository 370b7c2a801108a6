"""What a trial gets besides its variant: the study's `TrialContext` (passed to every trial
with `tune.with_parameters`) and the helpers a candidate builder reads it with (its rows, its
seed, its stage-1 adapters, stage 1's recipe). The bottom of `trainables/`: the candidate
registry, the evaluators and both trial drivers stand on it; it imports none of them.

On a study with a seed axis (`search.seeds`) the variant carries the trial's seed: its
stage-1 adapters are those fine-tuned with that seed, and it seeds the CAT training and a
random merge (DARE) whose seed the search space leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from soups.tasks.task_data import TaskData
from soups.training.train_settings import LoraSettings, TrainSettings

ADAPTER_DIR = "adapter"
TRIAL_FILE = "trial.json"
GENERATIONS_DIR = "generations"  # <split>/<task>.jsonl: every answer, as the trial scored it


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its variant (passed with `tune.with_parameters`)."""

    study: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str
    model_dir: str
    skills: tuple[str, ...]
    target: str
    tasks: dict[str, TaskData]
    # str(seed) -> str(rank) -> skill name or "data_mix" -> folder
    adapters: dict[str, dict[str, dict[str, str]]]
    evaluation: dict  # the study's `evaluation` section, every key (study/spec.py)
    cat: dict  # the study's `cat` section, every key: CAT trials' defaults
    # Without a seed axis (no seed in the variant): the CAT seed (`search.seed`) and the
    # seed of the study's one set of stage-1 adapters (`finetune.seed`).
    seed: int = 0
    stage1_seed: int = 0
    evaluators: tuple[str, ...] = ()  # the study's resident evaluators (actor names)
    # Stage 1's recipe, for a LoRA a trial trains itself (the controls): the study's
    # `finetune` section as LoraSettings at rank 1 (its alpha the alpha ratio) and
    # TrainSettings; None where the study gave none.
    finetune_lora: LoraSettings | None = None
    finetune_train: TrainSettings | None = None


def finetune_settings(ctx: TrialContext, rank: int, seed: int
                      ) -> tuple[LoraSettings, TrainSettings]:
    """(LoraSettings, TrainSettings) of a LoRA a trial trains as stage 1 would at `rank`,
    seeded with `seed`."""
    if ctx.finetune_lora is None or ctx.finetune_train is None:
        raise ValueError(f"study {ctx.study}: no stage-1 recipe in the trial's context")
    lora = replace(ctx.finetune_lora, rank=rank, alpha=ctx.finetune_lora.alpha * rank)
    return lora, replace(ctx.finetune_train, seed=seed)


def load_rows(ctx: TrialContext, task: str, split: str, limit: int | None = None) -> list[dict]:
    return ctx.tasks[task].rows(split, limit)


def trial_seed(ctx: TrialContext, variant: dict) -> int:
    """The seed of a trial's CAT training (weights and data), logged as its `seed`: its
    variant's on a seed axis, else the study's `search.seed`."""
    return variant.get("seed", ctx.seed)


def stage1_adapter(ctx: TrialContext, variant: dict, name: str) -> str:
    """The stage-1 adapter `name` at the trial's rank, fine-tuned with the trial's seed."""
    seed, rank = str(variant.get("seed", ctx.stage1_seed)), variant["rank"]
    try:
        return ctx.adapters[seed][str(rank)][name]
    except KeyError:
        raise ValueError(f"no stage-1 adapter {name!r} at rank {rank} with seed {seed}; the "
                         f"study trained ranks {sorted(ctx.adapters.get(seed, {}))} with "
                         f"seeds {sorted(ctx.adapters)}") from None
