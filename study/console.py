"""The terminal during a study: the study's own lines, the fine-tune step bars (with their
ETA) and the trial lines; everything else goes to `<study>/logs/study.log`.

"Everything else" is Ray's and the libraries' output: the driver's C++ logs and anything
written to its file descriptors 1 and 2 (redirected to the log file), Python warnings and
the lines of every Ray worker and actor (Ray's driver-side log handler is replaced by one
that writes them to the log file, keeping for the terminal the fine-tunes' progress lines
and, on a terminal, their distributed tqdm step bars with ETA).
Python's `sys.stdout` / `sys.stderr` stay the terminal, so the study's prints, the bars and
a failure's traceback are shown in full. Each line shown is also written to the log.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

LOG_DIR = "logs"
LOG_FILE = "study.log"
_HANDLER = "soups_study_log"

_active: StudyConsole | None = None


class StudyConsole:
    """Context manager; `say(line)` shows a line on the terminal and logs it."""

    def __init__(self, study_dir: str | Path):
        self.path = Path(study_dir) / LOG_DIR / LOG_FILE
        self._lock = threading.Lock()
        self._saved: dict = {}

    def __enter__(self) -> StudyConsole:
        global _active
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        sys.stdout.flush()
        sys.stderr.flush()
        # The terminal, on descriptors of its own; 1 and 2 then point at the log file.
        terminal_out, terminal_err = os.dup(1), os.dup(2)
        self._saved = {"stdout": sys.stdout, "stderr": sys.stderr, "fds": (terminal_out,
                       terminal_err), "showwarning": warnings.showwarning}
        sys.stdout = os.fdopen(os.dup(terminal_out), "w", buffering=1, encoding="utf-8",
                               errors="replace")
        sys.stderr = os.fdopen(os.dup(terminal_err), "w", buffering=1, encoding="utf-8",
                               errors="replace")
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        warnings.showwarning = self._warning
        _quiet_transformers()
        _active = self
        self._write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}")
        return self

    def __exit__(self, kind, error, trace) -> None:
        global _active
        if error is not None:  # the terminal gets the traceback from Python; the log too
            import traceback

            self._write("".join(traceback.format_exception(kind, error, trace)).rstrip())
        _active = None
        self._release_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        out_fd, err_fd = self._saved["fds"]
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        sys.stdout.flush()  # left open: a bar created during the study may still hold it
        sys.stdout, sys.stderr = self._saved["stdout"], self._saved["stderr"]
        warnings.showwarning = self._saved["showwarning"]
        self._log.close()

    def say(self, line: str = "") -> None:
        """Show `line` on the terminal (above any progress bar) and log it."""
        hide, show = _tqdm_hiding()
        with self._lock:
            hide()
            print(line, file=sys.stdout, flush=True)
            show()
        self._write(line)

    def _write(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self._write(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    def route_ray_logs(self) -> None:
        """After `ray.init`: worker and actor lines go to the log, bars to the terminal."""
        try:
            from ray._private import worker as ray_worker
            from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
        except ImportError:  # a Ray without these private hooks: its lines stay visible
            return
        from trainables.finetune_settings import PROGRESS_PREFIX

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        bars = sys.stderr.isatty()  # redrawn bars only garble a file or a CI log

        def handler(data: dict) -> None:
            source = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({source} pid={data.get('pid')}, ip={data.get('ip')})"
            for line in data.get("lines", []):
                if RAY_TQDM_MAGIC in line:
                    if bars:
                        ray_worker.process_tqdm(line)
                elif PROGRESS_PREFIX in line:
                    self.say("  " + line.split(PROGRESS_PREFIX, 1)[1])
                else:
                    self._write(f"{prefix} {line}")

        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(_HANDLER, handler)
        self._ray = (dispatcher, ray_worker)

    def _release_ray(self) -> None:
        """Give the worker lines back to Ray's own handler."""
        ray = getattr(self, "_ray", None)
        if ray is None:
            return
        import functools

        dispatcher, ray_worker = ray
        dispatcher.remove_handler(_HANDLER)
        dispatcher.add_handler("ray_print_logs", functools.partial(
            ray_worker.print_to_stdstream, ignore_prefix=False))
        del self._ray


def _quiet_transformers() -> None:
    """The driver's weight-loading and shard-writing bars and info lines are library noise
    (the workers are quieted through their environment)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _tqdm_hiding():
    """Functions that hide and show Ray's distributed bars around a printed line."""
    try:
        from ray.experimental import tqdm_ray

        manager = tqdm_ray.instance()
        return manager.hide_bars, manager.unhide_bars
    except Exception:
        return (lambda: None), (lambda: None)


def active() -> StudyConsole | None:
    """The console of the study running in this process, if any."""
    return _active
