"""`soups validate FILE`: check a study file (study/spec.py and its search space) or a `ray up`
cluster file (study/cluster_check.py) offline, before anything is trained."""

from __future__ import annotations

from pathlib import Path

import typer

from soups.data.datasets import DatasetError
from soups.data.sources import local_path
from soups.errors import SoupsError
from soups.yaml_file import read_yaml

# Top-level keys of Ray's autoscaler schema that a study file never has: one of them makes
# FILE a cluster file, anything else is read as a study.
CLUSTER_KEYS = ("cluster_name", "available_node_types", "head_node_type")


def validate(
    file: Path = typer.Argument(..., help="A study file (soups run FILE) or a cluster file "
                                          "for `ray up` (cluster.yaml)."),
    study: Path = typer.Option(None, help="With a cluster file: also check this study file "
                                          "against the cluster."),
    set_: list[str] = typer.Option(None, "--set", help="With a study file: change one key "
                                   "first, KEY.PATH=VALUE, as `soups run --set`."),
) -> None:
    """Check FILE offline: nothing is trained, no data or model loaded, no cloud touched.

    A study file: every section's keys and value ranges, the objective, and
    the search space (each method's parameters and their values against the
    method's declared types and ranges). Exit status 2 on an error.

    A cluster file (top-level cluster_name, available_node_types or
    head_node_type): Ray's autoscaler schema and this project's expectations
    (head resources and MLflow server, worker types, shared storage, project
    install, token authentication, no open ports). Exit status 1 on errors.
    """
    from study.spec import study_path  # lazy: pydantic

    file = study_path(file)
    if is_cluster_file(file):
        validate_cluster(file, study)
    elif study is not None:
        raise SoupsError(f"{file}: a study file; --study goes with a cluster file (one with "
                         f"{', '.join(CLUSTER_KEYS[:-1])} or {CLUSTER_KEYS[-1]})")
    else:
        typer.echo(validate_study(file, set_))


def is_cluster_file(path: Path) -> bool:
    """Whether `path` is a `ray up` cluster file, by its top-level keys. A missing file or
    one that is not YAML is bad input whatever its kind: one line, exit status 2."""
    data = read_yaml(path, SoupsError)
    return isinstance(data, dict) and any(key in data for key in CLUSTER_KEYS)


def validate_study(path: Path, assignments_: list[str] | None = None) -> str:
    """The one-line verdict on a valid study; a bad one raises the SoupsError naming the
    file, key and value."""
    from study.resolve import load_search_space  # lazy: pydantic
    from study.spec import assignments, load_spec  # lazy: pydantic

    spec = load_spec(path, assignments(assignments_))
    _check_local_sources(spec, path)
    space = load_search_space(spec)
    space.ranks(spec.finetune.ranks)  # stage 1 trains every rank: a sampled rank is refused
    return (f"{path}: valid (study {spec.name}, {len(spec.skills)} skills, target "
            f"{spec.target_name}, search space {spec.search.space}: {len(space.methods)} "
            "methods)")


def _check_local_sources(spec, path: Path) -> None:
    """Each task's (and few-shot) source that names a local file or folder exists; hub ids
    are left for the run (offline, nothing is downloaded)."""
    for name, task in spec.tasks().items():
        sources = [] if task.generated else [task.source]
        if task.fewshot is not None and task.fewshot.source not in ("preset", "task"):
            sources.append(task.fewshot.source)
        for source in sources:
            try:
                local_path(source)
            except DatasetError as err:
                raise DatasetError(f"{path}: task {name}: {err}") from None


def validate_cluster(cluster: Path, study: Path | None) -> None:
    from study.cluster_check import check_cluster_file  # lazy: pydantic

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
