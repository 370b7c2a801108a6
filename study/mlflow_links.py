"""Links into the MLflow UI for a study: its runs table as a user wants to open it (the trials
only, best objective first) and a run's page. Pure string work: the study's end, `soups
status` and the report print them; nothing here talks to MLflow.

The UI keeps the table's state in its URL: `searchFilter` (an MLflow search expression),
`orderByKey` and `orderByAsc` (MLflow 3's experiment page reads exactly these); the columns
shown come from the experiment's runs (the objective is the experiment's primary metric, and
a trial's parameters are only what it varies: method, rank, seed, the method's own).
"""

from __future__ import annotations

from urllib.parse import quote

from soups.names import OBJECTIVE, ROLE_TAG, ROLE_TRIAL

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` serve by default


def ui_base(tracking_uri: str, given: str | None = None) -> str:
    """The MLflow UI serving a store: the one given, the tracking server itself, or a local
    `mlflow ui` on its default port."""
    if given:
        return given.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def runs_table_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table showing the trials, sorted by the objective, best first."""
    search = f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
    return (f"{ui}/#/experiments/{experiment_id}/runs?searchFilter={quote(search)}"
            f"&orderByKey={quote(f'metrics.`{OBJECTIVE}`')}&orderByAsc=false")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(tracking_uri: str) -> str:
    """How to serve the UI for a local store (a tracking server serves its own)."""
    return f"mlflow ui --backend-store-uri {tracking_uri}"
