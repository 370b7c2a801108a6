"""The metric and tag names of `soups.names`: composed names parse back, and the shared names
are written in that module only (the contract between the writers and the readers)."""

import ast
from pathlib import Path

import pytest

from soups import names

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit

PACKAGES = ("soups", "trainables", "study", "analysis")
# Names no module but soups/names.py spells out (other modules import the constant).
SHARED = {
    names.STUDY_TAG, names.ROLE_TAG, names.KEY_TAG, names.PARENT_TAG, names.RUN_NAME_TAG,
    names.NODE_TAG, names.LOSS_TAG, names.DRIVER_TAG, names.BEST_METHOD_TAG, names.TRIAL_ID,
    names.OBJECTIVE, names.MLFLOW_RUN_ID, names.WALL_SECONDS, names.EVAL_SECONDS,
    names.CAT_STEP, names.CAT_EVAL_LOSS, names.CAT_TRAIN_LOSS, names.CAT_TRAINABLE_PARAMETERS,
    names.CAT_BEST_EVAL_LOSS, names.CAT_BEST_STEP, names.BEST_OBJECTIVE,
    names.BEST_TEST_ACCURACY,
}
# Pieces of composed names (`task_metric`, `best_metric`), f-string parts included.
PREFIXES = (f"{names.VALIDATION}/", f"{names.TEST}/", names.BEST_PREFIX)
SUFFIXES = (f"/{names.ACCURACY}", f"/{names.EVAL_SECONDS}")


@pytest.mark.parametrize("split", [names.VALIDATION, names.TEST])
@pytest.mark.parametrize("metric", [names.ACCURACY, names.EVAL_SECONDS, "parsed"])
def test_task_metric_round_trip(split, metric):
    key = names.task_metric(split, "math", metric)
    assert key == f"{split}/math/{metric}"
    assert names.split_task_metric(key) == (split, "math", metric)
    assert names.accuracy_task(key, split) == ("math" if metric == names.ACCURACY else None)


def test_task_metric_defaults_and_other_keys():
    assert names.task_metric(names.VALIDATION, "code") == "validation/code/accuracy"
    assert names.accuracy_task("validation/code/accuracy") == "code"
    assert names.accuracy_task("test/code/accuracy") is None
    for key in (names.OBJECTIVE, "retention/math", "best/test/math/accuracy", "a//b", 3):
        assert names.split_task_metric(key) is None
        assert names.accuracy_task(key) is None
    assert names.best_metric("test/math/accuracy") == "best/test/math/accuracy"


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_shared_names_are_spelled_in_soups_names_only():
    own = ROOT / "soups" / "names.py"
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == own:
                continue
            for line, text in _string_constants(path):
                if text in SHARED or text.startswith(PREFIXES) or text.endswith(SUFFIXES):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "use the constants and functions of soups.names:\n" + "\n".join(found)
