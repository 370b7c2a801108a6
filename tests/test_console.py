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
