"""Selection: the leaderboard of every trial (best validation objective first; with several
seeds, of every candidate over its seeds, `study.seeds`), and the test split, evaluated once,
for the selected trial (or each seed of the selected candidate) only."""

from __future__ import annotations

import tempfile
from pathlib import Path

from soups.names import (
    MLFLOW_RUN_ID,
    OBJECTIVE,
    PARSED,
    TEST,
    TRIAL_ID,
    VALIDATION,
    accuracy_task,
    best_metric,
    task_metric,
)
from study.seeds import PER_SEED, add_test, count_key, mean_stderr, shown
from study.spec import StudySpec
from trainables import tracking
from trainables.evaluator import evaluate_candidate
from trainables.trial_context import ADAPTER_DIR, GENERATIONS_DIR, TrialContext


def leaderboard(results) -> list[dict]:
    """One row per trial, best objective first; failed and early-stopped trials last. A
    trial on a seed axis has its `seed`."""
    from trainables.progress import describe  # lazy: ray

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
            **({"seed": variant["seed"]} if "seed" in variant else {}),
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
    """The leaderboard as a table; over seeds each value is mean ± standard error (n), the
    skills and the time are means."""
    seeded = any(count_key(OBJECTIVE) in r for r in rows)
    value_w, test_w = (22, 22) if seeded else (14, 6)
    # `parsed`: the share of target answers the scorer could read at all, so a candidate that
    # never wrote an answer reads apart from one that answered wrongly.
    print_fn(f"\n{'#':>2}  {'candidate':<44} {'val ' + target:>{value_w}} {'parsed':>6} "
             f"{'test':>{test_w}}  {'skills (val)':<24} {'time':>6}")
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        skills = " ".join(f"{task}={v:.2f}" for k, v in m.items()
                          if (task := accuracy_task(k)) not in (None, target))
        objective = shown(row, OBJECTIVE) if row[OBJECTIVE] is not None else row["status"]
        seconds = sum(v for k, v in m.items() if k.endswith("seconds"))
        name = row["candidate"] + (f" seed {row['seed']}" if "seed" in row else "")
        parsed = m.get(task_metric(VALIDATION, target, PARSED))
        parsed = f"{parsed:.2f}" if parsed is not None else "-"
        print_fn(f"{i:>2}  {name[:44]:<44} {objective:>{value_w}} {parsed:>6} "
                 f"{shown(row, 'test'):>{test_w}}  {skills:<24} {seconds:>5.0f}s")


def checkpoint_adapter(row: dict) -> str | None:
    """The adapter folder in a trial's checkpoint; None for the base model alone."""
    if not row["checkpoint"]:
        raise RuntimeError(f"trial {row['trial']} has no checkpoint")
    adapter = Path(row["checkpoint"]) / ADAPTER_DIR
    return str(adapter) if adapter.is_dir() else None


def _test_trials(spec: StudySpec, context: TrialContext, row: dict) -> list[dict]:
    """The test split of a leaderboard row's finished trials (a trial, or each seed of a
    candidate): each trial's `test` and its run's metrics; the metrics of each."""
    score_key = task_metric(TEST, context.target)
    scored = []
    for trial in [t for t in row.get(PER_SEED, [row]) if t[OBJECTIVE] is not None]:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = evaluate_candidate(context, checkpoint_adapter(trial), TEST,
                                         [context.target], spec.evaluation.test_limit,
                                         Path(tmp))
            if trial["run_id"]:
                tracking.log_metrics(trial["run_id"], metrics)
                tracking.log_artifact(trial["run_id"], tmp, GENERATIONS_DIR)
                tracking.log_generation_tables(trial["run_id"], tmp, GENERATIONS_DIR)
        trial["test"] = metrics[score_key]
        scored.append(metrics)
    if PER_SEED in row:
        add_test(row)
    else:
        row["test"] = scored[0][score_key] if scored else None
    return scored


def evaluate_test_split(spec: StudySpec, context: TrialContext, best: dict, parent: str,
                        log) -> float:
    """The test split, evaluated once, for the selected trial only; of a selected candidate
    over seeds, for each of its finished seeds' trials (each trial's `test`, the candidate's
    mean, standard error and n). Each trial's run gets its metrics, the parent run their
    mean; returns the (mean) score."""
    score_key = task_metric(TEST, context.target)
    scored = _test_trials(spec, context, best)
    mean = (scored[0] if len(scored) == 1
            else {k: mean_stderr(m[k] for m in scored)[0] for k in scored[0]})
    tracking.log_metrics(parent, {best_metric(k): v for k, v in mean.items()})
    if PER_SEED in best:
        log(f"test split of {context.target}: {shown(best, 'test')} over seeds for "
            f"{best['candidate']}")
    else:
        log(f"test split of {context.target}: {mean[score_key]:.3f} for {best['candidate']}")
    return mean[score_key]


def evaluate_test_split_of_all(spec: StudySpec, context: TrialContext, rows: list[dict],
                               best: dict, log) -> None:
    """`evaluation.test_all`: the test split of every other finished candidate too, for a
    comparison of methods on held-out data (a benchmark's table). Selection and export
    still use validation only: the best was chosen before any of these ran."""
    others = [r for r in rows if r is not best and r[OBJECTIVE] is not None]
    for done, row in enumerate(others, 1):
        _test_trials(spec, context, row)
        log(f"test split of {context.target}: {shown(row, 'test')} for {row['candidate']} "
            f"({done}/{len(others)})")
