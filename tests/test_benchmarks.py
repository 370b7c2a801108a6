"""Benchmarks that must keep running: each one's tiny mode, in seconds, printing its table
(the full-size runs are manual: their commands are in each module's docstring)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_sandbox_throughput_quick(capsys):
    from benchmarks import sandbox_throughput

    rates = sandbox_throughput.main(["--quick"])
    out = capsys.readouterr().out
    assert "8 target answers, 2 workers" in out and "this tree / unsafe_subprocess" in out
    assert rates["this tree (bwrap)"] > 0 and rates["this tree (unsafe_subprocess)"] > 0


def test_real_recipe_quick(capsys, tmp_path, monkeypatch):
    from benchmarks import real_recipe

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    results = real_recipe.main(["--quick"])
    out = capsys.readouterr().out
    assert "lowest held-out loss" in out and len(results) == 2
    assert all(r["after"] < r["before"] for r in results)  # a few steps already learn
