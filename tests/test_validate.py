"""`soups validate FILE` on a study file: the spec's keys and value ranges and its search
space, checked offline (nothing trained or loaded); exit 0 with a one-line summary, or 2 with
one `error:` line naming file, key and value. A cluster file still gets the cluster checks."""

from pathlib import Path

import pytest
from conftest import assert_user_error
from typer.testing import CliRunner

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _validate(*args):
    from study.cli import app

    return CliRunner().invoke(app, ["validate", *map(str, args)])


def test_valid_study_prints_its_summary(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("name: exp1\nsearch: {space: wide}\n")
    done = _validate(study)
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == (f"{study}: valid (study exp1, 2 skills, target math_code, "
                                   "search space wide: 16 methods)")


def test_shipped_cluster_study_is_valid():
    done = _validate(ROOT / "docs" / "cluster_study.yaml")
    assert done.exit_code == 0, done.output
    assert "valid (study default, 2 skills, target math_code, search space paper: 13 methods)" \
        in done.stdout


@pytest.mark.parametrize(("text", "named"), [
    ("finetune:\n  micro_batch_size: 0\n", ["finetune.micro_batch_size", "(got 0)"]),
    ("cat:\n  fraction: 7\n", ["cat.fraction", "(got 7)"]),
    ("finetune:\n  dropout: 1.0\n", ["finetune.dropout", "less than 1", "(got 1.0)"]),
])
def test_study_with_a_bad_value_exits_2_naming_file_key_and_value(tmp_path, text, named):
    study = tmp_path / "study.yaml"
    study.write_text(text)
    assert_user_error(["validate", study], study, *named)


def test_study_whose_space_has_a_bad_value_exits_2_naming_the_space(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("methods:\n  base: {}\n  ties: {density: 3}\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"search: {{space: {space}}}\n")
    line = assert_user_error(["validate", study], space, "methods.ties.density")
    assert line.endswith("methods.ties.density: 3 is outside (0, 1]")


def test_study_whose_space_samples_the_rank_is_refused(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("methods:\n  ties: {density: 0.5}\nrank: {randint: [4, 17]}\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"search: {{space: {space}}}\n")
    assert_user_error(["validate", study], space, "rank must be a constant, grid or choice")


def test_study_option_goes_with_a_cluster_file_only(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("name: x\n")
    assert_user_error(["validate", study, "--study", study], study, "--study goes with a "
                                                                    "cluster file")


def test_file_kind_is_decided_by_its_top_level_keys(tmp_path):
    from study.cmd_validate import is_cluster_file

    assert is_cluster_file(ROOT / "cluster.yaml")
    assert not is_cluster_file(ROOT / "docs" / "cluster_study.yaml")
    ray_up = tmp_path / "mine.yaml"
    ray_up.write_text("cluster_name: x\n")
    assert is_cluster_file(ray_up)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert not is_cluster_file(empty)  # an empty study is the default study


def test_cluster_file_still_gets_the_cluster_checks(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster_name: x\nmax_worker: 2\n")
    done = _validate(bad)
    assert done.exit_code == 1
    assert f"error: {bad}: max_worker: unknown key" in done.output


def test_a_missing_local_source_is_named_offline(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("skills:\n  math: {source: generated}\n  code: {source: generated, "
                     "scorer: program}\ntarget:\n  gsm: {source: ./no/such.jsonl, "
                     "scorer: program, carve: {sizes: {validation: 5, test: rest}}}\n"
                     "objective: {task: gsm}\n")
    assert_user_error(["validate", study], str(study), "task gsm", "./no/such.jsonl",
                      "no such folder or file")
