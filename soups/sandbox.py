"""Run model-generated Python in a sandboxed subprocess and return what its function returned.

Each program runs in its own interpreter (`python -I -S`: no site, no user paths, no PYTHON*
variables) in a fresh temporary directory that is removed afterwards, with:
- limits set by the child before the program runs: address space (memory), CPU seconds,
  file size, open files and processes;
- when we run as root, the child drops to an unprivileged uid/gid (nobody), so it cannot
  signal our processes or write where that user may not;
- its own session (process group), killed whole on timeout and after every run, so a
  program that loops, sleeps or forks cannot outlive its limits;
- a minimal environment (no tokens or credentials from ours), stdin closed, stdout and
  stderr discarded; results travel on a dedicated pipe, capped in size;
- an audit hook (PEP 578) that refuses process creation, signals, sockets, ctypes and
  writes outside the working directory: a second layer, since the OS limits above are the
  guarantee.
A program that misbehaves gets `ran=False` and an error; nothing else is affected.
"""

from __future__ import annotations

import ast
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MAX_RESULT_BYTES = 1 << 20
NOBODY = 65534
STARTUP_SLACK_S = 2.0  # interpreter start-up is not the program's time

# The child's code: read the job, set limits, drop privileges, install the audit hook, run.
_CHILD = r"""
import json, os, resource, sys
out_fd = int(sys.argv[1])
with open("job.json") as handle:
    job = json.load(handle)
os.remove("job.json")
mem = job["memory_mb"] << 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
cpu = max(1, int(job["timeout_s"] + 0.999))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.getuid() == 0:
    os.setgroups([])
    os.setgid(job["uid"])
    os.setuid(job["uid"])
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
work = os.getcwd()
BLOCKED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "os.kill", "os.killpg", "subprocess.Popen", "socket.__new__", "socket.connect",
           "socket.bind", "ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof",
           "ctypes.cdata", "os.putenv", "os.setuid", "os.chdir", "pty.spawn",
           "signal.pthread_kill"}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
               "shutil.copyfile", "shutil.move"}

def inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else work)
    except Exception:
        return False
    return real == work or real.startswith(work + os.sep)

def hook(event, args):
    if event in BLOCKED:
        raise RuntimeError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1:
        mode, flags = args[1] or "r", args[2] or 0
        writes = any(c in str(mode) for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR))
        if writes and not inside(args[0]):
            raise RuntimeError("sandbox: writing outside the working directory")
    elif event in PATH_EVENTS and args and not inside(args[0]):
        raise RuntimeError(f"sandbox: {event} outside the working directory")

def send(result):
    try:
        data = json.dumps(result)
    except (TypeError, ValueError):
        data = json.dumps({"ok": False, "error": "unserialisable result"})
    os.write(out_fd, data.encode()[: 1 << 20])

namespace = {"__name__": "__sandbox__"}
sys.addaudithook(hook)
try:
    exec(compile(job["program"], "<program>", "exec"), namespace)
    function = namespace.get(job["function"])
    if not callable(function):
        raise NameError(f"no function {job['function']}")
    outputs = []
    for args in job["calls"]:
        value = function(*args)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)[:1000]
        outputs.append(value)
    send({"ok": True, "outputs": outputs})
except BaseException as err:
    send({"ok": False, "error": f"{type(err).__name__}: {err}"[:300]})
"""


@dataclass(frozen=True)
class ExecutionResult:
    parsed: bool  # parses (ast) and defines the function at top level
    ran: bool  # every call returned without exception, timeout or crash
    outputs: tuple  # returned values (JSON-able, else their repr), one per call
    error: str | None  # why not ran: "timeout", "MemoryError: ...", "SyntaxError: ..."


def check_program(program: str, function: str) -> str | None:
    """Why the program cannot be run (syntax error, no such function), or None."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError) as err:
        return f"SyntaxError: {err}"
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if function not in defined:
        return f"no function {function}() defined"
    return None


def _child_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_function(program: str, function: str = "solution", calls: Sequence[Sequence] = ((),),
                 timeout_s: float = 2.0, memory_mb: int = 256) -> ExecutionResult:
    """Execute `program`, then `function(*args)` for each args in `calls`, sandboxed."""
    problem = check_program(program, function)
    if problem is not None:
        return ExecutionResult(False, False, (), problem)
    work = tempfile.mkdtemp(prefix="soups-sandbox-")
    read_fd, write_fd = os.pipe()
    try:
        job = {"program": program, "function": function, "calls": [list(c) for c in calls],
               "timeout_s": timeout_s, "memory_mb": memory_mb, "uid": NOBODY}
        with open(os.path.join(work, "job.json"), "w") as handle:
            json.dump(job, handle)
        if os.getuid() == 0:
            os.chown(work, NOBODY, NOBODY)
            os.chown(os.path.join(work, "job.json"), NOBODY, NOBODY)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD, str(write_fd)], cwd=work,
            env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, pass_fds=(write_fd,), start_new_session=True,
            close_fds=True)
        os.close(write_fd)
        write_fd = -1
        data, timed_out = _collect(proc, read_fd, timeout_s + STARTUP_SLACK_S)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        shutil.rmtree(work, ignore_errors=True)
    if timed_out:
        return ExecutionResult(True, False, (), "timeout")
    try:
        result = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        code = proc.returncode
        if code == -signal.SIGXCPU:
            return ExecutionResult(True, False, (), "timeout (cpu time limit)")
        reason = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
        return ExecutionResult(True, False, (), f"crashed ({reason})")
    if not result.get("ok"):
        return ExecutionResult(True, False, (), result.get("error", "error"))
    return ExecutionResult(True, True, tuple(result["outputs"]), None)


def _collect(proc: subprocess.Popen, read_fd: int, deadline_s: float) -> tuple[bytes, bool]:
    """Read the result pipe until the child exits or the deadline passes (then kill the
    whole process group). Returns (bytes read, timed out)."""
    chunks, size, end = [], 0, time.monotonic() + deadline_s
    timed_out = False
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(left, 0.05))
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:  # every writer closed: the child is done
                    break
                if size < MAX_RESULT_BYTES:
                    chunks.append(chunk)
                    size += len(chunk)
            elif proc.poll() is not None:
                break
    finally:
        _kill_group(proc.pid)  # also reaps anything the program left behind
        proc.wait()
    return b"".join(chunks)[:MAX_RESULT_BYTES], timed_out


def run_many(programs: Sequence[str], function: str = "solution",
             calls: Sequence[Sequence] = ((),), timeout_s: float = 2.0, memory_mb: int = 256,
             workers: int | None = None) -> list[ExecutionResult]:
    """`run_function` over many programs in parallel subprocesses, results in input order."""
    workers = workers or max(1, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_function(p, function, calls, timeout_s, memory_mb),
                             programs))
