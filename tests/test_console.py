"""The study's terminal (study/console.py): a reader that goes away (`soups run | head`) does
not end the study; its lines still reach the study's log."""

from __future__ import annotations

import os

import pytest

from study.console import LOG_DIR, LOG_FILE, StudyConsole

pytestmark = pytest.mark.unit


def test_the_console_outlives_a_closed_terminal_pipe(tmp_path):
    with StudyConsole(tmp_path) as console:
        read, write = os.pipe()
        os.close(read)  # the reader has gone: every write to the terminal fails with EPIPE
        console.out = os.fdopen(write, "w", buffering=1)
        console.say("stage 1: LoRA math")
        console.say("study done")
    log = (tmp_path / LOG_DIR / LOG_FILE).read_text()
    assert "stage 1: LoRA math" in log and "study done" in log


def test_each_step_bar_update_is_drawn_once_and_never_after_its_bar_closed():
    """Ray delivers each worker line several times; an update arriving after its bar closed
    would draw a finished bar again (stale 100% bars above the next ones)."""
    import json

    from study.console import _BarUpdates

    def update(bar: str, x: int, closed: bool = False) -> str:
        return json.dumps({"__ray_tqdm_magic_token__": True, "uuid": bar, "x": x,
                           "desc": "LoRA math r8 steps", "total": 100, "closed": closed})

    bars = _BarUpdates()
    first, last, done = update("a", 1), update("a", 99), update("a", 100, closed=True)
    assert [bars.fresh(line) for line in (first, first, first)] == [True, False, False]
    assert bars.fresh(last) and bars.fresh(done)
    assert not bars.fresh(last) and not bars.fresh(update("a", 100))  # late: bar closed
    assert bars.fresh(update("b", 1))  # the next fine-tune's bar is drawn
    assert bars.fresh("not json")  # left to Ray, which reports a corrupt line
