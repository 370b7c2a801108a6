"""The study end to end, as a user runs it: `soups run --smoke` in a subprocess (Ray Tune,
Ray Train + DeepSpeed fine-tunes, MLflow in SQLite), then the MLflow runs, the leaderboard,
the export (against the trial's merged model) and the registry alias are checked; a second
study is killed mid-search with SIGKILL and resumed without repeated trials or duplicate runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_soups as _soups

from trainables.tuner import trial_states

pytestmark = pytest.mark.integration

PAPER_METHODS = {"cat_learned", "data_mix", "ties", "dare_ties", "linear", "cat", "svd",
                 "lorahub", "lora_moe", "knots", "lora_lego", "skill", "base"}
SOUPS = [sys.executable, "-m", "study.cli"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(smoke_home) -> Path:
    return smoke_home


@pytest.fixture(scope="module")
def smoke(smoke_study):
    return smoke_study


def _client(home: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    return MlflowClient()


def _runs(home: Path, experiment: str, role: str | None = None):
    client = _client(home)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if role is None or r.data.tags.get("soups.role") == role]


def test_smoke_study_prints_a_leaderboard_of_every_paper_method(smoke, home):
    rows = json.loads((home / "smoke" / "leaderboard.json").read_text())
    assert {r["method"] for r in rows} == PAPER_METHODS
    assert len(rows) == 17  # paper.yaml: skill per skill, cat_learned per init, cat per weights
    assert all(r["status"] == "finished" for r in rows)
    assert rows[0]["objective"] == max(r["objective"] for r in rows)
    assert 0.0 <= rows[0]["test"] <= 1.0
    for row in rows:
        assert row["candidate"].split()[0] in smoke.stdout
    assert "test split of math_code" in smoke.stdout
    assert "trials: " in smoke.stdout  # live progress lines
    assert "17 done" in smoke.stdout and "/17 done" in smoke.stdout  # out of the total
    # It ends with the next steps (nothing after them): the report, the export, the UI link.
    tail = smoke.stdout[smoke.stdout.rindex("\nnext:"):]
    assert "soups report smoke" in tail and "soups export smoke --out DIR" in tail
    assert "viewStateShareKey=soups-trials" in tail and tail.rstrip().endswith("mlflow.db)")


def _accuracy(rows: list[dict], method: str, task: str, **params) -> float:
    (row,) = [r for r in rows if r["method"] == method
              and all(r["params"].get(k) == v for k, v in params.items())]
    return row["metrics"][f"validation/{task}/accuracy"]


def test_smoke_skills_are_learned_and_merges_keep_them(smoke, home):
    """A loose but real bound (docs/embedded.md), so that a broken merge, CAT or DATA-MIX
    fails CI as a number: on the smoke study (100 fine-tune steps, 40 validation rows) each
    skill LoRA clearly learns its skill, DATA-MIX composes them on the target, and a static
    cat that leans on one skill keeps more than half of that skill (measured: math LoRA 0.53,
    code LoRA 0.47; cat [1, 0.25] keeps math 0.50, [0.25, 1] code 0.42; DATA-MIX 0.53 on
    the target where each skill LoRA scores 0)."""
    rows = json.loads((home / "smoke" / "leaderboard.json").read_text())
    math_skill = _accuracy(rows, "skill", "math", skill="math")
    code_skill = _accuracy(rows, "skill", "code", skill="code")
    assert math_skill >= 0.25 and code_skill >= 0.25
    assert _accuracy(rows, "base", "math") <= 0.1 and _accuracy(rows, "base", "code") <= 0.1
    target = "math_code"
    singles = max(_accuracy(rows, "skill", target, skill=s) for s in ("math", "code"))
    assert _accuracy(rows, "data_mix", target) >= max(0.25, singles + 0.15)
    assert _accuracy(rows, "cat", "math", weights=[1.0, 0.25]) > 0.5 * math_skill
    assert _accuracy(rows, "cat", "code", weights=[0.25, 1.0]) > 0.5 * code_skill


# What the terminal must not show during a study (it all belongs in the study's log).
CONSOLE_NOISE = ("PlacementGroupCleaner", "core_worker", "Warning", "WARNING", "INFO",
                 "Traceback", "pid=", "%|", "it/s", "step/s", "Started a local Ray")


def test_console_shows_progress_and_the_log_holds_the_rest(smoke, home):
    console = smoke.stdout + smoke.stderr
    for noise in CONSOLE_NOISE:
        assert noise not in console, f"{noise!r} on the console"
    log = home / "smoke" / "logs" / "study.log"
    assert f"logs are in {log}" in smoke.stdout
    text = log.read_text(errors="replace")
    assert "pid=" in text  # the workers' and Ray's lines went there
    progress = [line for line in smoke.stdout.splitlines() if line.startswith("  [LoRA ")]
    assert progress and len(progress) == len(set(progress))  # each fine-tune line once
    assert all(line in text for line in progress)  # and in the log too
    # Named by skill and rank, not by a cache hash; without a terminal (here) a line every
    # 5% of the steps with tokens/s and the time left, so a long fine-tune is never quiet.
    assert "[finetune-" not in smoke.stdout
    math = [line for line in progress if line.startswith("  [LoRA math r8]")]
    paced = [line for line in math if "%)" in line]
    assert len(paced) >= 15 and all("tokens/s" in line for line in math)
    assert "ETA" in paced[0] and "step 5/100 (5%)" in paced[0]
    assert "the shipped build" in smoke.stdout  # the base model is copied, not pretrained


def test_every_fine_tune_and_trial_is_one_finished_mlflow_run(smoke, home):
    runs = _runs(home, "smoke")
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = [r for r in runs if r.data.tags["soups.role"] == "parent"]
    assert len(parents) == 1
    parent = parents[0].info.run_id
    finetunes = [r for r in runs if r.data.tags["soups.role"] == "finetune"]
    trials = [r for r in runs if r.data.tags["soups.role"] == "trial"]
    assert sorted(r.data.params["skill"] for r in finetunes) == ["code", "data_mix", "math"]
    assert len(trials) == 17
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in finetunes + trials)
    for run in trials:
        assert run.data.params["method"] in PAPER_METHODS
        assert run.data.tags["method"] == run.data.params["method"]
        assert "mlflow.source.git.commit" in run.data.tags and "version.peft" in run.data.tags
        metrics = run.data.metrics
        for task in ("math_code", "math", "code"):
            assert 0.0 <= metrics[f"validation/{task}/accuracy"] <= 1.0
        assert metrics["objective"] == metrics["validation/math_code/accuracy"]
        assert metrics["build_seconds"] >= 0
    for run in finetunes:
        history = _client(home).get_metric_history(run.info.run_id, "train_loss")
        assert history, "fine-tune runs carry their loss curve"
    cat = next(r for r in trials if r.data.params["method"] == "cat_learned")
    artifacts = [a.path for a in _client(home).list_artifacts(cat.info.run_id)]
    assert {"cat_weights.json", "cat_weights.png"} <= set(artifacts)
    assert cat.data.metrics["cat_trainable_parameters"] == 2 * 4 * 5  # 2 LoRAs x 20 modules
    curve = _client(home).get_metric_history(cat.info.run_id, "cat_eval_loss")
    assert len(curve) >= 2  # one point per CAT evaluation step
    # LoraHub logs each evaluation of its search as a step, and its search record.
    hub = next(r for r in trials if r.data.params["method"] == "lorahub")
    searched = _client(home).get_metric_history(hub.info.run_id, "search_objective")
    assert [m.step for m in searched] == list(range(1, 41))  # its default budget
    assert hub.data.metrics["search_best_objective"] == min(m.value for m in searched)
    assert "lorahub.json" in [a.path for a in _client(home).list_artifacts(hub.info.run_id)]
    # The mixture of experts trains its routers like CAT: a held-out curve for ASHA.
    moe = next(r for r in trials if r.data.params["method"] == "lora_moe")
    assert len(_client(home).get_metric_history(moe.info.run_id, "cat_eval_loss")) >= 2
    # 2 experts x 4 layers x (q, k, v, up on the 192 hidden units + down on the 512)
    assert moe.data.metrics["cat_trainable_parameters"] == 2 * 4 * (4 * 192 + 512)
    parent_artifacts = [a.path for a in _client(home).list_artifacts(parent)]
    assert {"study.yaml", "paper.yaml", "leaderboard.json"} <= set(parent_artifacts)
    # Each task's data as MLflow datasets of the parent run, by role; the experiment opens
    # on its runs (model development), and each trial is named by its candidate.
    inputs = _client(home).get_run(parent).inputs.dataset_inputs
    used = {(d.dataset.name, d.tags[0].value) for d in inputs}
    assert {("math", "train"), ("code", "train"), ("math_code", "validation"),
            ("math_code", "test")} <= used
    assert all(d.dataset.source_type == "local" for d in inputs)
    experiment = _client(home).get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    names = {r.info.run_name for r in trials}
    assert len(names) == 17 and {"linear r8", "base"} <= names


def test_best_adapter_is_exported_and_registered_as_champion(smoke, home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads((home / "smoke" / "leaderboard.json").read_text())
    best = next(r for r in rows if r["method"] not in ("base", "lora_moe"))  # PEFT loads it
    out = tmp_path / "exported"
    done = _soups(home, "export", "smoke", "--out", str(out), "--trial", best["trial"])
    assert done.returncode == 0, done.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    # The exported folder gives the logits of the trial's own merged model.
    trial = json.loads((Path(best["checkpoint"]) / "trial.json").read_text())
    (model_dir,) = (home / "cache" / "base_models").iterdir()  # the smoke study's base model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(["### Question:\nWhat is 3 plus 4?\n### Answer:\n"], return_tensors="pt")
    with torch.no_grad():
        exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                             str(out)).eval()(**ids).logits
        original = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir),
            str(Path(best["checkpoint"]) / "adapter")).eval()(**ids).logits
    torch.testing.assert_close(exported, original, rtol=0, atol=0)
    assert trial["variant"]["method"] == best["method"]
    # The card: a Hugging Face header with the results, and the prompt format the adapter
    # was trained with; the base named as the study named it, not by its cache folder.
    import yaml

    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "peft" and "lora-soups" in header["tags"]
    (result,) = header["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(best["objective"], abs=1e-4)
    assert "## Prompt format" in card and "### Question:" in card
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded"
    # A folder with something in it is replaced only with --force.
    again = _soups(home, "export", "smoke", "--out", str(out), "--trial", best["trial"])
    assert again.returncode == 2 and "--force" in again.stderr
    assert (out / "README.md").read_text() == card
    forced = _soups(home, "export", "smoke", "--out", str(out), "--trial", best["trial"],
                    "--force")
    assert forced.returncode == 0, forced.stderr
    # The study's own export of the best trial is registered with alias `champion` (unless
    # the best candidate is the base model alone, which has no adapter).
    if rows[0]["method"] != "base":
        version = _client(home).get_model_version_by_alias("smoke-champion", "champion")
        assert version.run_id == rows[0]["run_id"]
        folder = "moe.json" if rows[0]["method"] == "lora_moe" else "adapter_config.json"
        assert (home / "smoke" / "best_adapter" / folder).is_file()


def test_status_of_a_finished_study(smoke, home):
    done = _soups(home, "status", "smoke")
    assert done.returncode == 0 and "complete; best" in done.stdout
    missing = _soups(home, "status", "no_such_study")
    assert missing.returncode == 2 and "no study 'no_such_study'" in missing.stderr


RESUME_SPACE = """\
# Run: soups run study.yaml (a test of interrupt and resume)
methods:
  linear: {weights: {grid: [[1.0, 1.0], [0.5, 0.5], [0.8, 0.2], [0.2, 0.8]]}}
  ties: {density: {grid: [0.5, 0.9]}}
"""


def test_killed_study_resumes_without_repeats_or_duplicates(smoke, home, tmp_path):
    """SIGKILL the driver once two trials finished; `soups resume` completes the study:
    six trials, six MLflow trial runs (none duplicated, none left RUNNING), and the trials
    finished before the kill are not run again (one objective value each)."""
    space = tmp_path / "two_methods.yaml"
    space.write_text(RESUME_SPACE)
    study = tmp_path / "study.yaml"
    study.write_text(f"name: resumed\nsearch:\n  space: {space}\n  max_concurrent_trials: 1\n"
                     "evaluation: {skills: false}\n")
    env = {**os.environ, "SOUPS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([*SOUPS, "run", str(study), "--smoke"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.time() + 900
    finished = []
    while time.time() < deadline and driver.poll() is None:
        time.sleep(2)
        # Kill once Tune's saved experiment state records two finished trials (a trial that
        # finished after the last save is legitimately run again, reusing its MLflow run).
        if trial_states(home / "resumed" / "tune").get("TERMINATED", 0) >= 2:
            finished = [r for r in _runs(home, "resumed", "trial")
                        if r.info.status == "FINISHED"]
            break
    assert driver.poll() is None, "the study ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    saved = _terminated_run_keys(home / "resumed")
    before = {r.data.tags["soups.run_key"]: r.info.run_id for r in finished
              if r.data.tags["soups.run_key"] in saved}
    assert len(before) >= 2
    resumed_at = time.time()
    done = _soups(home, "resume", "resumed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The trial lines count from the resume's own start (Tune restores the progress callback
    # as the first run built it), and the closing line says whose time it gives.
    clock = [int(t) for t in re.findall(r"^\[ *(\d+)s\] trials:", done.stdout, re.M)]
    assert clock and max(clock) <= time.time() - resumed_at, done.stdout[-3000:]
    assert "(this run, which resumed it); best" in done.stdout
    trials = _runs(home, "resumed", "trial")
    assert len(trials) == 6 and all(r.info.status == "FINISHED" for r in trials)
    keys = [r.data.tags["soups.run_key"] for r in trials]
    assert len(set(keys)) == 6
    client = _client(home)
    for key, run_id in before.items():
        assert run_id in {r.info.run_id for r in trials}
        assert len(client.get_metric_history(run_id, "objective")) == 1, key
    rows = json.loads((home / "resumed" / "leaderboard.json").read_text())
    assert len(rows) == 6 and {r["method"] for r in rows} == {"linear", "ties"}
    assert len(_runs(home, "resumed", "parent")) == 1
    # The analysis table of the resumed study: one finished row per trial, one run each.
    from analysis.runs import load_study

    table = load_study("resumed", f"sqlite:///{home / 'mlflow.db'}").trials
    assert len(table) == 6 and (table["status"] == "finished").all()
    assert (table["n_runs"] == 1).all() and set(table["run_id"]) == {r["run_id"] for r in rows}


def _terminated_run_keys(root: Path) -> set[str]:
    from ray.tune import ExperimentAnalysis

    from trainables.trial_run import trial_run_key

    analysis = ExperimentAnalysis(str(root / "tune"))
    return {trial_run_key("resumed", t.config["variant"]) for t in analysis.trials
            if t.status == "TERMINATED"}


@pytest.mark.parametrize("yaml_text, message", [
    ("name: bad\nfinetune:\n  rnaks: [8]\n", "unknown key 'finetune.rnaks'"),
    ("name: bad\nsearch:\n  space: {space}\n", "desnity"),
])
def test_bad_study_or_space_fails_naming_the_key(home, tmp_path, yaml_text, message):
    space = tmp_path / "bad_space.yaml"
    space.write_text("methods:\n  ties: {desnity: 0.5}\n")
    study = tmp_path / "study.yaml"
    study.write_text(yaml_text.format(space=space))
    done = _soups(home, "run", str(study), timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (home / "bad").exists()  # nothing was created for a study that did not start


def _snapshot(home: Path, name: str) -> dict:
    """Everything a study has: each MLflow run's status, end time, params, tags and every
    metric's history, and each file of its folder (size, modification time)."""
    client = _client(home)
    runs = {}
    for run in _runs(home, name):
        history = {key: [(m.value, m.step, m.timestamp) for m in
                         client.get_metric_history(run.info.run_id, key)]
                   for key in run.data.metrics}
        runs[run.info.run_id] = (run.info.status, run.info.end_time, run.data.params,
                                 run.data.tags, history)
    files = {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in (home / name).rglob("*") if p.is_file()}
    return {"runs": runs, "files": files}


def test_resuming_a_complete_study_says_so_and_changes_nothing(smoke, home):
    before = _snapshot(home, "smoke")
    assert before["runs"] and before["files"]
    done = _soups(home, "resume", "smoke", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is complete: nothing to resume" in done.stdout
    assert "soups report smoke" in done.stdout and "Traceback" not in done.stderr
    assert _snapshot(home, "smoke") == before
