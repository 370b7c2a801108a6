"""MLflow tracking: the one module that talks to MLflow (the driver and trials both use it).

One experiment per study, one parent run per study, one child run per fine-tune and per
trial. This module owns the run lifecycle instead of Ray's MLflow callbacks (stack-notes:
`MLflowLoggerCallback` duplicates runs after `Tuner.restore`, `setup_mlflow` never ends its
run): a run is found again by its `soups.run_key` tag, so a resumed study reuses the run it
had instead of creating a duplicate, and every run ends FINISHED or FAILED.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from soups.names import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    KEY_TAG,
    OBJECTIVE,
    PARENT_TAG,
    PRIMARY_METRIC_GREATER_TAG,
    PRIMARY_METRIC_TAG,
    ROLE_TAG,
    RUN_NAME_TAG,
    STUDY_TAG,
    version_tag,
)


def configure(uri: str) -> None:
    """This process's MLflow store (each trial and the driver call it with the study's URI;
    processes it starts get the URI passed, never through this process's environment)."""
    import mlflow  # lazy: mlflow

    mlflow.set_tracking_uri(uri)


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment's artifacts go: beside the database of a local SQLite store
    (MLflow's default, `./mlruns`, follows the working directory of whichever process
    creates the experiment); a tracking server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts" / name).as_uri()


# A study's experiment is model development: MLflow 3's UI guesses GenAI for an untagged one
# and opens it on an empty traces overview instead of its runs.
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, PRIMARY_METRIC_TAG: OBJECTIVE,
                   PRIMARY_METRIC_GREATER_TAG: "true"}


def experiment_id(name: str) -> str:
    """The study's experiment, created (with EXPERIMENT_TAGS) if it does not exist; an
    existing one without a kind (made by an older version, or by hand) gets the tags."""
    import mlflow  # lazy: mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow.create_experiment(
                name, artifact_location=artifact_location(mlflow.get_tracking_uri(), name),
                tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment = mlflow.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        set_experiment_tags(experiment.experiment_id, EXPERIMENT_TAGS)
    return experiment.experiment_id


def set_experiment_tags(experiment: str, tags: Mapping[str, str]) -> None:
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    for key, value in tags.items():
        client.set_experiment_tag(experiment, key, value)


def find_run(experiment: str, run_key: str):
    """The newest run of `experiment` tagged with `run_key`, or None."""
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    runs = MlflowClient().search_runs(
        [experiment], filter_string=f"tags.`{KEY_TAG}` = '{run_key}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


@contextlib.contextmanager
def tracked_run(experiment: str, run_key: str, name: str, role: str, study: str,
                parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
                ) -> Iterator[str]:
    """Start (or resume, by `run_key`) a run and end it FINISHED, or FAILED on an exception;
    a FINISHED run is yielded as it is and keeps its state. Yields the run id. Runs are
    created through the client so that no active-run state leaks between trials that share
    a worker process."""
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    existing = find_run(experiment, run_key)
    all_tags = {KEY_TAG: run_key, ROLE_TAG: role, STUDY_TAG: study, RUN_NAME_TAG: name,
                **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if existing is not None and existing.info.status == "FINISHED":
        # A finished run never changes state (nor end time): whatever runs again under its
        # key (a trial Tune reruns after losing its result) logs into it and leaves it so.
        yield existing.info.run_id
        return
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment, tags=all_tags, run_name=name).info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    """Log flattened params; a value already logged with the same text is skipped (MLflow
    refuses to change a param, and a resumed run logs the same ones again)."""
    from mlflow.entities import Param  # lazy: mlflow
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, _text(v)) for k, v in flatten(params).items()
             if existing.get(k) != _text(v)]
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start : start + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric  # lazy: mlflow
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    MlflowClient().log_batch(run_id, metrics=items)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    path = Path(path)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


# A generations table's first columns: what the model wrote and whether it was right come
# before the (long) prompt, so the MLflow artifact view shows them without scrolling.
TABLE_COLUMNS = ("output", "correct", "parsed", "extracted", "reference", "error", "prompt")


def log_generation_tables(run_id: str, folder: str | Path, artifact_dir: str) -> None:
    """Each `<split>/<task>.jsonl` of scored answers under `folder` as an MLflow table
    (`<artifact_dir>/<split>/<task>.table.json`), which the MLflow UI shows as a table, output
    and correctness first; values that are not text or numbers as JSON text."""
    import pandas as pd  # lazy: pandas
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    for path in sorted(Path(folder).glob("*/*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not records:
            continue
        table = pd.DataFrame(records)
        first = [c for c in TABLE_COLUMNS if c in table.columns]
        table = table[first + [c for c in table.columns if c not in first]]
        for column in table.columns:
            if table[column].map(lambda v: isinstance(v, (list, dict))).any():
                table[column] = table[column].map(lambda v: json.dumps(v, default=str))
        client.log_table(run_id, data=table,
                         artifact_file=f"{artifact_dir}/{path.parent.name}/{path.stem}.table.json")


def log_dataset(run_id: str, name: str, rows: list[dict], source: str, context: str) -> None:
    """A task's rows of one role as an MLflow dataset input of the run (the UI's Datasets
    column and panel: name, digest, source, schema, row count), tagged with the role as its
    context (train / validation / test). `source`: a local file or folder, else a hub id."""
    import mlflow.data  # lazy: mlflow
    import pandas as pd  # lazy: pandas
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource  # lazy: mlflow
    from mlflow.entities import DatasetInput, InputTag  # lazy: mlflow
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    columns = [c for c in ("prompt", "completion", "expected", "key", "text")
               if rows and c in rows[0]]
    frame = pd.DataFrame([{c: str(row[c]) for c in columns} for row in rows])
    origin = (str(Path(source).resolve()) if Path(source).exists()
              else HuggingFaceDatasetSource(path=source, split=context))
    dataset = mlflow.data.from_pandas(frame, source=origin, name=name)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context)])])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def flatten(params: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _text(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column and the run page's git commit) and
    the package versions, for reproducibility. Runs are created through the client, which
    sets none of them itself. Read once per process (four git calls): a trial process tags
    every run it opens."""
    return dict(_environment())


@functools.cache
def _environment() -> tuple[tuple[str, str], ...]:
    from mlflow.utils.mlflow_tags import (  # lazy: mlflow
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_DIRTY,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    tags = {MLFLOW_SOURCE_NAME: "soups", MLFLOW_SOURCE_TYPE: "LOCAL"}
    with contextlib.suppress(KeyError, OSError):
        tags[MLFLOW_USER] = getpass.getuser()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags[MLFLOW_GIT_BRANCH] = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags[MLFLOW_GIT_DIRTY] = "true" if _git("status", "--porcelain",
                                                "--untracked-files=no") else "false"
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            tags[MLFLOW_GIT_REPO_URL] = remote
    for package in ("torch", "transformers", "peft", "ray", "deepspeed", "mlflow"):
        try:
            tags[version_tag(package)] = version(package)
        except PackageNotFoundError:
            continue
    return tuple((k, v) for k, v in tags.items() if v)


CHAMPION_MODEL_CODE = Path(__file__).with_name("champion_model.py")
CHAMPION_ARTIFACT = "champion_model"  # the trial run's artifact the registry version points at


def register_champion(run_id: str, adapter_dir: str | Path, model_config: Mapping,
                      model_name: str, description: str, tags: Mapping[str, str]) -> int:
    """Register the champion as an MLflow model that `mlflow.pyfunc.load_model` loads and
    runs (`champion_model.py`, models from code: base model + the PEFT adapter, generating
    answers), with alias `champion`, a description and tags. The model is saved into the
    trial run's artifacts through the client, so the finished run keeps its state."""
    import mlflow  # lazy: mlflow
    from mlflow.exceptions import MlflowException  # lazy: mlflow
    from mlflow.tracking import MlflowClient  # lazy: mlflow

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / CHAMPION_ARTIFACT
        mlflow.pyfunc.save_model(
            str(folder), python_model=str(CHAMPION_MODEL_CODE),
            artifacts={"adapter": str(adapter_dir)}, model_config=dict(model_config),
            # stated, not inferred: inferring them would load and run the model
            pip_requirements=[f"{p}=={version(p)}" for p in ("torch", "transformers", "peft")]
            + [f"mlflow=={version('mlflow')}"])
        client.log_artifacts(run_id, str(folder), CHAMPION_ARTIFACT)
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # already registered
    source = f"{client.get_run(run_id).info.artifact_uri}/{CHAMPION_ARTIFACT}"
    created = client.create_model_version(model_name, source=source, run_id=run_id,
                                          description=description, tags=dict(tags))
    client.set_registered_model_alias(model_name, "champion", created.version)
    return int(created.version)
