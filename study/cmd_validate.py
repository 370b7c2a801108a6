"""`soups validate`: check a `ray up` cluster file offline (study/cluster_check.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def validate(
    cluster: Path = typer.Argument(..., help="The cluster file for `ray up` (cluster.yaml)."),
    study: Path = typer.Option(None, help="Also check this study file against the cluster."),
) -> None:
    """Check a cluster file against Ray's autoscaler schema and this project's expectations
    (head resources and MLflow server, worker types, shared storage, project install, token
    authentication, no open ports), without touching any cloud. Exit status 1 on errors."""
    from study.cluster_check import check_cluster_file

    findings = check_cluster_file(cluster, study)
    errors = [f for f in findings if f.level == "error"]
    for finding in findings:
        color = "red" if finding.level == "error" else "yellow"
        typer.secho(f"{finding.level}: {cluster}: {finding}", fg=color, err=True)
    if errors:
        raise typer.Exit(1)
    warnings = len(findings) - len(errors)
    typer.echo(f"{cluster}: valid" + (f" ({warnings} warnings)" if warnings else "")
               + (f"; study {study} fits it" if study else ""))
