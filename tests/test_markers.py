"""The tier check of conftest.py: collection fails, naming the test, when a test carries
neither `unit` nor `integration` or both; a correctly marked file collects. Each case runs
`pytest --collect-only` in a fresh interpreter on a probe file written into tests/ (so the
real conftest applies) under a name that no `test_*.py` pattern collects, and removes it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
PROBE = """import pytest


def test_probe_without_a_tier():
    pass


@pytest.mark.unit
@pytest.mark.integration
def test_probe_with_both_tiers():
    pass


@pytest.mark.unit
def test_probe_with_one_tier():
    pass
"""
MARKED = """import pytest

pytestmark = pytest.mark.unit


def test_probe_marked_by_the_module():
    pass
"""


def _collect(source: str) -> subprocess.CompletedProcess:
    # `probe_*.py` matches no `python_files` pattern: a concurrent run of the suite never
    # collects the probe; pytest collects it here because it is named on the command line.
    probe = ROOT / "tests" / f"probe_markers_{uuid.uuid4().hex}.py"
    probe.write_text(source)
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(probe)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        probe.unlink(missing_ok=True)


def test_collection_fails_naming_each_test_without_exactly_one_tier():
    done = _collect(PROBE)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "2 test(s) need exactly one tier marker" in output, output
    message = output[output.index("2 test(s) need exactly one tier marker"):]
    assert "::test_probe_without_a_tier: no tier" in message
    assert "::test_probe_with_both_tiers: unit and integration" in message
    assert "test_probe_with_one_tier" not in message
    assert "pytestmark = pytest.mark.unit" in message  # the message says how to fix it


def test_a_file_marked_at_module_level_collects():
    done = _collect(MARKED)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "1 test collected" in done.stdout
