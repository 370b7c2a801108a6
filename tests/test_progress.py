"""The study's trial lines (trainables/progress.py): done out of the total, and an ETA from
the pace of the trials that ended in this process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit


def _trial(status: str, method: str = "ties", objective: float | None = None):
    return SimpleNamespace(status=status, config={"variant": {"method": method, "rank": 8,
                                                              "params": {}}},
                           last_result={"objective": objective} if objective else {},
                           error_file=None)


def test_trial_lines_count_out_of_the_total_with_an_eta(monkeypatch):
    import trainables.progress as progress
    from trainables.tuner import _total_trials

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    lines: list[str] = []
    shown = progress.StudyProgress(lines.append, total=5)
    trials = [_trial("RUNNING"), _trial("RUNNING", "linear"), _trial("PENDING")]
    shown.on_trial_start(0, trials, trials[0])
    assert "0/5 done, 2 running, 0 failed, 1 pending |" in lines[-1]
    assert "ETA" not in lines[-1]  # no trial has ended: no pace yet
    clock[0] += 120
    trials[0] = _trial("TERMINATED", objective=0.5)
    shown.on_trial_complete(0, trials, trials[0])
    # one trial in 120 s, four left: 8 minutes
    assert "1/5 done, 1 running, 0 failed, 1 pending, ETA 8m00s" in lines[-1]
    assert "finished ties r8: 0.500" in lines[-1]
    assert progress.duration(3 * 3600 + 5 * 60) == "3h05m" and progress.duration(9) == "9s"
    assert _total_trials({"variant": {"grid_search": [1, 2, 3]}}, 2) == 6
    assert _total_trials({}, 7) == 7


def test_a_resumed_study_paces_its_eta_from_its_own_start(monkeypatch):
    """Tune unpickles a resumed study's callback as it was first built; `setup` (called as
    every run starts) restarts its clock, so the ETA is this run's pace, not the first run's
    elapsed time over this run's trials."""
    import pickle

    import trainables.progress as progress
    from study.console import say

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    first = progress.StudyProgress(say, total=4)
    saved = pickle.dumps(first)  # what Tuner.restore reads back, hours later
    clock[0] += 7200
    resumed = pickle.loads(saved)
    lines: list[str] = []
    resumed._print = lines.append
    resumed.setup(total_num_samples=4)
    clock[0] += 60
    trials = [_trial("TERMINATED", objective=0.5), _trial("TERMINATED"),
              _trial("TERMINATED"), _trial("RUNNING")]
    resumed.on_trial_complete(0, trials, trials[2])
    assert lines[-1].startswith("[    60s] trials: 3/4 done")
    assert "ETA 1m00s" in lines[-1]  # one trial in this run's 60 s, one left
    assert "best 0.500 ties r8" in lines[-1]  # a trial of the first run holds the best
