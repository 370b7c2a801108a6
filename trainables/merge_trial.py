"""The Ray Tune trial: build one candidate model, score it on validation splits, report.

A trial's `variant` names a kind of candidate; each kind is one small function returning the
adapter folder to evaluate (None = the base model alone):
- `base`, `skill` (one skill LoRA), `data_mix` (the DATA-MIX LoRA) use stage-1 adapters;
- `cat_learned` trains CAT weights (reporting every held-out evaluation to Tune, so ASHA
  can stop it) and exports the folded adapter;
- every other name is a merge method of `soups.merge`, applied to the skill LoRAs.
The trial scores the target's validation split (the objective) and each skill's validation
split (retention), logs everything to its MLflow child run, and reports with a checkpoint
holding the adapter, so the study can export the best trial's adapter later.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from soups.sandbox import BWRAP
from trainables import tracking

ADAPTER_DIR = "adapter"
TRIAL_FILE = "trial.json"


@dataclass(frozen=True)
class TaskData:
    source: str  # dataset folder / file / hub id
    splits: dict[str, str]
    mapping: dict | None = None  # soups.data.FieldMapping fields for foreign datasets


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
    adapters: dict[str, dict[str, str]]  # str(rank) -> skill name or "data_mix" -> folder
    evaluation: dict = field(default_factory=dict)
    cat: dict = field(default_factory=dict)
    seed: int = 0


def load_rows(ctx: TrialContext, task: str, split: str, limit: int | None = None) -> list[dict]:
    from soups.data import FieldMapping, load_task_dataset

    data = ctx.tasks[task]
    mapping = FieldMapping(**data.mapping) if data.mapping else None
    rows = load_task_dataset(data.source, data.splits[split], mapping)
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    return list(rows)


def _stage1(ctx: TrialContext, rank, name: str) -> str:
    try:
        return ctx.adapters[str(rank)][name]
    except KeyError:
        raise ValueError(f"no stage-1 adapter {name!r} at rank {rank}; the study trained "
                         f"ranks {sorted(ctx.adapters)}") from None


def _base(ctx, variant, out_dir, report) -> str | None:
    return None


def _skill(ctx, variant, out_dir, report) -> str:
    skill = variant["params"]["skill"]
    if skill not in ctx.skills:
        raise ValueError(f"skill {skill!r} is not a skill of this study: {list(ctx.skills)}")
    return _stage1(ctx, variant["rank"], skill)


def _data_mix(ctx, variant, out_dir, report) -> str:
    return _stage1(ctx, variant["rank"], "data_mix")


def _cat_learned(ctx, variant, out_dir, report) -> str:
    from soups.cat import CatSettings, learn_cat
    from soups.train_settings import TrainSettings

    params = {**ctx.cat, **variant["params"]}
    shape = {k: params.pop(k) for k in ("granularity", "normalisation", "init", "init_values")
             if k in params}
    train = TrainSettings(
        learning_rate=params.pop("learning_rate"), max_steps=params.pop("max_steps"),
        micro_batch_size=params.pop("micro_batch_size"),
        warmup_steps=params.pop("warmup_steps"), eval_every=params.pop("eval_every"),
        loss_on="all", seed=ctx.seed, epochs=1.0)
    skills = [load_rows(ctx, s, "train") for s in ctx.skills]

    def on_step(record: dict) -> None:
        if "eval_loss" in record:
            report({"cat_step": record["step"], "cat_eval_loss": record["eval_loss"],
                    "cat_train_loss": record["train_loss"]})

    adapters = [_stage1(ctx, variant["rank"], s) for s in ctx.skills]
    result = learn_cat(adapters, ctx.model_dir, skills, out_dir,
                       CatSettings(seed=ctx.seed, **shape), train,
                       fraction=params.pop("fraction"), held_out=params.pop("held_out"),
                       on_step=on_step, log=None)
    report({"cat_trainable_parameters": result.trainable_parameters,
            "cat_best_eval_loss": result.best_eval_loss, "cat_best_step": result.best_step})
    return str(out_dir)


def _merge(ctx, variant, out_dir, report) -> str:
    from soups.merge import merge_adapters

    adapters = [_stage1(ctx, variant["rank"], s) for s in ctx.skills]
    merge_adapters(adapters, variant["method"], out_dir, **variant["params"])
    return str(out_dir)


CANDIDATES: dict[str, Callable] = {"base": _base, "skill": _skill, "data_mix": _data_mix,
                                   "cat_learned": _cat_learned}


def candidate_builder(method: str) -> Callable:
    return CANDIDATES.get(method, _merge)


def evaluate_candidate(ctx: TrialContext, adapter: str | None, split: str, tasks,
                       limit: int | None) -> dict[str, float]:
    """Scores of base model + adapter on `tasks` (names) at `split`, as flat metrics."""
    from soups.evaluate import evaluate_rows, load_model

    model, tokenizer = load_model(ctx.model_dir, adapter)
    metrics: dict[str, float] = {}
    for task in tasks:
        rows = load_rows(ctx, task, split, limit)
        scores = evaluate_rows(model, tokenizer, task, rows,
                               ctx.evaluation.get("max_new_tokens", 96),
                               ctx.evaluation.get("batch_size", 32),
                               ctx.evaluation.get("sandbox", BWRAP))
        metrics.update({f"{split}/{k}": v for k, v in scores.metrics().items()})
        metrics[f"{split}/{task}/eval_seconds"] = scores.seconds
    return metrics


def score_validation(ctx: TrialContext, adapter: str | None, build_seconds: float) -> dict:
    """The trial's metrics: validation scores on the target (the objective) and, unless
    turned off, on every skill (retention), plus the time it took to build the candidate."""
    tasks = [ctx.target, *(ctx.skills if ctx.evaluation.get("skills", True) else ())]
    metrics = evaluate_candidate(ctx, adapter, "validation", tasks,
                                 ctx.evaluation.get("validation_limit"))
    metrics["objective"] = metrics[f"validation/{ctx.target}/accuracy"]
    metrics["build_seconds"] = build_seconds
    return metrics


def trial_run_key(study: str, variant: dict) -> str:
    return f"{study}:trial:{json.dumps(variant, sort_keys=True, default=str)}"


def merge_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable (`tune.with_parameters(merge_trial, context=...)`)."""
    import ray.tune
    from ray.tune import Checkpoint

    variant = config["variant"]
    method = variant["method"]
    tracking.configure(context.tracking_uri)
    trial_name = ray.tune.get_context().get_trial_name()
    with tempfile.TemporaryDirectory() as tmp, tracking.tracked_run(
        context.experiment_id, trial_run_key(context.study, variant), trial_name, "trial",
        context.study, context.parent_run_id,
        tags={"method": method, "trial_id": ray.tune.get_context().get_trial_id(),
              **tracking.environment_tags()},
    ) as run_id:
        tracking.log_params(run_id, {"method": method, "rank": variant["rank"],
                                     "seed": context.seed, **variant["params"]})
        out_dir = Path(tmp) / ADAPTER_DIR

        def report_progress(metrics: dict) -> None:
            tracking.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "cat_step"},
                                 step=int(metrics.get("cat_step", 0)))
            ray.tune.report(metrics)

        start = time.perf_counter()
        adapter = candidate_builder(method)(context, variant, out_dir, report_progress)
        build_seconds = time.perf_counter() - start
        metrics = score_validation(context, adapter, build_seconds)
        tracking.log_metrics(run_id, metrics)
        if (out_dir / "cat_weights.json").is_file():
            from soups.cat.plot import plot_cat_weights

            tracking.log_artifact(run_id, out_dir / "cat_weights.json")
            plot = plot_cat_weights(out_dir / "cat_weights.json", Path(tmp) / "cat_weights.png",
                                    names=list(context.skills))
            tracking.log_artifact(run_id, plot)
        # The checkpoint carries the adapter (stage-1 ones are copied) for export.
        keep = Path(tmp) / "checkpoint"
        keep.mkdir()
        if adapter is not None:
            shutil.copytree(adapter, keep / ADAPTER_DIR)
        (keep / TRIAL_FILE).write_text(json.dumps(
            {"variant": variant, "run_id": run_id, "metrics": metrics}, default=str))
        ray.tune.report({**metrics, "mlflow_run_id": run_id},
                        checkpoint=Checkpoint.from_directory(str(keep)))
