"""A study's MLflow runs as tidy tables, read-only.

`load_study(name)` finds the study's experiment and returns `StudyRuns`: one row per trial
(method, every parameter, every final metric, status, timing), the fine-tune runs, and the
parent run's facts (target, skills, best trial). Trial runs are matched to their trial by
the `soups.run_key` tag that the study writes; when a key has more than one run (a resumed
study from before run keys, runs copied between stores) the row kept is the finished one,
else the newest, and the others are listed in `StudyRuns.duplicates`, never silently mixed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from soups.errors import SoupsError
from soups.home import TRACKING_ENV, default_tracking_uri, soups_home
from soups.names import (
    KEY_TAG,
    METHOD_TAG,
    OBJECTIVE,
    ROLE_FINETUNE,
    ROLE_PARENT,
    ROLE_TAG,
    ROLE_TRIAL,
    STUDY_TAG,
    TRIAL_ID,
    accuracy_task,
    candidate_label,
)

# Leading columns of the trial table, in this order; parameters and metrics follow.
TRIAL_COLUMNS = ["study", "trial", "label", "method", "group", "rank", "seed", "status",
                 OBJECTIVE, "start_time", "end_time", "duration_s", "run_id", "run_name",
                 "n_runs"]
# Parameters every trial of a study shares (each task's generation and scoring settings):
# the study logs them on its parent run; older versions logged them on every trial run, where
# the trial table and the labels leave them out.
SHARED_PARAM_PREFIXES = ("task.",)
# MLflow status -> trial status: a RUNNING run belongs to a study that is running or was
# killed (the next `soups resume` finishes it).
STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed",
          "RUNNING": "running or interrupted", "SCHEDULED": "running or interrupted"}
_PREFERENCE = {"finished": 0, "stopped early": 1, "failed": 2, "killed": 3,
               "running or interrupted": 4}


class StudyNotFound(SoupsError, LookupError):
    """No MLflow experiment (or no runs) for the study name in the tracking store."""


@dataclass
class StudyRuns:
    name: str
    tracking_uri: str
    experiment_id: str
    trials: pd.DataFrame  # one row per trial, TRIAL_COLUMNS first
    finetunes: pd.DataFrame  # one row per fine-tune run
    duplicates: pd.DataFrame  # trial runs not kept because another run had the same key
    parent: dict = field(default_factory=dict)  # run_id, params, tags, metrics, status

    @property
    def target(self) -> str | None:
        named = _spec_tasks(self.parent.get("params", {}), "target")
        return named[0] if named else _target_from(self.trials)

    @property
    def skills(self) -> list[str]:
        named = _spec_tasks(self.parent.get("params", {}), "skills")
        if named:
            return named
        tasks = {accuracy_task(c) for c in self.trials.columns} - {None}
        return sorted(tasks - {self.target})


def resolve_tracking_uri(name: str, tracking_uri: str | None = None) -> str:
    """Where a study's runs are, by the precedence `soups run` used: the given URI, else the
    saved spec's `tracking.uri` (which holds $MLFLOW_TRACKING_URI if that chose the store at
    run time), else $MLFLOW_TRACKING_URI, else the default SQLite store under $SOUPS_HOME."""
    return (tracking_uri or _spec_tracking(name).get("uri") or os.environ.get(TRACKING_ENV)
            or default_tracking_uri(soups_home()))


def _experiment_name(name: str) -> str:
    """The spec's `tracking.experiment` when the study set one, else the study name."""
    return _spec_tracking(name).get("experiment") or name


def _spec_tracking(name: str) -> dict:
    """The `tracking` section of the study's saved spec ($SOUPS_HOME/NAME/study.yaml), or {}
    when there is no such file or it is not a readable spec."""
    from study.spec import SpecError, load_yaml  # lazy: pydantic

    spec_file = soups_home() / name / "study.yaml"
    try:
        data = load_yaml(spec_file) if spec_file.is_file() else {}
    except SpecError:
        return {}
    section = data.get("tracking") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    if tracking_uri.startswith("sqlite:///"):
        # MLflow would create an empty database at a missing path: a typo must not do that.
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise StudyNotFound(f"no MLflow database at {path} (tracking URI {tracking_uri}); "
                                "set SOUPS_HOME or pass --tracking-uri")
    return MlflowClient(tracking_uri=tracking_uri)


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _value(text: str):
    """A logged param back to its value: numbers and JSON lists become values again; plain
    strings stay strings (lists stay JSON text, so a table cell stays hashable)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    return text if isinstance(value, (list, dict)) else value


def _status(run) -> str:
    return STATUS.get(run.info.status, run.info.status.lower())


def _time(ms: int | None):
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def label(method: str, rank, params: dict) -> str:
    """A trial's short name, as the leaderboard prints it: `ties r8 (density=0.75)`. Settings
    every trial shares (`task.*`, logged on trial runs by older versions) are not part of it."""
    return candidate_label(method, rank, {k: v for k, v in params.items()
                                          if not k.startswith(SHARED_PARAM_PREFIXES)})


def group(method: str, params: dict) -> str:
    """What a comparison puts side by side: the method, except that each skill LoRA alone is
    its own entry (`skill (math)`), as the paper's tables list them."""
    if method == "skill" and params.get("skill") is not None:
        return f"skill ({params['skill']})"
    return method


def _trial_row(run, study: str) -> dict:
    params = {k: _value(v) for k, v in run.data.params.items()
              if not k.startswith(SHARED_PARAM_PREFIXES)}
    metrics = dict(run.data.metrics)
    status = _status(run)
    if status == "finished" and OBJECTIVE not in metrics:
        status = "stopped early"  # ended by the scheduler (ASHA) before its evaluation
    method = params.pop("method", run.data.tags.get(METHOD_TAG))
    rank = params.pop("rank", None)
    seed = params.pop("seed", None)
    start, end = run.info.start_time, run.info.end_time
    return {
        "study": study, "trial": run.data.tags.get(TRIAL_ID, run.info.run_name),
        "label": label(method, rank, params), "method": method,
        "group": group(method, params), "rank": rank, "seed": seed,
        "status": status, OBJECTIVE: metrics.pop(OBJECTIVE, None),
        "start_time": _time(start), "end_time": _time(end),
        "duration_s": (end - start) / 1000 if start and end else None,
        "run_id": run.info.run_id, "run_name": run.info.run_name,
        "run_key": run.data.tags.get(KEY_TAG, run.info.run_id),
        **{f"param.{k}": v for k, v in params.items()}, **metrics,
    }


def _dedupe(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """One row per run key: the finished run, else the newest; the rest are returned apart."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["run_key"], []).append(row)
    kept, dropped = [], []
    for group in groups.values():
        group.sort(key=lambda r: (_PREFERENCE.get(r["status"], 9),
                                  -(r["start_time"].value if r["start_time"] is not pd.NaT
                                    else 0)))
        kept.append({**group[0], "n_runs": len(group)})
        dropped.extend(group[1:])
    return kept, dropped


def _order(table: pd.DataFrame) -> pd.DataFrame:
    """Best objective first, unfinished trials last; the fixed columns lead."""
    if table.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    rest = sorted(c for c in table.columns if c not in TRIAL_COLUMNS)
    table = table[TRIAL_COLUMNS + rest]
    return table.sort_values([OBJECTIVE, "start_time"], ascending=[False, True],
                             na_position="last").reset_index(drop=True)


def _finetune_row(run) -> dict:
    params = {k: _value(v) for k, v in run.data.params.items()}
    return {"skill": params.get("skill"), "rank": params.get("rank"),
            "seed": params.get("train.seed"),  # one fine-tune per seed on a seed axis
            "status": _status(run), "run_id": run.info.run_id, **run.data.metrics,
            **{f"param.{k}": v for k, v in params.items() if k not in ("skill", "rank")}}


def load_study(name: str, tracking_uri: str | None = None) -> StudyRuns:
    """The study's runs from MLflow (read-only). Raises StudyNotFound naming the study and
    the store when there is no such experiment, or it holds no runs of a study."""
    uri = resolve_tracking_uri(name, tracking_uri)
    client = _client(uri)
    experiment_name = _experiment_name(name)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise StudyNotFound(f"no study {name!r} in {uri} (experiment {experiment_name!r}); "
                            f"studies there: {', '.join(known) or 'none'}")
    runs = [r for r in _all_runs(client, experiment.experiment_id)
            if r.data.tags.get(STUDY_TAG, name) == name]
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get(ROLE_TAG, ""), []).append(run)
    if not by_role.get(ROLE_TRIAL) and not by_role.get(ROLE_PARENT):
        raise StudyNotFound(f"experiment {experiment_name!r} in {uri} holds no runs of a "
                            f"soups study")
    kept, dropped = _dedupe([_trial_row(r, name) for r in by_role.get(ROLE_TRIAL, [])])
    parents = sorted(by_role.get(ROLE_PARENT, []), key=lambda r: r.info.start_time or 0)
    parent = {}
    if parents:
        run = parents[-1]
        parent = {"run_id": run.info.run_id, "params": dict(run.data.params),
                  "tags": dict(run.data.tags), "metrics": dict(run.data.metrics),
                  "status": _status(run), "start_time": _time(run.info.start_time),
                  "end_time": _time(run.info.end_time)}
    return StudyRuns(
        name=name, tracking_uri=uri, experiment_id=experiment.experiment_id,
        trials=_order(pd.DataFrame(kept)),
        finetunes=pd.DataFrame([_finetune_row(r) for r in by_role.get(ROLE_FINETUNE, [])]),
        duplicates=pd.DataFrame(dropped), parent=parent)


def combined(studies: list[StudyRuns]) -> pd.DataFrame:
    """The trial tables of several studies, one below the other (the `study` column says
    which); columns a study lacks are empty."""
    return pd.concat([s.trials for s in studies], ignore_index=True)


def _spec_tasks(params: dict, section: str) -> list[str]:
    """Task names of the spec's `skills` or `target` section, from the parent run's
    flattened `study.*` params (order as in the spec)."""
    names: list[str] = []
    for key in params:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "study" and parts[1] == section \
                and parts[2] not in names:
            names.append(parts[2])
    return names


def _target_from(trials: pd.DataFrame) -> str | None:
    """The task whose validation accuracy is the objective (when no parent run says)."""
    for column in trials.columns:
        task = accuracy_task(column)
        if task is not None:
            pairs = trials[[OBJECTIVE, column]].dropna()
            if len(pairs) and (pairs[OBJECTIVE] == pairs[column]).all():
                return task
    return None


def cat_weights(study: StudyRuns, run_id: str) -> dict | None:
    """The learned CAT weights record (`cat_weights.json`) a trial run logged, or None."""
    text = _artifact_text(study, run_id, "cat_weights.json")
    return json.loads(text) if text is not None else None


def parent_artifact_names(study: StudyRuns) -> list[str]:
    """The files the parent run logged (the spec, the search space, the leaderboard)."""
    if not study.parent:
        return []
    return [a.path for a in _client(study.tracking_uri).list_artifacts(study.parent["run_id"])]


def parent_artifact_text(study: StudyRuns, name: str) -> str | None:
    """A text artifact of the parent run (`study.yaml`, the search space), or None."""
    return _artifact_text(study, study.parent["run_id"], name) if study.parent else None


def _artifact_text(study: StudyRuns, run_id: str, name: str) -> str | None:
    """A run's top-level text artifact, or None when the run did not log it."""
    client = _client(study.tracking_uri)
    if name not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, tmp)).read_text()


def metric_history(study: StudyRuns, run_id: str, key: str) -> pd.DataFrame:
    """A metric's curve (step, value) of one run, e.g. `cat_eval_loss`."""
    history = _client(study.tracking_uri).get_metric_history(run_id, key)
    return pd.DataFrame([{"step": m.step, "value": m.value} for m in history],
                        columns=["step", "value"])
