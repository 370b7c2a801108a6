"""`soups report NAME [NAME...]`: the HTML report of a study, or a comparison of several."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from soups.home import soups_home


def report(
    names: list[str] = typer.Argument(..., metavar="NAME", help="Study name(s); several "
                                      "are compared in one report (they must share the target "
                                      "task)."),
    out: Path = typer.Option(None, help="Folder for report.html and trials.csv (default: "
                             "$SOUPS_HOME/NAME/report, or $SOUPS_HOME/report-NAME1-NAME2...)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: the study's "
                                     "tracking.uri, else the SQLite store under $SOUPS_HOME, "
                                     "as `soups run`)."),
    mlflow_ui: str = typer.Option(None, help="Base URL of the MLflow UI for run links "
                                  "(default: the tracking server, else http://127.0.0.1:5000)."),
) -> None:
    """Write a self-contained HTML report from a study's MLflow runs: leaderboard, method
    comparison, per-skill retention, rank x method, CAT settings and learned weights, search
    progress, fine-tunes and the configuration."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads
    from analysis.report import write_report  # lazy: matplotlib, numpy, pandas
    from analysis.runs import load_study  # lazy: pandas

    studies = []
    for name in dict.fromkeys(names):
        typer.echo(f"reading study {name} from MLflow ...")
        studies.append(load_study(name, tracking_uri))
    folder = out or (soups_home() / names[0] / "report" if len(studies) == 1
                     else soups_home() / ("report-" + "-".join(s.name for s in studies)))
    path = write_report(studies, folder, mlflow_ui)
    trials = sum(len(s.trials) for s in studies)
    typer.echo(f"wrote {path} ({trials} trials) and {path.parent / 'trials.csv'}")
