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


def test_merge_vs_peft_quick(capsys):
    """Our merge against PEFT's on small modules: the same deltas (rel. error < 1e-4)."""
    from benchmarks import merge_vs_peft

    rows = merge_vs_peft.main(["--quick"])
    assert "speedup" in capsys.readouterr().out
    assert [r["method"] for r in rows] == ["ties", "svd"]
    assert all(r["ours_s"] > 0 and r["peft_s"] > 0 for r in rows)
    assert all(r["max_relative_error"] < 1e-4 for r in rows)


def test_cat_step_quick(capsys):
    from benchmarks import cat_step

    rows = cat_step.main(["--quick"])
    assert "(a) one LoRA r=8" in capsys.readouterr().out
    assert {r["side"] for r in rows} == {"CAT (concatenated)", "(a) one LoRA r=8",
                                         "(b) PEFT k adapters + scalars"}
    cat = next(r for r in rows if r["side"] == "CAT (concatenated)")
    assert cat["trainable"] == 2 * 2 * 5 and cat["ms"] > 0  # 2 LoRAs x 2 layers x 5 modules


def test_eval_throughput_quick(capsys, tmp_path, monkeypatch):
    from benchmarks import eval_throughput

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    result = eval_throughput.main(["--quick"])
    assert "examples/s" in capsys.readouterr().out
    assert result["prompts"] == 4 and result["identical"] == 4  # batching changes no answer


def test_embedded_tasks_quick(capsys, tmp_path, monkeypatch):
    from benchmarks import embedded_tasks

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    table = embedded_tasks.main(["--quick", "--work", str(tmp_path / "work")])
    assert "data_mix" in capsys.readouterr().out
    assert set(table) == {"base", "math", "code", "data_mix"}
    assert all(0.0 <= cell["accuracy"] <= 1.0 for row in table.values() for cell in row.values())


def test_eval_candidates_quick(capsys):
    from benchmarks import eval_candidates

    results = eval_candidates.main(["--quick"])
    out = capsys.readouterr().out
    assert "identical answers: resident, side4" in out
    assert [r["mode"] for r in results] == ["merged", "resident", "side4"]


def test_composition_quick(capsys, tmp_path, monkeypatch):
    from benchmarks import composition

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    report = composition.main(["--quick", "--work", str(tmp_path / "work")])
    assert "gold-answer NLL" in capsys.readouterr().out
    assert {"base", "math", "code", "sum", "cat_learned", "oracle_softmax",
            "cat_math+random"} <= set(report["scores"])
