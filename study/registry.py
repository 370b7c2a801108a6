"""A study's name, spec and tracking store: what can fail before anything exists is checked
first (`check_study`), then the resolved spec is saved (`register_study`) where every later
command (`resume`, `status`, `export`, `report`) finds it by name (`saved_spec`)."""

from __future__ import annotations

import os

import yaml

from soups.errors import did_you_mean
from soups.home import TRACKING_ENV, default_tracking_uri, soups_home
from study.layout import LEADERBOARD_FILE, SPEC_FILE, spec_files, study_dir
from study.resolve import load_search_space
from study.spec import SpecError, StudySpec, Tracking, load_yaml, parse_model


class StudyComplete(SpecError):
    """`soups resume` of a study that finished: nothing is run, and nothing of it changes."""

    def __init__(self, name: str):
        super().__init__(f"study {name!r} is complete: nothing to resume. See it with `soups "
                         f"report {name}`, export it with `soups export {name} --out DIR`, or "
                         f"run it again under another --name")
        self.name = name


def tracking_uri(spec: StudySpec) -> str:
    """Where the study logs, by precedence: its `tracking.uri`, else $MLFLOW_TRACKING_URI
    (MLflow's own convention), else an SQLite database under $SOUPS_HOME."""
    if spec.tracking.uri:
        return spec.tracking.uri
    env = os.environ.get(TRACKING_ENV)
    if env:  # checked as a study's own uri would be (a relative sqlite path is refused)
        return parse_model(Tracking, {"uri": env}, f"${TRACKING_ENV}").uri
    home = soups_home()
    home.mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(home)


def _refuse_taken(spec: StudySpec) -> None:
    taken = [path for path in spec_files(spec) if path.exists()]
    if taken:
        raise SpecError(f"study {spec.name!r} already exists ({taken[0]}): use `soups resume "
                        f"{spec.name}` or another --name")


def check_study(spec: StudySpec, resume: bool = False):
    """What can fail before anything exists (a new study's name taken, its search space,
    its tracking store): raises SpecError / SearchSpaceError, writes nothing. Returns the
    search space and the tracking URI."""
    if not resume:
        _refuse_taken(spec)
    elif (study_dir(spec) / LEADERBOARD_FILE).is_file():
        raise StudyComplete(spec.name)
    return load_search_space(spec), tracking_uri(spec)


def register_study(spec: StudySpec, resume: bool = False) -> StudySpec:
    """Save the study's resolved spec in its folder, and, when its `storage` lies
    elsewhere, under $SOUPS_HOME/NAME too, so every command finds the study by name. The
    tracking URI chosen now (`tracking_uri`) is written into the saved spec: a resume, a
    status or a report reads the same store whatever its environment. Returns the spec as
    saved."""
    files = spec_files(spec)
    if not resume:
        _refuse_taken(spec)
        if not spec.tracking.uri:
            pinned = spec.tracking.model_copy(update={"uri": tracking_uri(spec)})
            spec = spec.model_copy(update={"tracking": pinned})
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    return spec


def saved_spec(name: str) -> StudySpec:
    """The spec a study saved when it started, found by its name under $SOUPS_HOME."""
    path = soups_home() / name / SPEC_FILE
    if not path.is_file():
        studies = [p.parent.name for p in soups_home().glob(f"*/{SPEC_FILE}")]
        raise SpecError(f"no study {name!r} under {soups_home()}"
                        + did_you_mean(name, studies))
    return parse_model(StudySpec, load_yaml(path), str(path))
