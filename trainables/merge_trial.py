"""The Ray Tune trial: build one candidate model, score it on validation splits, report.

A trial's `variant` names a kind of candidate; each kind is one small function returning the
adapter folder to evaluate (None = the base model alone):
- `base`, `skill` (one skill LoRA), `data_mix` (the DATA-MIX LoRA) use stage-1 adapters;
- `cat_learned` trains CAT weights (reporting every held-out evaluation to Tune, so ASHA
  can stop it) and exports the folded adapter;
- every other name is a merge method of `soups.merge`, applied to the skill LoRAs.
On a study with a seed axis (`search.seeds`) the variant carries the trial's seed: its
stage-1 adapters are those fine-tuned with that seed, and it seeds the CAT training and a
random merge (DARE) whose seed the search space leaves open.
The trial scores the target's validation split (the objective) and each skill's validation
split (retention), logs everything to its MLflow child run, and reports with a checkpoint
holding the adapter, so the study can export the best trial's adapter later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soups.names import (
    BUILD_SECONDS,
    CAT_BEST_EVAL_LOSS,
    CAT_BEST_STEP,
    CAT_EVAL_LOSS,
    CAT_STEP,
    CAT_TRAIN_LOSS,
    CAT_TRAINABLE_PARAMETERS,
    OBJECTIVE,
    VALIDATION,
    task_metric,
)
from soups.task_data import TaskData

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


def load_rows(ctx: TrialContext, task: str, split: str, limit: int | None = None) -> list[dict]:
    return ctx.tasks[task].rows(split, limit)


def trial_seed(ctx: TrialContext, variant: dict) -> int:
    """The seed of a trial's CAT training (weights and data), logged as its `seed`: its
    variant's on a seed axis, else the study's `search.seed`."""
    return variant.get("seed", ctx.seed)


def _stage1(ctx: TrialContext, variant: dict, name: str) -> str:
    """The stage-1 adapter `name` at the trial's rank, fine-tuned with the trial's seed."""
    seed, rank = str(variant.get("seed", ctx.stage1_seed)), variant["rank"]
    try:
        return ctx.adapters[seed][str(rank)][name]
    except KeyError:
        raise ValueError(f"no stage-1 adapter {name!r} at rank {rank} with seed {seed}; the "
                         f"study trained ranks {sorted(ctx.adapters.get(seed, {}))} with "
                         f"seeds {sorted(ctx.adapters)}") from None


def _base(ctx, variant, out_dir, report) -> str | None:
    return None


def _skill(ctx, variant, out_dir, report) -> str:
    skill = variant["params"]["skill"]
    if skill not in ctx.skills:
        raise ValueError(f"skill {skill!r} is not a skill of this study: {list(ctx.skills)}")
    return _stage1(ctx, variant, skill)


def _data_mix(ctx, variant, out_dir, report) -> str:
    return _stage1(ctx, variant, "data_mix")


def _cat_learned(ctx, variant, out_dir, report) -> str:
    """The paper's CAT recipe (`PAPER_CAT_TRAIN`) with the study's `cat` section and the
    trial's parameters over it."""
    from dataclasses import fields, replace

    from soups.cat import PAPER_CAT_TRAIN, CatSettings, learn_cat

    params = {**ctx.cat, **variant["params"]}
    shape = {f.name: params.pop(f.name) for f in fields(CatSettings) if f.name in params}
    fraction, count, held_out = params.pop("fraction"), params.pop("count"), params.pop(
        "held_out")
    seed = trial_seed(ctx, variant)
    train = replace(PAPER_CAT_TRAIN, seed=seed, **params)
    skills = [load_rows(ctx, s, "train") for s in ctx.skills]

    def on_step(record: dict) -> None:
        if "eval_loss" in record:
            report({CAT_STEP: record["step"], CAT_EVAL_LOSS: record["eval_loss"],
                    CAT_TRAIN_LOSS: record["train_loss"]})

    adapters = [_stage1(ctx, variant, s) for s in ctx.skills]
    result = learn_cat(adapters, ctx.model_dir, skills, out_dir,
                       CatSettings(seed=seed, **shape), train,
                       fraction=None if count else fraction, count=count,
                       held_out=held_out,
                       on_step=on_step, log=None)
    report({CAT_TRAINABLE_PARAMETERS: result.trainable_parameters,
            CAT_BEST_EVAL_LOSS: result.best_eval_loss, CAT_BEST_STEP: result.best_step})
    return str(out_dir)


def _merge_method(ctx, variant, out_dir, report) -> str:
    from soups.merge import merge_adapters
    from soups.merge.methods import REGISTRY

    adapters = [_stage1(ctx, variant, s) for s in ctx.skills]
    params = dict(variant["params"])
    if "seed" in variant and REGISTRY.get(variant["method"]).random:
        params.setdefault("seed", variant["seed"])  # each seed its own masks
    merge_adapters(adapters, variant["method"], out_dir, **params)
    return str(out_dir)


@dataclass(frozen=True)
class CandidateKind:
    """A kind of trial besides the merge methods: how it builds its candidate, which
    parameters a search space may give it (None: declared elsewhere, see study/resolve.py),
    whether it is built from stage-1 adapters (so its variants carry a rank), and which
    stage-1 adapters besides the skill LoRAs it needs."""

    build: Callable  # (context, variant, out_dir, report) -> adapter folder, or None
    parameters: frozenset[str] | None = frozenset()
    uses_stage1: bool = True
    needs: tuple[str, ...] = ()


CANDIDATES: dict[str, CandidateKind] = {
    "base": CandidateKind(_base, uses_stage1=False),
    "skill": CandidateKind(_skill, frozenset({"skill"})),
    "data_mix": CandidateKind(_data_mix, needs=("data_mix",)),
    "cat_learned": CandidateKind(_cat_learned, parameters=None),
}
MERGE_METHOD = CandidateKind(_merge_method, parameters=None)  # every method of soups.merge


def candidate_kind(method: str) -> CandidateKind:
    return CANDIDATES.get(method, MERGE_METHOD)


def candidate_builder(method: str) -> Callable:
    return candidate_kind(method).build


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
    from trainables.trial_run import build_candidate, cat_artifacts, trial_run

    variant = config["variant"]
    with trial_run(context, variant) as run:
        out_dir = run.work_dir / ADAPTER_DIR
        adapter, build_seconds = build_candidate(context, variant, out_dir, run.progress)
        generations = run.work_dir / GENERATIONS_DIR
        metrics = score_validation(context, adapter, build_seconds, generations)
        run.finish(metrics, adapter, {**cat_artifacts(out_dir, run.work_dir, context.skills),
                                      GENERATIONS_DIR: generations})
