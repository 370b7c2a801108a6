"""Selection: the leaderboard of every trial (best validation objective first), and the
test split, evaluated once, for the selected trial only."""

from __future__ import annotations

import tempfile
from pathlib import Path

from soups.names import (
    MLFLOW_RUN_ID,
    OBJECTIVE,
    TEST,
    TRIAL_ID,
    VALIDATION,
    accuracy_task,
    best_metric,
    task_metric,
)
from study.spec import StudySpec
from trainables import tracking
from trainables.merge_trial import ADAPTER_DIR, GENERATIONS_DIR, TrialContext


def leaderboard(results) -> list[dict]:
    """One row per trial, best objective first; failed and early-stopped trials last."""
    from trainables.progress import describe

    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        variant = config.get("variant", {})
        status = "failed" if result.error else (
            "finished" if OBJECTIVE in metrics else "stopped early")
        rows.append({
            "trial": metrics.get(TRIAL_ID) or Path(result.path).name,
            "candidate": describe(config), "method": variant.get("method"),
            "rank": variant.get("rank"), "params": variant.get("params", {}),
            "status": status, OBJECTIVE: metrics.get(OBJECTIVE),
            "metrics": {k: v for k, v in metrics.items()
                        if k.startswith(f"{VALIDATION}/") or k.endswith("seconds")},
            "run_id": metrics.get(MLFLOW_RUN_ID),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, -(r[OBJECTIVE] or 0.0)))
    return rows


def print_leaderboard(rows: list[dict], target: str, print_fn=print) -> None:
    print_fn(f"\n{'#':>2}  {'candidate':<44} {'val ' + target:>14} {'test':>6}  "
             f"{'skills (val)':<24} {'time':>6}")
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        skills = " ".join(f"{task}={v:.2f}" for k, v in m.items()
                          if (task := accuracy_task(k)) not in (None, target))
        objective = f"{row[OBJECTIVE]:.3f}" if row[OBJECTIVE] is not None else row["status"]
        test = row.get("test")
        seconds = sum(v for k, v in m.items() if k.endswith("seconds"))
        print_fn(f"{i:>2}  {row['candidate'][:44]:<44} {objective:>14} "
                 f"{(f'{test:.3f}' if test is not None else '-'):>6}  {skills:<24} "
                 f"{seconds:>5.0f}s")


def checkpoint_adapter(row: dict) -> str | None:
    """The adapter folder in a trial's checkpoint; None for the base model alone."""
    if not row["checkpoint"]:
        raise RuntimeError(f"trial {row['trial']} has no checkpoint")
    adapter = Path(row["checkpoint"]) / ADAPTER_DIR
    return str(adapter) if adapter.is_dir() else None


def evaluate_test_split(spec: StudySpec, context: TrialContext, best: dict, parent: str,
                        log) -> float:
    """The test split, evaluated once, for the selected trial only."""
    from trainables.merge_trial import evaluate_candidate

    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate_candidate(context, checkpoint_adapter(best), TEST,
                                     [context.target], spec.evaluation.test_limit, Path(tmp))
        if best["run_id"]:
            tracking.log_metrics(best["run_id"], metrics)
            tracking.log_artifact(best["run_id"], tmp, GENERATIONS_DIR)
    score = metrics[task_metric(TEST, context.target)]
    tracking.log_metrics(parent, {best_metric(k): v for k, v in metrics.items()})
    log(f"test split of {context.target}: {score:.3f} for {best['candidate']}")
    return score
