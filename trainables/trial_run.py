"""One trial's life cycle, shared by the local trial (`merge_trial`) and the cluster trial
driver (`cluster_trial`): its MLflow run (found again by its key on a resumed study), its
parameters, its progress reports, and its end: metrics, CAT artifacts, the checkpoint
(adapter + `trial.json`) and the final Tune report.

Also the part of the work both run the same way: building the candidate and timing it, and
the files its kind leaves for MLflow.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from soups.names import (
    METHOD_TAG,
    MLFLOW_RUN_ID,
    ROLE_TRIAL,
    STEP_KEYS,
    TRIAL_ID,
    TRIAL_NAME_TAG,
    candidate_label,
    progress_step,
)
from trainables import tracking
from trainables.candidates import candidate_kind
from trainables.trial_context import (
    ADAPTER_DIR,
    GENERATIONS_DIR,
    TRIAL_FILE,
    TrialContext,
    trial_seed,
)


def trial_run_key(study: str, variant: dict) -> str:
    return f"{study}:trial:{json.dumps(variant, sort_keys=True, default=str)}"


def build_candidate(context: TrialContext, variant: dict, out_dir: Path,
                    report: Callable[[dict], None]) -> tuple[str | None, float]:
    """The candidate's adapter folder (None: the base model alone) and seconds to build it."""
    start = time.perf_counter()
    adapter = candidate_kind(variant["method"]).build(context, variant, out_dir, report)
    return adapter, time.perf_counter() - start


def candidate_artifacts(variant: dict, out_dir: Path, work_dir: Path, skills
                        ) -> dict[str, Path]:
    """The files the candidate's kind leaves for MLflow (a learned CAT's weights and heat
    map, LoraHub's search history, ...)."""
    return candidate_kind(variant["method"]).artifacts(out_dir, work_dir, tuple(skills))


class TrialRun:
    """The open MLflow run of a Tune trial, and its reports to Tune."""

    def __init__(self, run_id: str, name: str, work_dir: Path, variant: dict):
        self.run_id = run_id
        self.name = name  # Tune's trial name
        self.work_dir = work_dir  # a temporary folder, removed when the trial ends
        self.variant = variant

    def progress(self, metrics: Mapping[str, float]) -> None:
        """An intermediate result (CAT's held-out loss, LoraHub's objective, at a step): to
        MLflow and Tune."""
        import ray.tune  # lazy: ray

        tracking.log_metrics(self.run_id, {k: v for k, v in metrics.items()
                                           if k not in STEP_KEYS},
                             step=progress_step(metrics) or 0)
        ray.tune.report(dict(metrics))

    def finish(self, metrics: dict, adapter: str | Path | None, artifacts: Mapping[str, Path],
               record: Mapping | None = None) -> None:
        """Log the final metrics and artifacts, and report them to Tune with a checkpoint
        holding the adapter (stage-1 ones are copied) and `trial.json`, for export."""
        import ray.tune  # lazy: ray
        from ray.tune import Checkpoint  # lazy: ray

        tracking.log_metrics(self.run_id, metrics)
        for name, path in artifacts.items():  # a folder keeps its name in the run
            tracking.log_artifact(self.run_id, path, name if Path(path).is_dir() else None)
            if name == GENERATIONS_DIR and Path(path).is_dir():
                tracking.log_generation_tables(self.run_id, path, GENERATIONS_DIR)
        keep = self.work_dir / "checkpoint"
        keep.mkdir()
        if adapter is not None:
            shutil.copytree(adapter, keep / ADAPTER_DIR)
        (keep / TRIAL_FILE).write_text(json.dumps(
            {"variant": self.variant, "run_id": self.run_id, "metrics": metrics,
             **(record or {})}, default=str))
        ray.tune.report({**metrics, MLFLOW_RUN_ID: self.run_id},
                        checkpoint=Checkpoint.from_directory(str(keep)))


@contextlib.contextmanager
def trial_run(context: TrialContext, variant: dict, tags: Mapping[str, str] | None = None
              ) -> Iterator[TrialRun]:
    """Open (or, on a resumed study, reopen) the trial's MLflow run with its parameters;
    it ends FINISHED, or FAILED when the trial raises."""
    import ray.tune  # lazy: ray

    tracking.configure(context.tracking_uri)
    trial = ray.tune.get_context()
    # Named as the terminal and the report name the candidate (the seed on a seed axis), so
    # the MLflow runs table tells trials apart; the parameters are what a trial varies (the
    # settings every trial shares are on the study's parent run).
    name = candidate_label(variant["method"], variant["rank"], variant["params"],
                           variant.get("seed"))
    with tempfile.TemporaryDirectory() as tmp, tracking.tracked_run(
        context.experiment_id, trial_run_key(context.study, variant), name,
        ROLE_TRIAL, context.study, context.parent_run_id,
        tags={METHOD_TAG: variant["method"], TRIAL_ID: trial.get_trial_id(),
              TRIAL_NAME_TAG: trial.get_trial_name(), **(tags or {}),
              **tracking.environment_tags()},
    ) as run_id:
        # No rank for a candidate without LoRAs (the base model): absent, not "null".
        rank = {} if variant["rank"] is None else {"rank": variant["rank"]}
        tracking.log_params(run_id, {"method": variant["method"], **rank,
                                     "seed": trial_seed(context, variant),
                                     **variant["params"]})
        yield TrialRun(run_id, trial.get_trial_name(), Path(tmp), variant)
