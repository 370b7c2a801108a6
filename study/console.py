"""The terminal during a study: the study's own lines, the fine-tunes' progress (their step
bars with ETA on a terminal, their loss lines) and the trial lines; everything else goes to
`<study>/logs/study.log`, whose path the study prints first.

Everything else is sent to the log by default, not filtered out one noise at a time: file
descriptors 1 and 2 of the driver point at the log file while the study runs, so Ray's C++
logs, every logger, warning, print and library progress bar of the driver land there; and
Ray's driver-side handler of worker output is replaced by one that writes every worker and
actor line to the log, except the fine-tunes' progress, which it shows. The terminal is
written to only through `say` and the step bars, on descriptors kept aside. A failure's
traceback reaches the terminal in full: the study's exception leaves the console (which
restores the descriptors) before Python or the command line prints it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from trainables.finetune_settings import PACE_PREFIX, PROGRESS_PREFIX

LOG_DIR = "logs"
LOG_FILE = "study.log"
_HANDLER = "soups_study_log"

_active: StudyConsole | None = None


class StudyConsole:
    """Context manager; `say(line)` shows a line on the terminal and logs it."""

    def __init__(self, study_dir: str | Path):
        self.path = Path(study_dir) / LOG_DIR / LOG_FILE
        self._lock = threading.RLock()
        self._shown: set[str] = set()  # progress lines already shown (Ray may send twice)
        self._ray = None
        self._closed = False  # the terminal's reader went away (a closed pipe)
        self._bars = _BarUpdates()

    def __enter__(self) -> StudyConsole:
        global _active
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        sys.stdout.flush()
        sys.stderr.flush()
        self._fds = (os.dup(1), os.dup(2))  # the terminal, kept aside
        self.out = os.fdopen(os.dup(self._fds[0]), "w", buffering=1, encoding="utf-8",
                             errors="replace")
        self.err = os.fdopen(os.dup(self._fds[1]), "w", buffering=1, encoding="utf-8",
                             errors="replace")
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        _quiet_transformers()
        _active = self
        self._write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}")
        return self

    def __exit__(self, kind, error, trace) -> None:
        global _active
        if error is not None:  # logged here; shown in full by whoever catches it outside
            self._write("".join(traceback.format_exception(kind, error, trace)).rstrip())
        _active = None
        self._release_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        with contextlib.suppress(BrokenPipeError):
            self.out.flush()
        with contextlib.suppress(BrokenPipeError):
            self.err.flush()  # left open: a step bar made during the study may still hold it
        self._log.close()

    def say(self, line: str = "") -> None:
        """Show `line` on the terminal (above any step bar) and log it."""
        hide, show = _bar_hiding() if self._ray is not None else (_nothing, _nothing)
        with self._lock:
            if not self._closed:
                hide()
                try:
                    print(line, file=self.out, flush=True)
                except BrokenPipeError:  # `soups run | head`: the study goes on, logged
                    self._closed = True
                show()
            self._write(line)  # the lock is reentrant

    def _write(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")

    def route_ray_logs(self) -> None:
        """After `ray.init`: worker and actor lines to the log, progress to the terminal."""
        try:
            from ray._private import worker as ray_worker  # lazy: ray
            from ray.experimental import tqdm_ray  # lazy: ray
        except ImportError:  # a Ray without these private hooks: its lines stay in the log
            return
        bars = self.err.isatty()  # redrawn bars would only garble a file or a CI log
        if bars and tqdm_ray.real_tqdm is not None:
            tqdm_ray.real_tqdm = _BarsOn(tqdm_ray.real_tqdm, self.err)

        def handler(data: dict) -> None:
            source = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({source} pid={data.get('pid')}, ip={data.get('ip')})".replace("( ", "(")
            lines = data.get("lines", [])
            if data.get("pid") == "autoscaler":  # its events, not its status every 5 s
                lines = list(ray_worker.filter_autoscaler_events(lines))
            for line in lines:
                if tqdm_ray.RAY_TQDM_MAGIC in line:
                    if bars and self._bars.fresh(line):
                        ray_worker.process_tqdm(line)
                elif PROGRESS_PREFIX in line or PACE_PREFIX in line:
                    pace = PACE_PREFIX in line
                    text = "  " + line.split(PACE_PREFIX if pace else PROGRESS_PREFIX, 1)[1]
                    if text in self._shown:
                        continue
                    self._shown.add(text)
                    if pace and bars:  # the step bar shows the same, redrawn in place
                        self._write(text)
                    else:
                        self.say(text)
                else:
                    self._write(f"{prefix} {line}")

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(_HANDLER, handler)
        self._ray = (dispatcher, ray_worker, tqdm_ray)

    def _release_ray(self) -> None:
        """Give worker output back to Ray's own handler."""
        if self._ray is None:
            return
        dispatcher, ray_worker, tqdm_ray = self._ray
        dispatcher.remove_handler(_HANDLER)
        dispatcher.add_handler("ray_print_logs", functools.partial(
            ray_worker.print_to_stdstream, ignore_prefix=False))
        if isinstance(tqdm_ray.real_tqdm, _BarsOn):
            tqdm_ray.real_tqdm = tqdm_ray.real_tqdm.module
        self._ray = None


class _BarUpdates:
    """Which of Ray's step-bar updates to draw. Ray delivers a worker's line more than once
    (three times each, measured under a terminal): drawn again, an update that arrives after
    its bar closed re-creates the bar, and finished bars pile up above the next ones and
    after the study's summary. Each update is drawn once, and nothing of a closed bar."""

    def __init__(self, remembered: int = 512):
        self._recent: collections.deque[str] = collections.deque(maxlen=remembered)
        self._closed: set[str] = set()

    def fresh(self, line: str) -> bool:
        try:
            state = json.loads(line)
        except ValueError:
            return True  # not ours to judge: Ray reports a corrupt line itself
        bar = str(state.get("uuid"))
        if bar in self._closed or line in self._recent:
            return False
        self._recent.append(line)
        if state.get("closed"):
            self._closed.add(bar)
        return True


class _BarsOn:
    """`tqdm.auto` with its bars drawn on the kept-aside terminal (Ray's distributed tqdm
    draws with `real_tqdm.tqdm(...)`, which would write to the log's descriptor)."""

    def __init__(self, module, stream):
        self.module = module
        self.tqdm = functools.partial(module.tqdm, file=stream)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _nothing() -> None:
    return None


def _bar_hiding():
    """Functions that hide and show Ray's distributed bars around a printed line."""
    from ray.experimental import tqdm_ray  # lazy: ray

    manager = tqdm_ray.instance()
    return manager.hide_bars, manager.unhide_bars


def _quiet_transformers() -> None:
    """No weight-loading or shard-writing bars in the log (the workers are quieted through
    their environment)."""
    try:
        from transformers.utils import logging as hf_logging  # lazy: transformers
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def say(line: str = "") -> None:
    """Show a line through the running study's console, else print it. A module function,
    so a callback that Ray pickles (the Tune progress callback) can hold it."""
    if _active is not None:
        _active.say(line)
    else:
        print(line, flush=True)


def active() -> StudyConsole | None:
    """The console of the study running in this process, if any."""
    return _active
