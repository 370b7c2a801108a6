"""Links into the MLflow UI for a study: its runs table as a user wants to open it (the trials
only, best objective first) and a run's page. Pure string work: the study's end, `soups
status` and the report print them; nothing here talks to MLflow.

The table's filter and order can live in the UI's URL (`searchFilter`, `orderByKey`,
`orderByAsc`), its columns cannot: they are the UI's own state. MLflow 3's experiment page
loads both from a *shared view*: an experiment tag `mlflow.sharedViewState.<key>` holding
the state as JSON, opened by `?viewStateShareKey=<key>` (the UI's "share" button writes the
same). The study writes one (`trials_view`) when it starts: the trials only, best objective
first, with the objective, the target's parse rate, method, rank and seed as columns.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from soups.names import OBJECTIVE, PARSED, ROLE_TAG, ROLE_TRIAL, VALIDATION, task_metric

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # the UI's experiment tag of a shared view
TRIALS_VIEW = "soups-trials"

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` serve by default


def ui_base(tracking_uri: str, given: str | None = None) -> str:
    """The MLflow UI serving a store: the one given, the tracking server itself, or a local
    `mlflow ui` on its default port."""
    if given:
        return given.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's column key (its makeCanonicalSortKey)


def trials_view(target: str) -> dict[str, str]:
    """The experiment tag ({name: JSON value}) of the shared view `runs_table_url` opens."""
    state = {
        "searchFilter": f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'",
        "orderByKey": _column("metrics", OBJECTIVE), "orderByAsc": False,
        "selectedColumns": [_column("metrics", OBJECTIVE),
                            _column("metrics", task_metric(VALIDATION, target, PARSED)),
                            _column("params", "method"), _column("params", "rank"),
                            _column("params", "seed"), _column("attributes", "Duration")],
        "runsHiddenMode": "SHOW_ALL",
    }
    return {SHARED_VIEW_PREFIX + TRIALS_VIEW: json.dumps(state)}


def runs_table_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table showing the trials, sorted by the objective, best first,
    with the columns a comparison needs (the study's shared view, `trials_view`)."""
    return f"{ui}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(TRIALS_VIEW)}"


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(tracking_uri: str) -> str:
    """How to serve the UI for a local store (a tracking server serves its own)."""
    return f"mlflow ui --backend-store-uri {tracking_uri}"
