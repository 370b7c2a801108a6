"""The shipped GSM-Hard study (studies/lora_soups_gsm_hard.yaml), as a user runs it, on small
datasets in the real schemas (MetaMathQA, CodeAlpaca, GSM-Hard) with the embedded model as
its base: carving, decontamination, the Alpaca and program-aided templates, 8 few-shot
demos, stop sequences, the program, number and loss scorers, the generations artifacts and
the export; then `soups data preview` and `soups validate` on the same study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import real_schemas
from conftest import run_soups

from soups.names import candidate_label

pytestmark = pytest.mark.integration

STUDY = "studies/lora_soups_gsm_hard.yaml"
NAME = "gsm_hard_e2e"
PLANTED = 3  # GSM-Hard questions planted in the math skill's data


def _planted_in_train(math: Path, gsm: Path) -> int:
    """How many planted rows the math skill's carve puts in its train split (the others are
    in its validation split, which decontamination leaves alone)."""
    from soups.data.sources import Carve, carve_rows

    rows = [json.loads(line) for line in math.read_text().splitlines()]
    carved = carve_rows(rows, Carve({"validation": 12, "train": "rest"}, 0, "query"), "math")
    planted = set(real_schemas.gsm_hard_questions(gsm)[:PLANTED])
    return sum(r["query"] in planted for r in carved["train"])


@pytest.fixture(scope="module")
def removed(overrides) -> int:
    return overrides.removed


class Overrides(list):
    removed: int


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, smoke_home) -> Overrides:
    data = tmp_path_factory.mktemp("real_schemas")
    gsm = real_schemas.gsm_hard(data / "gsm_hard.jsonl", n=30)
    math = real_schemas.metamathqa(data / "metamathqa.jsonl", n=120,
                                   also=real_schemas.gsm_hard_questions(gsm)[:PLANTED])
    code = real_schemas.codealpaca(data / "codealpaca.json", n=120)
    space = data / "space.yaml"
    space.write_text("methods:\n  linear: {}\n  cat_learned: {}\n")
    settings = {
        "base_model": "embedded",  # the shipped build, as the smoke study
        "skills.math.source": math, "skills.code.source": code, "target.gsm_hard.source": gsm,
        "skills.math.carve.sizes": "{validation: 12, train: rest}",
        "skills.code.carve.sizes": "{validation: 12, train: rest}",
        "target.gsm_hard.carve.sizes": "{validation: 12, test: rest}",
        "target.gsm_hard.generation.max_new_tokens": 40,
        "skills.math.generation.max_new_tokens": 40,
        "finetune.ranks": "[4]", "finetune.max_steps": 6, "finetune.micro_batch_size": 8,
        "finetune.grad_accumulation": 1, "finetune.warmup_steps": 2,
        "finetune.use_gpu": "false", "finetune.zero_stage": 0,
        "cat.count": 32, "cat.max_steps": 4, "cat.held_out": 16, "cat.eval_every": 2,
        "cat.micro_batch_size": 8, "cat.warmup_steps": 1,
        "search.space": space, "search.gpus_per_trial": 0, "search.cpus_per_trial": 1,
        "search.max_concurrent_trials": 2, "evaluation.batch_size": 12,
    }
    out = Overrides(f"--set={key}={value}" for key, value in settings.items())
    out.removed = _planted_in_train(math, gsm)
    assert out.removed  # the carve's seed keeps some planted rows in train
    return out


@pytest.fixture(scope="module")
def study(smoke_home, overrides):
    done = run_soups(smoke_home, "run", STUDY, "--name", NAME, *overrides)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def _runs(home: Path, role: str):
    client = _client(home)
    experiment = client.get_experiment_by_name(NAME)
    return [r for r in client.search_runs([experiment.experiment_id], max_results=100)
            if r.data.tags.get("soups.role") == role]


def test_the_study_runs_every_candidate_and_exports_the_best(study, smoke_home, removed):
    rows = json.loads((smoke_home / NAME / "leaderboard.json").read_text())
    assert {r["method"] for r in rows} == {"linear", "cat_learned"}
    assert all(r["status"] == "finished" for r in rows), rows
    assert 0.0 <= rows[0]["test"] <= 1.0
    assert (smoke_home / NAME / "best_adapter" / "adapter_config.json").is_file()
    assert f"decontamination: removed {removed} math train rows" in study.stdout


def test_the_parent_run_records_each_tasks_data(study, smoke_home, removed):
    (parent,) = _runs(smoke_home, "parent")
    params, metrics = parent.data.params, parent.data.metrics
    assert params["data.gsm_hard.kind"] == "file" and len(params["data.gsm_hard.sha256"]) == 64
    assert metrics["data/gsm_hard/validation_rows"] == 12
    assert metrics["data/gsm_hard/test_rows"] == 18
    assert metrics["data/math/decontaminated"] == removed
    assert metrics["data/math/train_rows"] == 120 + PLANTED - 12 - removed


def _artifact_lines(run_id: str, path: str, home: Path) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return [json.loads(line) for line in Path(local).read_text().splitlines()]


def test_every_trial_logs_its_generations_and_settings(study, smoke_home):
    from soups.data.prompts import PRESETS

    trials = _runs(smoke_home, "trial")
    assert len(trials) == 2
    # The settings every trial shares are logged once, on the study's parent run.
    (parent,) = _runs(smoke_home, "parent")
    params = parent.data.params
    assert params["task.gsm_hard.generation.max_new_tokens"] == "40"
    assert "\\nQ:" in params["task.gsm_hard.generation.stop"] or \
        "\nQ:" in params["task.gsm_hard.generation.stop"]
    first_demo = PRESETS["pal"].demos[0]
    for run in trials:
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        assert not any(key.startswith("task.") for key in params), params
        varied = {k: v for k, v in params.items() if k not in ("method", "rank", "seed")}
        assert run.info.run_name == candidate_label(params["method"], params.get("rank"), varied)
        assert "validation/code/loss" in metrics and "validation/code/accuracy" not in metrics
        assert 0.0 <= metrics["validation/gsm_hard/accuracy"] <= 1.0
        records = _artifact_lines(run.info.run_id, "generations/validation/gsm_hard.jsonl",
                                  smoke_home)
        assert len(records) == 12
        for record in records:
            assert {"prompt", "output", "extracted", "reference", "correct"} <= set(record)
            assert record["prompt"].startswith("Q: " + first_demo["question"])
            assert record["prompt"].count("def solution():") == 8  # 8 demos, then the question
            assert "\nQ:" not in record["output"]  # cut at the stop sequence
        math = _artifact_lines(run.info.run_id, "generations/validation/math.jsonl",
                               smoke_home)
        assert len(math) == 12 and all("### Instruction:" in r["prompt"] for r in math)
        # The same answers as an MLflow table (the UI shows it as one), output and
        # correctness before the long prompt; its rows are the records, in order.
        (table,) = _artifact_lines(run.info.run_id,
                                   "generations/validation/gsm_hard.table.json", smoke_home)
        assert table["columns"][:3] == ["output", "correct", "parsed"]
        assert [row[0] for row in table["data"]] == [r["output"] for r in records]
        assert metrics["validation/gsm_hard/parsed"] == \
            sum(r["parsed"] for r in records) / len(records)
    best = json.loads((smoke_home / NAME / "leaderboard.json").read_text())[0]
    test = _artifact_lines(best["run_id"], "generations/test/gsm_hard.jsonl", smoke_home)
    assert len(test) == 18


def test_data_preview_shows_the_rendered_study(study, smoke_home, overrides):
    done = run_soups(smoke_home, "data", "preview", STUDY, "--task", "gsm_hard", "-n", "1",
                     *overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== gsm_hard (target) ==" in out and "== math" not in out
    assert "rows: train 0, validation 12, test 18" in out
    assert out.count("def solution():") >= 9  # 8 demos and the reference program
    assert "scorer: program" in out


def test_validate_checks_the_shipped_studies_offline(smoke_home, overrides):
    done = run_soups(smoke_home, "validate", STUDY)
    assert done.returncode == 2 and "set base_model" in done.stderr
    done = run_soups(smoke_home, "validate", STUDY, *overrides)
    assert done.returncode == 0, done.stderr
    assert "valid (study lora_soups_gsm_hard, 2 skills, target gsm_hard" in done.stdout
