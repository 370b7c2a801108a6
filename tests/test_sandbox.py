"""The sandbox: correct programs return their values; programs that loop, allocate without
bound, write outside their directory, spawn processes, read our secrets or kill their
parent are scored as not run, and harm nothing."""

import os
import time

import pytest

from soups.sandbox import ExecutionResult, run_function, run_many

pytestmark = pytest.mark.unit


def test_correct_program_returns_its_values():
    program = "def add(a, b):\n    return a + b"
    assert run_function(program, "add", [(1, 2), (40, 2)]) == \
        ExecutionResult(True, True, (3, 42), None)


def test_syntax_error_and_missing_function_do_not_parse():
    assert not run_function("def solution(:\n    return 1").parsed
    result = run_function("def other():\n    return 1")
    assert not result.parsed and "solution" in result.error


def test_exception_is_not_ran():
    result = run_function("def solution():\n    return 1 / 0")
    assert result.parsed and not result.ran and "ZeroDivisionError" in result.error


def test_infinite_loop_and_sleep_time_out():
    start = time.monotonic()
    spin = run_function("def solution():\n    while True:\n        pass", timeout_s=1)
    sleep = run_function("import time\ndef solution():\n    time.sleep(60)", timeout_s=1)
    assert not spin.ran and "timeout" in spin.error
    assert not sleep.ran and sleep.error == "timeout"
    assert time.monotonic() - start < 10


def test_unbounded_allocation_is_stopped():
    result = run_function("def solution():\n    x = []\n    while True:\n"
                          "        x.append(bytearray(10**7))", memory_mb=128)
    assert not result.ran and "MemoryError" in result.error


def test_writes_outside_the_work_dir_are_refused(tmp_path):
    target = tmp_path / "owned.txt"
    program = f"def solution():\n    open({str(target)!r}, 'w').write('x')\n    return 1"
    assert not run_function(program).ran
    assert not target.exists()
    inside = "def solution():\n    open('a.txt', 'w').write('ok')\n    return open('a.txt').read()"
    assert run_function(inside).outputs == ("ok",)


def test_parent_survives_kill_attempts():
    for program in ("import os\ndef solution():\n    os.kill(os.getppid(), 9)",
                    "import os\ndef solution():\n    os.killpg(0, 9)",
                    "import os, signal\ndef solution():\n    os.kill(1, signal.SIGTERM)"):
        assert not run_function(program).ran
    assert run_function("def solution():\n    return 1").outputs == (1,)  # we are alive


def test_process_creation_is_refused():
    fork_bomb = "import os\ndef solution():\n    while True:\n        os.fork()"
    spawn = "import subprocess\ndef solution():\n    subprocess.run(['sleep', '30'])"
    system = "import os\ndef solution():\n    os.system('touch /tmp/soups-pwned')"
    for program in (fork_bomb, spawn, system):
        result = run_function(program, timeout_s=2)
        assert not result.ran
    assert not os.path.exists("/tmp/soups-pwned")


def test_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    program = "import os\ndef solution():\n    return sorted(os.environ.items())"
    (env,) = run_function(program).outputs
    assert "secret-token" not in str(env) and "hunter2" not in str(env)


def test_network_is_refused():
    program = "import socket\ndef solution():\n    socket.socket()\n    return 1"
    assert not run_function(program).ran


def test_stdout_noise_and_odd_values():
    program = "def solution():\n    print('noise ' * 1000)\n    return {1, 2}"
    assert run_function(program).outputs == ("{1, 2}",)


def test_run_many_keeps_order():
    programs = [f"def solution():\n    return {i}" for i in range(24)]
    results = run_many(programs, workers=4)
    assert [r.outputs for r in results] == [(i,) for i in range(24)]
