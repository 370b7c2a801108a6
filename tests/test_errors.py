"""One error type and one handler: every project error is a `SoupsError` (soups/errors.py);
the command line (study/cli.py) prints one as `error: <message>` with exit status 2 and no
traceback, whether it runs as `python -m study.cli` or through `CliRunner`; any other
exception (a bug) is not swallowed and keeps its traceback."""

from __future__ import annotations

import ast
import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_soups
from typer.testing import CliRunner

from analysis.runs import StudyNotFound
from search_spaces import SearchSpaceError
from soups.adapters import AdapterError
from soups.compose.cat.settings import CatError
from soups.compose.lorahub import LorahubError
from soups.compose.merge import MergeError
from soups.compose.moe import MoeError
from soups.data.datasets import DatasetError
from soups.data.prompts import TemplateError
from soups.errors import SoupsError
from soups.evaluation.evaluate import EvaluationError
from soups.evaluation.sandbox import SandboxUnavailable
from soups.evaluation.sandbox.seccomp import SeccompUnavailable
from soups.evaluation.scoring import ScorerError
from soups.training.base_model import ModelError
from soups.training.gguf_base import GgufError
from study.cli import app
from study.spec import SpecError
from trainables.candidates import CandidateError
from trainables.shared_storage import StorageNotShared

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
PROJECT_ERRORS = (AdapterError, CandidateError, CatError, DatasetError, EvaluationError,
                  GgufError, LorahubError, MergeError, ModelError, MoeError, SandboxUnavailable,
                  ScorerError, SeccompUnavailable, SearchSpaceError, SpecError,
                  StorageNotShared, StudyNotFound, TemplateError)
NOT_ERRORS = {"StopTraining"}  # soups/compose/cat/train.py: a signal that ends training early


@pytest.mark.parametrize("error", PROJECT_ERRORS, ids=lambda error: error.__name__)
def test_every_project_error_is_a_soups_error(error):
    assert issubclass(error, SoupsError) and issubclass(error, ValueError)


def test_errors_keep_their_former_bases():
    for error in (SandboxUnavailable, SeccompUnavailable, StorageNotShared):
        assert issubclass(error, RuntimeError)
    assert issubclass(StudyNotFound, LookupError)


def _is_exception(base: ast.expr) -> bool:
    name = base.id if isinstance(base, ast.Name) else ""
    builtin = getattr(builtins, name, None)
    return name == "SoupsError" or isinstance(builtin, type) and issubclass(builtin,
                                                                             BaseException)


def _exception_classes() -> set[str]:
    """Names of the classes the packages define on an exception base (builtin or SoupsError)."""
    return {node.name for package in ("soups", "trainables", "study", "search_spaces", "analysis")
            for path in (ROOT / package).rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and any(map(_is_exception, node.bases))}


def test_the_list_above_holds_every_project_error():
    found = _exception_classes() - NOT_ERRORS - {"SoupsError"}
    assert found == {error.__name__ for error in PROJECT_ERRORS}


def _validate_raising(monkeypatch, error: Exception):
    """`soups validate` (CliRunner) whose check raises `error`."""
    import study.cluster_check

    def check(*args):
        raise error

    monkeypatch.setattr(study.cluster_check, "check_cluster_file", check)
    return CliRunner().invoke(app, ["validate", "cluster.yaml"])


def test_a_soups_error_is_one_line_and_exit_status_2(monkeypatch):
    result = _validate_raising(monkeypatch, SoupsError("cluster.yaml: bad value 'x'"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == "error: cluster.yaml: bad value 'x'\n"


def test_an_unexpected_exception_is_not_swallowed(monkeypatch):
    bug = KeyError("a bug")
    result = _validate_raising(monkeypatch, bug)
    assert result.exit_code == 1 and result.exception is bug
    assert "error:" not in result.output


MAIN = """
import sys
import study.cluster_check
from soups.errors import SoupsError
from soups.evaluation.evaluate import EvaluationError
from soups.compose.lorahub import LorahubError

def check(*args):
    raise {error}

study.cluster_check.check_cluster_file = check
from study.cli import main
sys.argv = ["soups", "validate", "cluster.yaml"]
main()
"""


@pytest.mark.parametrize("error, status", [("SoupsError('bad value 7')", 2),
                                           ("KeyError('a bug')", 1)])
def test_the_main_entry_point_has_the_same_handler(error, status):
    done = subprocess.run([sys.executable, "-c", MAIN.format(error=error)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    if status == 2:
        assert done.stderr == "error: bad value 7\n"
    else:
        assert "Traceback" in done.stderr and "KeyError: 'a bug'" in done.stderr


def test_a_real_bad_input_through_python_m_study_cli(tmp_path):
    done = run_soups(tmp_path, "run", str(tmp_path / "nope.yaml"), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == f"error: {tmp_path / 'nope.yaml'}: no such file\n"


def test_output_to_a_closed_pipe_ends_quietly():
    """`soups methods | head`: when the reader has gone, the command ends quietly, status 1
    (click's convention) and no traceback (the pipe's read end is closed before the command
    writes anything)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "study.cli", "methods"], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("text, message", [
    ("name: x\nfinetune: [1,\n", "not valid YAML: line 3, column 1: expected the node content"),
    ("name: x\nfinetune:\n  learning_rat: 1\n",
     "unknown key 'finetune.learning_rat'; did you mean 'learning_rate'?"),
    ("name: x\nskills:\n  math: {source: generated, scorr: program}\n"
     "  code: {source: generated}\n", "unknown key 'skills.math.scorr'; did you mean 'scorer'?"),
    ("name: x\nsearh: {}\n", "unknown key 'searh'; did you mean 'search'?"),
])
def test_bad_study_files_are_one_line_with_a_suggestion(tmp_path, text, message):
    """Malformed YAML and misspelt keys: exit status 2, one line naming the file, the place
    or key, and the closest allowed key."""
    study = tmp_path / "study.yaml"
    study.write_text(text)
    for command in ("validate", "run"):
        done = run_soups(tmp_path, command, str(study), timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith(f"error: {study}: ") and message in done.stderr
        assert done.stderr.count("\n") == 1 and "<unicode string>" not in done.stderr
        assert done.stderr.count(str(study)) == 1


def test_misspelt_names_get_a_suggestion(tmp_path):
    from search_spaces import SearchSpaceError, parse_space
    from study.resolve import method_parameters
    from trainables.candidates import CANDIDATES

    with pytest.raises(SearchSpaceError, match=r"unknown method 'tie'; did you mean 'ties'\?"):
        parse_space({"methods": {"tie": {}}}, "s.yaml", method_parameters, CANDIDATES.names())
    with pytest.raises(SearchSpaceError, match=r"'desnity'.*did you mean 'density'\?"):
        parse_space({"methods": {"ties": {"desnity": 0.5}}}, "s.yaml", method_parameters)
    with pytest.raises(CandidateError, match=r"did you mean 'lorahub'\?"):
        CANDIDATES.get("lora_hub")
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "study.yaml").write_text("name: smoke\n")
    done = run_soups(tmp_path, "status", "smok", timeout=120)
    assert done.returncode == 2 and "did you mean 'smoke'?" in done.stderr
    assert "did you mean" not in run_soups(tmp_path, "status", "zzz", timeout=120).stderr


def test_version_and_help_in_workflow_order():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"soups {version('lora-soups')}\n"
    listed = CliRunner().invoke(app, ["--help"]).output
    import re

    names = re.findall(r"^│ (\w+) ", listed, re.MULTILINE)
    order = ["validate", "prepare", "run", "status", "resume", "report", "export", "methods"]
    assert [n for n in names if n in order] == order, listed
