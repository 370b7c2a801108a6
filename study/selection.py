"""Selection: the leaderboard of every trial (best validation objective first), and the
test split, evaluated once, for the selected trial only."""

from __future__ import annotations

from pathlib import Path

from study.spec import StudySpec
from trainables import tracking
from trainables.merge_trial import ADAPTER_DIR, TrialContext


def leaderboard(results) -> list[dict]:
    """One row per trial, best objective first; failed and early-stopped trials last."""
    from trainables.progress import describe

    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        variant = config.get("variant", {})
        status = "failed" if result.error else (
            "finished" if "objective" in metrics else "stopped early")
        rows.append({
            "trial": metrics.get("trial_id") or Path(result.path).name,
            "candidate": describe(config), "method": variant.get("method"),
            "rank": variant.get("rank"), "params": variant.get("params", {}),
            "status": status, "objective": metrics.get("objective"),
            "metrics": {k: v for k, v in metrics.items()
                        if k.startswith("validation/") or k.endswith("seconds")},
            "run_id": metrics.get("mlflow_run_id"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    rows.sort(key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0)))
    return rows


def print_leaderboard(rows: list[dict], target: str, print_fn=print) -> None:
    print_fn(f"\n{'#':>2}  {'candidate':<44} {'val ' + target:>14} {'test':>6}  "
             f"{'skills (val)':<24} {'time':>6}")
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        skills = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in m.items()
                          if k.endswith("/accuracy") and f"/{target}/" not in k)
        objective = f"{row['objective']:.3f}" if row["objective"] is not None else row["status"]
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

    metrics = evaluate_candidate(context, checkpoint_adapter(best), "test", [context.target],
                                 spec.evaluation.test_limit)
    score = metrics[f"test/{context.target}/accuracy"]
    if best["run_id"]:
        tracking.log_metrics(best["run_id"], metrics)
    tracking.log_metrics(parent, {f"best/{k}": v for k, v in metrics.items()})
    log(f"test split of {context.target}: {score:.3f} for {best['candidate']}")
    return score
