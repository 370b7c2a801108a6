"""Studies are found by name wherever their storage is, and the MLflow store follows
MLflow's convention: a study's `tracking.uri`, else $MLFLOW_TRACKING_URI, else SQLite under
$SOUPS_HOME; the store chosen at run time is the one every later command reads."""

from __future__ import annotations

import pytest
from conftest import assert_user_error
from typer.testing import CliRunner

from analysis.runs import resolve_tracking_uri
from study.cli import app
from study.layout import study_dir
from study.registry import register_study, tracking_uri
from study.spec import SpecError, StudySpec

pytestmark = pytest.mark.unit


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_tracking_precedence(home, monkeypatch, tmp_path):
    default = f"sqlite:///{(home / 'mlflow.db').resolve()}"
    assert tracking_uri(StudySpec()) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(StudySpec()) == "http://127.0.0.1:5000"
    own = StudySpec(tracking={"uri": f"sqlite:///{tmp_path}/own.db"})
    assert tracking_uri(own) == f"sqlite:///{tmp_path}/own.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")
    with pytest.raises(SpecError, match=r"\$MLFLOW_TRACKING_URI.*relative"):
        tracking_uri(StudySpec())


def test_the_store_chosen_at_run_time_is_pinned_in_the_saved_spec(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    saved = register_study(StudySpec(name="pinned"))
    assert saved.tracking.uri == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri("pinned") == "http://127.0.0.1:5000"  # report, later
    plain = register_study(StudySpec(name="plain"))  # the default store, pinned as well
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.9:5000")
    assert tracking_uri(plain) == resolve_tracking_uri("plain") == \
        f"sqlite:///{(home / 'mlflow.db').resolve()}"  # a resume logs where the run did
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri("other") == f"sqlite:///{(home / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert resolve_tracking_uri("other") == "http://10.0.0.1:5000"
    assert resolve_tracking_uri("pinned", "http://given:1") == "http://given:1"


def test_a_study_with_its_own_storage_is_found_by_name(home, tmp_path):
    storage = tmp_path / "elsewhere"
    spec = register_study(StudySpec(name="far", storage=str(storage)))
    assert study_dir(spec) == storage.resolve() / "far"
    assert (storage / "far" / "study.yaml").is_file() and (home / "far" / "study.yaml").is_file()
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "far"])
    assert shown.exit_code == 0 and str(storage.resolve() / "far") in shown.output
    assert "not complete" in shown.output
    exported = runner.invoke(app, ["export", "far", "--out", str(tmp_path / "out")])
    assert exported.exit_code == 2 and "has not finished" in exported.output
    with pytest.raises(SpecError, match="already exists"):
        register_study(StudySpec(name="far", storage=str(tmp_path / "third")))
    assert register_study(spec, resume=True) == spec


def test_artifacts_of_a_local_store_lie_beside_its_database(tmp_path, monkeypatch):
    """Not in `./mlruns` of whichever working directory created the experiment."""
    import mlflow

    from soups.home import default_tracking_uri
    from trainables import tracking

    assert tracking.artifact_location("http://127.0.0.1:5000", "s") is None
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = mlflow.get_tracking_uri()
    try:
        tracking.configure(default_tracking_uri(tmp_path))
        experiment = tracking.experiment_id("beside")
        (tmp_path / "note.txt").write_text("kept")
        with tracking.tracked_run(experiment, "key", "run", "trial", "beside") as run_id:
            tracking.log_artifact(run_id, tmp_path / "note.txt")
        uri = mlflow.get_run(run_id).info.artifact_uri
    finally:
        mlflow.set_tracking_uri(saved)
    assert uri.startswith((tmp_path / "mlartifacts" / "beside").as_uri())
    assert list(elsewhere.iterdir()) == []


def test_study_commands_bad_inputs_are_one_line_errors(home, tmp_path):
    """A study, study file, key or store that is not there stops `run`, `resume`, `status`,
    `export` and `report` with exit status 2 and one line naming it (nothing starts)."""
    bad = tmp_path / "study.yaml"
    bad.write_text("name: x\nfinetune:\n  rnaks: [8]\n")
    for args, named in [
        (["run", tmp_path / "absent.yaml"], [tmp_path / "absent.yaml", "no such file"]),
        (["run", bad], [bad, "unknown key 'finetune.rnaks'"]),
        (["resume", "nope"], ["no study 'nope'"]),
        (["status", "nope"], ["no study 'nope'"]),
        (["export", "nope", "--out", tmp_path / "out"], ["no study 'nope'"]),
        (["report", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db"],
         [tmp_path / "absent.db"]),
    ]:
        assert_user_error(args, *named)
    assert not (home / "x").exists() and not (tmp_path / "out").exists()


def test_the_experiment_opens_on_its_runs_and_a_finished_run_keeps_its_state(tmp_path):
    """The experiment carries MLflow's kind tag (an untagged one opens on the GenAI page) and
    the objective as its primary metric, also when an older version created it; a finished
    run reopened under its key (a rerun trial) stays FINISHED with its end time, whether the
    work inside succeeds or raises."""
    import mlflow

    from soups.home import default_tracking_uri
    from trainables import tracking

    saved = mlflow.get_tracking_uri()
    try:
        tracking.configure(default_tracking_uri(tmp_path))
        experiment = tracking.experiment_id("kinds")
        tags = mlflow.get_experiment(experiment).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert tags["mlflow.experiment.primaryMetric.name"] == "objective"
        old = mlflow.create_experiment("older")  # as an earlier version made it: no tags
        assert tracking.experiment_id("older") == old
        assert mlflow.get_experiment(old).tags["mlflow.experimentKind"] == \
            "custom_model_development"
        with tracking.tracked_run(experiment, "key", "ties r8", "trial", "kinds") as run_id:
            pass
        ended = mlflow.get_run(run_id).info
        assert ended.status == "FINISHED" and ended.run_name == "ties r8"
        with tracking.tracked_run(experiment, "key", "ties r8", "trial", "kinds") as again:
            assert again == run_id and mlflow.get_run(run_id).info.status == "FINISHED"
        with pytest.raises(RuntimeError), \
                tracking.tracked_run(experiment, "key", "ties r8", "trial", "kinds"):
            raise RuntimeError("a rerun failed")
        info = mlflow.get_run(run_id).info
        assert (info.status, info.end_time) == ("FINISHED", ended.end_time)
        failed = "other"
        with pytest.raises(RuntimeError), \
                tracking.tracked_run(experiment, failed, "linear r8", "trial", "kinds"):
            raise RuntimeError("a first run failed")
        reopened = tracking.find_run(experiment, failed)
        assert reopened.info.status == "FAILED"
        with tracking.tracked_run(experiment, failed, "linear r8", "trial", "kinds") as rerun:
            assert rerun == reopened.info.run_id
            assert mlflow.get_run(rerun).info.status == "RUNNING"
        assert mlflow.get_run(rerun).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri(saved)
