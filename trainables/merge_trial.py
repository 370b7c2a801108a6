"""The Ray Tune trial: build one candidate model, score it on validation splits, report.

A trial's `variant` names a kind of candidate (`trainables/candidates.py`, the registry:
`base`, `skill`, `data_mix`, `cat_learned`, every merge method, ...), whose builder returns
the adapter folder to evaluate (None = the base model alone).
On a study with a seed axis (`search.seeds`) the variant carries the trial's seed: its
stage-1 adapters are those fine-tuned with that seed, and it seeds the CAT training and a
random merge (DARE) whose seed the search space leaves open.
The trial scores the target's validation split (the objective) and each skill's validation
split (retention), logs everything to its MLflow child run, and reports with a checkpoint
holding the adapter, so the study can export the best trial's adapter later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from soups.names import BUILD_SECONDS, OBJECTIVE, VALIDATION, task_metric
from soups.task_data import TaskData
from soups.train_settings import LoraSettings, TrainSettings

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


def evaluate_candidate(ctx: TrialContext, adapter: str | None, split: str, tasks,
                       limit: int | None, records_dir: Path | None = None) -> dict[str, float]:
    """Scores of base model + adapter on `tasks` (names) at `split`, as flat metrics, by one
    of the study's resident evaluators (`trainables/evaluator.py`), or in this process when
    the study has none. Each task's answers go to `records_dir/<split>/<task>.jsonl` when
    given; a task with no rows at `split` (a skill without validation rows) is left out."""
    if ctx.evaluators:
        from trainables.evaluator import evaluate_remote

        result = evaluate_remote(ctx.evaluators, f"{split}:{adapter}", adapter, split,
                                 tasks, limit)
    else:
        result = _evaluate_here(ctx, adapter, split, tasks, limit)
    if records_dir is not None:
        for task, lines in result["records"].items():
            out = Path(records_dir) / split / f"{task}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(lines)
    return result["metrics"]


def _evaluate_here(ctx: TrialContext, adapter: str | None, split: str, tasks,
                   limit: int | None) -> dict:
    """The evaluators' work for one candidate, in this process (the base loaded here)."""
    from soups.resident import ResidentModel
    from trainables.evaluator import Candidate, adapter_files, evaluate_together

    resident = ResidentModel(ctx.model_dir, ctx.evaluation["device"], ctx.evaluation["dtype"])
    candidate = Candidate(adapter_files(adapter), split, tuple(tasks), limit)
    return evaluate_together(resident, ctx.tasks, ctx.evaluation, [candidate])[0]


def generation_params(ctx: TrialContext) -> dict:
    """Every task's generation and scoring settings, for the trial's MLflow parameters."""
    from dataclasses import asdict

    return {task: {"generation": data.generation(ctx.evaluation).params(),
                   "scorer": asdict(data.scorer())} for task, data in ctx.tasks.items()}


def score_validation(ctx: TrialContext, adapter: str | None, build_seconds: float,
                     records_dir: Path | None = None) -> dict:
    """The trial's metrics: validation scores on the target (the objective) and, unless
    turned off, on every skill (retention), plus the time it took to build the candidate."""
    tasks = [ctx.target, *(ctx.skills if ctx.evaluation["skills"] else ())]
    metrics = evaluate_candidate(ctx, adapter, VALIDATION, tasks,
                                 ctx.evaluation["validation_limit"], records_dir)
    metrics[OBJECTIVE] = metrics[task_metric(VALIDATION, ctx.target)]
    metrics[BUILD_SECONDS] = build_seconds
    return metrics


def merge_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable (`tune.with_parameters(merge_trial, context=...)`): the
    whole trial in this process."""
    from trainables.trial_run import build_candidate, candidate_artifacts, trial_run

    variant = config["variant"]
    with trial_run(context, variant) as run:
        out_dir = run.work_dir / ADAPTER_DIR
        adapter, build_seconds = build_candidate(context, variant, out_dir, run.progress)
        generations = run.work_dir / GENERATIONS_DIR
        metrics = score_validation(context, adapter, build_seconds, generations)
        artifacts = candidate_artifacts(variant, out_dir, run.work_dir, context.skills)
        run.finish(metrics, adapter, {**artifacts, GENERATIONS_DIR: generations})
