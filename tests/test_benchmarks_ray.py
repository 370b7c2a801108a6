"""The benchmarks that start Ray: each one's tiny mode (under a minute), printing its table
(integration tier: they start a Ray instance; the unit-tier ones are in test_benchmarks.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_finetune_overhead_quick(capsys, tmp_path, monkeypatch):
    from benchmarks import finetune_overhead

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    rows = finetune_overhead.main(["--quick"])
    assert "steady tok/s" in capsys.readouterr().out
    assert set(rows) == {"plain PEFT loop", "Ray Train + DeepSpeed (1 worker)"}
    assert all(r["steps"] == 4 and r["steady_tokens_per_s"] > 0 for r in rows.values())


def test_mlflow_load_quick(capsys, tmp_path):
    import ray

    from benchmarks import mlflow_load

    try:
        report = mlflow_load.main(["--quick", "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'load.db'}",
                                   "--storage", str(tmp_path / "tune")])
    finally:
        ray.shutdown()
    assert '"expected_runs": 4' in capsys.readouterr().out
    assert report["runs"] == report["finished_runs"] == 4 and report["duplicated_keys"] == 0
    assert report["metric_points"] == report["expected_metric_points"] == 4 * 2 * 3
