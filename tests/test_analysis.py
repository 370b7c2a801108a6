"""The analysis package over MLflow: tidy tables, summaries against known values, figures,
the HTML report and `soups report`.

Unit tests write a small study into an SQLite MLflow store with the study's own tracking
module (`trainables.tracking`, the writer every real study uses), including a failed trial,
a trial left RUNNING by a killed driver and a trial key with two runs; the integration tests
read the session's smoke study and execute the notebooks against it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_soups

from analysis import figures, summaries
from analysis.report import SECTIONS, render, write_report
from analysis.runs import TRIAL_COLUMNS, StudyNotFound, combined, load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = "fake"
# (key, method, rank, seed, params, validation math_code / math / code)
TRIALS = [
    ("skill-math", "skill", 8, 0, {"skill": "math"}, (0.00, 0.40, 0.00)),
    ("skill-code", "skill", 8, 0, {"skill": "code"}, (0.10, 0.00, 0.30)),
    ("linear-8-s0", "linear", 8, 0, {}, (0.05, 0.10, 0.15)),
    ("linear-8-s1", "linear", 8, 1, {}, (0.07, 0.20, 0.15)),
    ("linear-16-s0", "linear", 16, 0, {}, (0.12, 0.20, 0.15)),
    ("cat-randn", "cat_learned", 8, 0, {"init": "randn"}, (0.20, 0.30, 0.24)),
    ("cat-uniform", "cat_learned", 8, 0, {"init": "uniform"}, (0.16, 0.10, 0.06)),
    ("base", "base", None, 0, {}, (0.00, 0.01, 0.00)),
]
CAT_RECORD = {
    "adapters": ["/a/math", "/a/code"],
    "settings": {"granularity": "module", "normalisation": "softmax", "init": "randn"},
    "weights": {"model.layers.0.self_attn.q_proj": [0.7, 0.3],
                "model.layers.0.mlp.down_proj": [0.4, 0.6],
                "model.layers.1.self_attn.q_proj": [0.5, 0.5]},
}


def _write_fake_study(home: Path, study: str = STUDY, shift: float = 0.0) -> str:
    """A study in `home`'s MLflow store, written the way `soups run` writes one; `shift` is
    added to every target accuracy."""
    from mlflow.tracking import MlflowClient

    from soups.home import default_tracking_uri
    from trainables import tracking

    uri = default_tracking_uri(home)
    tracking.configure(uri)
    experiment = tracking.experiment_id(study)
    study_params = {"target": {"math_code": {"source": "generated"}},
                    "skills": {"math": {"source": "generated"}, "code": {"source": "generated"}}}
    (home / "study.yaml").write_text("name: fake\nsearch: {space: paper}\n")
    with tracking.tracked_run(experiment, f"{study}:parent", study, "parent", study) as parent:
        tracking.log_params(parent, {"study": study_params})
        tracking.log_artifact(parent, home / "study.yaml")
        for skill in ("math", "code"):
            with tracking.tracked_run(experiment, f"{study}:ft:{skill}", f"ft-{skill}",
                                      "finetune", study, parent) as run:
                tracking.log_params(run, {"skill": skill, "rank": 8})
                for step, loss in enumerate((2.0, 1.5, 1.2)):
                    tracking.log_metrics(run, {"train_loss": loss}, step=step)
        for key, method, rank, seed, params, (target, math, code) in TRIALS:
            with tracking.tracked_run(experiment, f"{study}:{key}", key, "trial", study, parent,
                                      tags={"method": method, "trial_id": key}) as run:
                tracking.log_params(run, {"method": method, "rank": rank, "seed": seed,
                                          **params})
                if method == "cat_learned":  # held-out loss curve: ends 2.5 (randn), 2.0
                    offset = 0.5 if params["init"] == "uniform" else 0.0
                    for step, loss in ((10, 3.0), (20, 2.5)):
                        tracking.log_metrics(run, {"cat_eval_loss": loss - offset}, step=step)
                    record = home / "cat_weights.json"
                    record.write_text(json.dumps(CAT_RECORD))
                    tracking.log_artifact(run, record)
                tracking.log_metrics(run, {
                    "validation/math_code/accuracy": target + shift, "objective": target + shift,
                    "validation/math/accuracy": math, "validation/code/accuracy": code,
                    "build_seconds": 1.5})
        best = tracking.find_run(experiment, f"{study}:cat-randn").info.run_id
        tracking.log_metrics(best, {"test/math_code/accuracy": 0.18})
        # A trial whose merge raised: its run ends FAILED.
        with pytest.raises(RuntimeError), tracking.tracked_run(
                experiment, f"{study}:ties", "ties", "trial", study, parent,
                tags={"method": "ties", "trial_id": "ties"}) as run:
            tracking.log_params(run, {"method": "ties", "rank": 8, "seed": 0, "density": 0.5})
            raise RuntimeError("merge failed")
        client = MlflowClient()
        # A trial whose driver was SIGKILLed: its run stays RUNNING.
        client.create_run(experiment, run_name="svd", tags={
            tracking.KEY_TAG: f"{study}:svd", tracking.ROLE_TAG: "trial",
            tracking.STUDY_TAG: study, tracking.PARENT_TAG: parent, "method": "svd"})
        # An older, failed run under the key of a trial that later finished (a duplicate).
        old = client.create_run(experiment, run_name="linear-8-s0", tags={
            tracking.KEY_TAG: f"{study}:linear-8-s0", tracking.ROLE_TAG: "trial",
            tracking.STUDY_TAG: study, tracking.PARENT_TAG: parent, "method": "linear"})
        client.set_terminated(old.info.run_id, status="FAILED")
    return uri


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    import mlflow

    home = tmp_path_factory.mktemp("analysis_home")
    saved_uri = mlflow.get_tracking_uri()
    # The store is the one passed: a caller's $MLFLOW_TRACKING_URI must not choose it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOUPS_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            yield load_study(STUDY, _write_fake_study(home))
        finally:
            mlflow.set_tracking_uri(saved_uri)


def _non_empty(fig) -> bool:
    """A figure that draws data: bars, points, images or lines on some axes."""
    return sum(len(ax.patches) + len(ax.collections) + len(ax.images) + len(ax.lines)
               for ax in fig.axes) > 0


@pytest.mark.unit
def test_one_row_per_trial_failures_marked_duplicates_kept_apart(fake):
    trials = fake.trials
    assert list(trials.columns[: len(TRIAL_COLUMNS)]) == TRIAL_COLUMNS
    assert len(trials) == len(TRIALS) + 2  # + the failed ties and the interrupted svd
    assert trials["trial"].is_unique and trials["run_id"].is_unique
    status = dict(zip(trials["trial"].fillna(trials["run_name"]), trials["status"],
                      strict=True))
    assert status["ties"] == "failed" and status["svd"] == "running or interrupted"
    assert all(status[key] == "finished" for key, *_ in TRIALS)
    # The duplicated key keeps its finished run and says it had two.
    row = trials[trials["trial"] == "linear-8-s0"].iloc[0]
    assert row["status"] == "finished" and row["n_runs"] == 2 and row["objective"] == 0.05
    assert len(fake.duplicates) == 1 and fake.duplicates.iloc[0]["status"] == "failed"
    # Best first, unfinished last; params and metrics are columns with their values.
    assert trials.iloc[0]["trial"] == "cat-randn" and trials.iloc[0]["objective"] == 0.20
    assert list(trials["status"].iloc[-2:]) != ["finished"] * 2
    assert trials.iloc[0]["test/math_code/accuracy"] == 0.18
    assert trials.iloc[0]["param.init"] == "randn" and trials.iloc[0]["cat_eval_loss"] == 2.5
    assert trials.loc[trials["trial"] == "ties", "param.density"].iloc[0] == 0.5
    assert trials.loc[trials["trial"] == "linear-16-s0", "label"].iloc[0] == "linear r16"
    assert (trials["duration_s"].dropna() >= 0).all()
    assert fake.target == "math_code" and fake.skills == ["math", "code"]
    assert sorted(fake.finetunes["skill"]) == ["code", "math"]
    assert set(fake.finetunes["train_loss"]) == {1.2}  # the last value of the curve


@pytest.mark.unit
def test_method_summary_best_and_spread_over_seeds(fake):
    summary = summaries.method_summary(fake.trials, "math_code").set_index("method")
    linear = summary.loc["linear"]
    assert linear["best_validation"] == 0.12 and linear["best_trial"] == "linear r16"
    # Seed 0's best is 0.12 (r16), seed 1's 0.07: mean 0.095, sample std 0.0354.
    assert linear["seeds"] == 2 and linear["seed_mean"] == pytest.approx(0.095)
    assert linear["seed_std"] == pytest.approx(0.05 / 2 ** 0.5)
    assert linear["seed_stderr"] == pytest.approx(0.025)  # std / sqrt(2)
    assert summary.loc["cat_learned", "test"] == 0.18
    assert pd.isna(summary.loc["cat_learned", "seed_std"])  # one seed: no spread
    assert pd.isna(summary.loc["cat_learned", "seed_stderr"])
    assert summary.loc["ties", "finished"] == 0 and summary.loc["ties", "trials"] == 1
    assert summary.index[0] == "cat_learned"


@pytest.mark.unit
def test_candidate_summary_is_the_mean_and_standard_error_over_seeds(fake):
    assert summaries.several_seeds(fake.trials)  # linear r8 ran with seeds 0 and 1
    table = summaries.candidate_summary(fake.trials, "math_code").set_index("candidate")
    r8 = table.loc["linear r8"]  # 0.05 and 0.07: mean 0.06, sample std 0.01414, / sqrt(2)
    assert r8["seeds"] == 2 and r8["validation"] == pytest.approx(0.06)
    assert r8["validation_stderr"] == pytest.approx(0.01)
    assert table.loc["linear r16", "seeds"] == 1
    assert pd.isna(table.loc["linear r16", "validation_stderr"])  # one seed: no spread
    best = table.loc["cat_learned r8 (init=randn)"]
    assert best["test"] == 0.18 and best["test_seeds"] == 1
    assert table.index[0] == "cat_learned r8 (init=randn)"  # best mean first
    assert "ties r8 (density=0.5)" not in table.index  # the failed trial is no candidate
    one_seed = fake.trials[fake.trials["seed"] == 0]
    assert not summaries.several_seeds(one_seed)


@pytest.mark.unit
def test_retention_is_the_share_of_each_skill_loras_own_score(fake):
    assert summaries.skill_references(fake.trials, ["math", "code"]) == {"math": 0.4,
                                                                         "code": 0.3}
    table = summaries.retention(fake.trials, ["math", "code"]).set_index("method")
    assert table.loc["cat_learned", "retention/math"] == pytest.approx(0.30 / 0.40)
    assert table.loc["cat_learned", "retention/code"] == pytest.approx(0.24 / 0.30)
    assert table.loc["linear", "retention/math"] == pytest.approx(0.5)  # r16 is its best
    # Each skill LoRA alone is its own entry and keeps all of its skill.
    assert table.loc["skill (code)", "trial"] == "skill r8 (skill=code)"
    assert table.loc["skill (code)", "retention/code"] == 1.0
    assert table.loc["skill (math)", "retention/math"] == 1.0
    assert table.loc["skill (math)", "retention/code"] == 0.0


@pytest.mark.unit
def test_rank_by_method_cat_settings_and_progress(fake):
    grid = summaries.rank_by_method(fake.trials)
    assert grid.loc["linear", 8] == 0.07 and grid.loc["linear", 16] == 0.12
    assert pd.isna(grid.loc["cat_learned", 16]) and "base" not in grid.index
    cat = summaries.cat_setting_summary(fake.trials).set_index(["setting", "value"])
    assert cat.loc[("init", "randn"), "best_validation"] == 0.20
    assert cat.loc[("init", "uniform"), "mean_held_out_loss"] == 2.0
    # Settings the space did not vary take CatSettings' defaults.
    assert cat.loc[("granularity", "module"), "trials"] == 2
    assert cat.loc[("normalisation", "softmax"), "mean_validation"] == pytest.approx(0.18)
    progress = summaries.best_so_far(fake.trials)
    assert list(progress["trial_number"]) == list(range(1, len(TRIALS) + 1))
    assert list(progress["best_so_far"]) == list(progress["objective"].cummax())
    assert progress["best_so_far"].iloc[-1] == 0.20
    assert progress["minutes"].is_monotonic_increasing


@pytest.mark.unit
def test_every_figure_draws_data(fake):
    from analysis.runs import cat_weights

    trials = fake.trials
    assert _non_empty(figures.method_comparison(trials, "math_code"))
    assert _non_empty(figures.skill_retention(trials, ["math", "code"]))
    assert _non_empty(figures.rank_method_heatmap(trials, "math_code"))
    assert _non_empty(figures.cat_settings(trials, "math_code"))
    assert _non_empty(figures.search_progress(trials))
    record = cat_weights(fake, trials.iloc[0]["run_id"])
    assert record == CAT_RECORD
    assert _non_empty(figures.learned_cat_weights(record, ["math", "code"]))
    # Without data a figure says so instead of drawing an empty axis.
    empty = trials[trials["method"] == "svd"]
    fig = figures.method_comparison(empty, "math_code")
    assert "no finished trials" in fig.axes[0].texts[0].get_text()


@pytest.mark.unit
def test_report_has_every_section_links_and_configuration(fake, tmp_path):
    path = write_report([fake], tmp_path / "report")
    page = path.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert page.count("data:image/png;base64,") >= 6  # the figures are embedded
    for run_id in fake.trials["run_id"]:
        assert f"/runs/{run_id}" in page  # every trial links to its MLflow run
    assert "search: {space: paper}" in page  # the logged study.yaml
    assert "0.180" in page  # the selected trial's test accuracy
    # Several seeds (linear r8): each candidate's mean ± standard error over them.
    assert "Per candidate over its seeds" in page and "0.060 ± 0.010" in page
    table = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(table) == len(fake.trials)
    # A comparison of the same study under two names puts both in one report.
    both = render([fake, fake], mlflow_ui="http://mlflow.example:5000")
    assert both.count("<h3>fake</h3>") >= 2
    assert "http://mlflow.example:5000/#/experiments/" in both


@pytest.mark.unit
def test_report_compares_several_studies(fake, tmp_path):
    home = Path(fake.tracking_uri[len("sqlite:///"):]).parent  # a second study beside it
    uri = _write_fake_study(home, "fake2", 0.05)
    second = load_study("fake2", uri)
    assert second.trials.iloc[0]["objective"] == pytest.approx(0.25)
    both = combined([fake, second])
    assert len(both) == 20 and set(both["study"]) == {"fake", "fake2"}
    summary = summaries.method_summary(both, "math_code")
    best = summary.set_index(["study", "method"])["best_validation"]
    assert best[("fake", "cat_learned")] == 0.20
    assert best[("fake2", "cat_learned")] == pytest.approx(0.25)
    labels = figures.method_comparison(both, "math_code").axes[0].get_legend_handles_labels()[1]
    assert {"best trial (fake)", "best trial (fake2)"} <= set(labels)
    progress = figures.search_progress(both)
    assert len(progress.axes[0].lines) == 2  # one best-so-far line per study
    path = write_report([fake, second], tmp_path / "cmp")
    page = path.read_text()
    assert "<h3>fake</h3>" in page and "<h3>fake2</h3>" in page
    assert len(pd.read_csv(tmp_path / "cmp" / "trials.csv")) == 20


@pytest.mark.unit
def test_unknown_study_or_store_is_a_clear_error(fake, tmp_path):
    with pytest.raises(StudyNotFound, match=r"no study 'nope' .*studies there: fake"):
        load_study("nope", fake.tracking_uri)
    missing = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(StudyNotFound, match="no MLflow database at"):
        load_study(STUDY, f"sqlite:///{missing}")
    assert not missing.exists()  # reading never creates a store
    done = run_soups(tmp_path, "report", "nope", "--tracking-uri", fake.tracking_uri,
                     timeout=120)
    assert done.returncode == 2 and "no study 'nope'" in done.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.unit
def test_report_command_writes_the_report(fake, tmp_path):
    out = tmp_path / "out"
    done = run_soups(tmp_path, "report", STUDY, "--tracking-uri", fake.tracking_uri,
                     "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "report.html").is_file() and "wrote" in done.stdout
    assert re.search(r"\(10 trials\)", done.stdout)


NOTEBOOK_FIGURES = {"compare_methods.ipynb": 4, "cat_weights.ipynb": 3}


# --- the smoke study of the session -------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_runs(smoke_study, smoke_home):
    return load_study("smoke", f"sqlite:///{smoke_home / 'mlflow.db'}")


@pytest.mark.integration
def test_smoke_study_loads_one_row_per_trial(smoke_runs, smoke_home):
    trials = smoke_runs.trials
    board = json.loads((smoke_home / "smoke" / "leaderboard.json").read_text())
    assert len(trials) == len(board) == 17  # paper.yaml: 17 trials
    assert set(trials["run_id"]) == {r["run_id"] for r in board}
    assert (trials["status"] == "finished").all() and (trials["n_runs"] == 1).all()
    for task in ("math_code", "math", "code"):
        assert trials[f"validation/{task}/accuracy"].between(0, 1).all()
    assert trials.iloc[0]["objective"] == board[0]["objective"]
    assert smoke_runs.target == "math_code" and smoke_runs.skills == ["math", "code"]
    assert len(smoke_runs.finetunes) == 3


@pytest.mark.integration
def test_smoke_study_figures_and_report(smoke_runs, smoke_home, tmp_path):
    trials = smoke_runs.trials
    assert _non_empty(figures.method_comparison(trials, "math_code"))
    assert _non_empty(figures.skill_retention(trials, smoke_runs.skills))
    assert _non_empty(figures.rank_method_heatmap(trials, "math_code"))
    assert _non_empty(figures.cat_settings(trials, "math_code"))
    assert _non_empty(figures.search_progress(trials))
    done = run_soups(smoke_home, "report", "smoke", "--out", str(tmp_path / "r"), timeout=300)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r" / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "Learned CAT weights" in page and 'alt="CAT weights"' in page
    assert "paper.yaml" in page
    assert len(combined([smoke_runs, smoke_runs])) == 2 * len(trials) == 34


@pytest.mark.integration
@pytest.mark.parametrize("notebook", sorted((ROOT / "analysis" / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_notebook_runs_against_the_smoke_study(notebook, smoke_runs, smoke_home, tmp_path):
    import papermill

    out = tmp_path / notebook.name
    papermill.execute_notebook(
        str(notebook), str(out), cwd=str(ROOT), kernel_name="python3", progress_bar=False,
        parameters={"study": "smoke",
                    "tracking_uri": f"sqlite:///{smoke_home / 'mlflow.db'}"})
    executed = json.loads(out.read_text())
    outputs = [o for cell in executed["cells"] if cell["cell_type"] == "code"
               for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images == NOTEBOOK_FIGURES[notebook.name], "a figure of the notebook is missing"
