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
from soups.base_model import ModelError
from soups.cat.settings import CatError
from soups.data import DatasetError
from soups.errors import SoupsError
from soups.evaluate import EvaluationError
from soups.gguf_base import GgufError
from soups.lorahub import LorahubError
from soups.merge import MergeError
from soups.moe import MoeError
from soups.prompts import TemplateError
from soups.sandbox import SandboxUnavailable
from soups.sandbox.seccomp import SeccompUnavailable
from soups.scoring import ScorerError
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
NOT_ERRORS = {"StopTraining"}  # soups/cat/train.py: a signal that ends training early


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
from soups.evaluate import EvaluationError
from soups.lorahub import LorahubError

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
