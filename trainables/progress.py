"""Live study progress in the terminal: one line per trial event with trials done / running /
failed and the best objective so far (Ray's own table reporter is turned off)."""

from __future__ import annotations

import time

from ray.tune import Callback

from soups.names import OBJECTIVE, candidate_label


def describe(config: dict) -> str:
    """A trial's candidate: `ties r8 (density=0.75)` (its seed, if any, left out)."""
    variant = config.get("variant", {})
    return candidate_label(variant.get("method"), variant.get("rank"), variant.get("params"))


def _trial(config: dict) -> str:
    """A trial in the progress lines: its candidate, and its seed on a seed axis."""
    variant = config.get("variant", {})
    return candidate_label(variant.get("method"), variant.get("rank"), variant.get("params"),
                           variant.get("seed"))


def duration(seconds: float) -> str:
    """`42s`, `7m05s`, `1h12m`: an ETA as a person reads it."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StudyProgress(Callback):
    """`total`: the trials the search will run (None where the searcher decides)."""

    def __init__(self, print_fn=print, total: int | None = None):
        self._print = print_fn
        self._start = time.time()
        self._total = total
        self._ended_here = 0  # trials that ended in this process: the pace of the ETA

    def setup(self, **info):
        # Tune calls this as a run starts, a resumed one too. A resumed study's Tuner is
        # unpickled with the callback as it was first built: without this its clock would
        # read from the study's first start while the pace counts only this run's trials
        # (a resumed 3-trial tail showed an ETA of 6 hours).
        self._start = time.time()
        self._ended_here = 0

    def _counts(self, trials) -> str:
        states = [t.status for t in trials]
        done, failed = states.count("TERMINATED"), states.count("ERROR")
        total = self._total or len(states)
        text = (f"{done}/{total} done, {states.count('RUNNING')} running, {failed} failed"
                + (f", {states.count('PENDING')} pending" if "PENDING" in states else ""))
        left = total - done - failed
        if self._ended_here and left > 0:
            pace = (time.time() - self._start) / self._ended_here
            text += f", ETA {duration(pace * left)}"
        return text

    def _line(self, trials, event: str) -> None:
        # The best is read from the trials' results, not kept: a resumed study's trials carry
        # the results of its earlier runs.
        scored = [(t.last_result[OBJECTIVE], _trial(t.config)) for t in trials
                  if (t.last_result or {}).get(OBJECTIVE) is not None]
        top = max(scored, key=lambda s: s[0], default=None)
        best = f"best {top[0]:.3f} {top[1]}" if top else "best -"
        self._print(f"[{time.time() - self._start:6.0f}s] trials: {self._counts(trials)} | "
                    f"{best} | {event}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, f"started {_trial(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended_here += 1
        score = (trial.last_result or {}).get(OBJECTIVE)
        shown = f"{score:.3f}" if score is not None else "stopped early"
        self._line(trials, f"finished {_trial(trial.config)}: {shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended_here += 1
        where = f" (traceback: {trial.error_file})" if trial.error_file else ""
        self._line(trials, f"FAILED {_trial(trial.config)}: {_last_line(trial)}{where}")


def _last_line(trial) -> str:
    """The exception line of a failed trial (its full traceback is in its error file)."""
    try:
        error = trial.get_error()
        text = str(error).strip().splitlines() if error is not None else []
    except Exception:
        text = []
    return text[-1][:300] if text else "error"
