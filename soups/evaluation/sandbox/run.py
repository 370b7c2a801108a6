"""Running programs: one sandbox per program, the job over stdin, the result over a pipe.

The parent never reads back a file the program could reach and never raises on what the
program does: a timeout, a crash, a malformed or oversized result each give that program
`ran=False` with the reason, and every other program keeps its own result.
"""

from __future__ import annotations

import functools
import json
import os
import re
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
from pathlib import Path

from soups.errors import SoupsError
from soups.evaluation.sandbox import bwrap, cgroup, seccomp
from soups.evaluation.sandbox.result import MAX_RESULT_BYTES, ExecutionResult, failed, parse_result

BWRAP = "bwrap"
UNSAFE = "unsafe_subprocess"  # no isolation at all: for users who run inside their own container
SANDBOXES = (BWRAP, UNSAFE)
HARNESS = (Path(__file__).parent / "harness.py").read_text()
MAX_PROGRAM_CHARS = 100_000
STARTUP_SLACK_S = 2.0  # interpreter start-up is not the program's time
EXIT_GRACE_S = 1.0  # after its result, the time a sandbox has to exit before it is killed
FILE_MB, TMP_MB, OPEN_FILES = 1, 16, 64
INSTALL_HINT = ("install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu), "
                "`sudo dnf install bubblewrap` (Fedora/RHEL); or, only inside a container of "
                f"your own, set `evaluation.sandbox: {UNSAFE}`")
USERNS_HINT = (
    "this system forbids unprivileged user namespaces. On Ubuntu 23.10+ / Debian 13+ "
    "(kernel.apparmor_restrict_unprivileged_userns=1, bubblewrap issue #632) install an "
    "AppArmor profile for /usr/bin/bwrap (as cluster.yaml does; Ubuntu 25.04 ships "
    "`bwrap-userns-restrict`) or, as root, `sysctl kernel.apparmor_restrict_unprivileged_"
    "userns=0`. Inside a Docker container (its default seccomp profile refuses namespaces) "
    "run it with `--security-opt seccomp=unconfined`, or, the container being your "
    f"boundary, set `evaluation.sandbox: {UNSAFE}`")


class SandboxUnavailable(SoupsError, RuntimeError):
    """Programs cannot be run safely here (the message says how to fix it)."""


@dataclass(frozen=True)
class ProgramJob:
    program: str  # the program, or with `extract` a model's whole answer that holds it
    function: str = "solution"
    calls: tuple = ((),)  # argument lists, one call each
    extract: bool = False  # cut the program out of the answer inside the sandbox


def memory_bound_mb(memory_mb: int) -> int:
    """What one sandbox may hold in all, kernel memory included: its memory cgroup's limit."""
    return memory_mb + TMP_MB + cgroup.KERNEL_SLACK_MB


def _defines(program: str, function: str) -> bool:
    """A cheap, linear pre-check (the sandbox does the real parse): no `def NAME(` at the
    start of a line means no top-level function, so there is nothing to start a sandbox for."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(function)}[ \t]*\(",
                     program, re.MULTILINE) is not None


# Joins the cgroup named by $0, then becomes bubblewrap: everything the sandbox starts is
# in the cgroup from its first instruction (a thread-safe stand-in for a preexec_fn).
JOIN_CGROUP = 'echo $$ > "$0" && exec "$@"'


def _spawn(sandbox: str, work: str | None, result_w: int, stderr,
           group: cgroup.SandboxCgroup | None) -> tuple[subprocess.Popen, int]:
    """Start the sandbox (in `group` where there is one); returns it and the read end of
    bwrap's info pipe (-1 without bwrap), which tells the pid of the sandbox's init."""
    if sandbox == BWRAP:
        program = bwrap.find_bwrap()
        if program is None:
            raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}")
        filter_r, filter_w = os.pipe()
        info_r, info_w = os.pipe()
        command = bwrap.command(program, HARNESS, result_w, filter_r, info_w, TMP_MB)
        if group is not None:
            command = ["/bin/sh", "-c", JOIN_CGROUP, group.procs, *command]
        try:
            os.write(filter_w, seccomp.filter_program())  # a few KiB: fits the pipe buffer
            os.close(filter_w)
            proc = subprocess.Popen(
                command, cwd="/",
                env={}, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(result_w, filter_r, info_w), start_new_session=True)
        except BaseException:
            os.close(info_r)
            raise
        finally:
            os.close(filter_r)
            os.close(info_w)
        return proc, info_r
    _warn_unsafe()
    proc = subprocess.Popen(
        [bwrap.interpreter(), *bwrap.INTERPRETER_FLAGS, "-c", HARNESS, str(result_w)],
        cwd=work, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(result_w,),
        start_new_session=True)
    return proc, -1


@functools.cache
def _warn_unsafe() -> None:
    print(f"WARNING: evaluation.sandbox is {UNSAFE}: model-generated programs run WITHOUT "
          "isolation, with this process's user, files and network", file=sys.stderr)


def _exchange(proc: subprocess.Popen, job: bytes, result_r: int, deadline_s: float
              ) -> tuple[bytes, bool]:
    """Feed the job to stdin and read the result pipe to its end (every holder of its
    write end gone) or until the deadline passes. Returns (result bytes, capped at
    MAX_RESULT_BYTES + 1; timed out). poll(), not select(): a long-lived worker's
    descriptors may be numbered above 1024."""
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    pending = memoryview(job)
    poller = select.poll()
    poller.register(result_r, select.POLLIN)
    poller.register(stdin, select.POLLOUT)
    chunks, size, end = [], 0, time.monotonic() + deadline_s
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        events = dict(poller.poll(min(left, 0.05) * 1000))
        if pending and stdin in events:
            try:
                pending = pending[os.write(stdin, pending):]
            except BlockingIOError:
                pass
            except OSError:  # the child stopped reading (it exited): nothing more to send
                pending = pending[len(pending):]
            if not pending:
                poller.unregister(stdin)
                proc.stdin.close()
        if result_r in events:
            chunk = os.read(result_r, 65536)
            if not chunk:  # every writer closed: the sandbox is done, all of it read
                return b"".join(chunks), False
            if size <= MAX_RESULT_BYTES:
                chunks.append(chunk[: MAX_RESULT_BYTES + 1 - size])
                size += len(chunks[-1])
        # No shortcut on the process having exited: its last bytes may still be in the
        # pipe, and only end-of-file says they have all been read.


def _stop(proc: subprocess.Popen, info_r: int, grace_s: float) -> None:
    """Give the sandbox `grace_s` to exit by itself (the result pipe closes just before
    bwrap exits), then kill it. Killing the sandbox's init (pid 1 of its namespace) makes the
    kernel kill and reap every process in the namespace before init is reaped, and bwrap
    exits after init: once `proc` is reaped, nothing of the sandbox is left."""
    try:
        proc.wait(timeout=max(0.0, grace_s))
    except subprocess.TimeoutExpired:
        init = _sandbox_init(proc.pid, info_r)
        if init is not None:
            try:
                os.kill(init, signal.SIGKILL)
                proc.wait(timeout=10)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _sandbox_init(bwrap_pid: int, info_r: int) -> int | None:
    """The pid bwrap reported for the sandbox's init, if it is still bwrap's child (the
    check keeps a forged report from naming any other process)."""
    if info_r < 0:
        return None
    poller = select.poll()
    poller.register(info_r, select.POLLIN)
    if not poller.poll(0):
        return None
    try:
        pid = int(json.loads(os.read(info_r, 65536).decode())["child-pid"])
        with open(f"/proc/{pid}/stat") as handle:
            parent = int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return pid if parent == bwrap_pid else None


def _crash_reason(code: int | None) -> str:
    signum = -code if code is not None and code < 0 else (code - 128 if code and code > 128
                                                         else None)
    if signum == signal.SIGXCPU:
        return "timeout (cpu time limit)"
    if signum is not None:
        return f"crashed (killed by signal {signum})"
    return f"crashed (exit code {code})"


def _cgroup(sandbox: str, memory_mb: int) -> cgroup.SandboxCgroup | None:
    """A fresh memory cgroup for one bwrap sandbox, where this evaluator can make one."""
    if sandbox != BWRAP:
        return None
    found = cgroup.parent()
    if isinstance(found, str):
        _note_no_cgroup(found)
        return None
    try:
        return cgroup.SandboxCgroup(found, memory_bound_mb(memory_mb) << 20)
    except OSError as err:
        _note_no_cgroup(f"cannot create a cgroup in {found.path} ({err})")
        return None


@functools.cache
def _note_no_cgroup(reason: str) -> None:
    print(f"note: sandboxed programs run without a memory cgroup ({reason}): tmpfs and kernel "
          "memory they use are bounded by their time limit only (docs/sandbox.md, "
          f"${cgroup.ENV})", file=sys.stderr)


def run_job(job: ProgramJob, timeout_s: float = 2.0, memory_mb: int = 256,
            sandbox: str = BWRAP, stderr=subprocess.DEVNULL) -> ExecutionResult:
    """Execute `job.program` (cut out of the answer first with `job.extract`), then
    `job.function(*args)` for each args in `job.calls`."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"unknown sandbox {sandbox!r}; known: {', '.join(SANDBOXES)}")
    if len(job.program) > MAX_PROGRAM_CHARS:
        return failed(f"program longer than {MAX_PROGRAM_CHARS} characters")
    if not job.function.isidentifier() or not _defines(job.program, job.function):
        return failed(f"no function {job.function}() defined")
    calls = [list(c) for c in job.calls]
    payload = {"program": job.program, "function": job.function, "calls": calls,
               "extract": job.extract, "timeout_s": timeout_s, "memory_mb": memory_mb,
               "file_mb": FILE_MB, "open_files": OPEN_FILES, "result_bytes": MAX_RESULT_BYTES}
    work = tempfile.mkdtemp(prefix="soups-unsafe-") if sandbox == UNSAFE else None
    result_r, result_w = os.pipe()
    proc, info_r, timed_out = None, -1, True
    group = _cgroup(sandbox, memory_mb)
    try:
        proc, info_r = _spawn(sandbox, work, result_w, stderr, group)
        os.close(result_w)
        result_w = -1
        data, timed_out = _exchange(proc, json.dumps(payload).encode(), result_r,
                                    timeout_s + STARTUP_SLACK_S)
    finally:
        if proc is not None:
            _stop(proc, info_r, grace_s=0 if timed_out else EXIT_GRACE_S)
        for fd in (result_r, result_w, info_r):
            if fd >= 0:
                os.close(fd)
        if work is not None:
            _remove_tree(work)
        if group is not None:
            group.remove()
    if timed_out:
        return failed("timeout", parsed=True)
    result = parse_result(data, len(calls), len(job.program)) if data else None
    if isinstance(result, ExecutionResult) and proc.returncode == 0:
        return result
    if isinstance(result, str):
        return failed(f"malformed result: {result}")
    return failed(_crash_reason(proc.returncode), parsed=True)


def _remove_tree(path: str) -> None:
    """Remove the unsafe mode's work dir, however deep the program made it."""
    try:
        shutil.rmtree(path)
    except Exception:  # RecursionError on a deep chain, permissions changed by the program
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_function(program: str, function: str = "solution", calls: Sequence[Sequence] = ((),),
                 timeout_s: float = 2.0, memory_mb: int = 256,
                 sandbox: str = BWRAP) -> ExecutionResult:
    """Execute `program`, then `function(*args)` for each args in `calls`, sandboxed."""
    check_sandbox(sandbox)
    return run_job(ProgramJob(program, function, tuple(calls)), timeout_s, memory_mb, sandbox)


def run_many(jobs: Sequence[ProgramJob], timeout_s: float = 2.0, memory_mb: int = 256,
             sandbox: str = BWRAP, workers: int | None = None) -> list[ExecutionResult]:
    """`run_job` over many jobs in parallel sandboxes, results in input order."""
    check_sandbox(sandbox)
    workers = workers or max(1, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: run_job(j, timeout_s, memory_mb, sandbox), jobs))


def check_sandbox(sandbox: str = BWRAP) -> None:
    """Raise `SandboxUnavailable` (saying how to fix it) unless programs can run in
    `sandbox` here. A successful check is remembered for the life of the process."""
    if sandbox == BWRAP:
        _probe_bwrap()
    elif sandbox not in SANDBOXES:
        raise ValueError(f"unknown sandbox {sandbox!r}; known: {', '.join(SANDBOXES)}")


@functools.cache
def _probe_bwrap() -> None:
    try:
        seccomp.filter_program()
    except seccomp.SeccompUnavailable as err:
        raise SandboxUnavailable(str(err)) from None
    with tempfile.TemporaryFile() as errors:
        result = run_job(ProgramJob("def solution():\n    return 41 + 1"), timeout_s=10,
                         stderr=errors)
        errors.seek(0)
        said = errors.read(4000).decode(errors="replace").strip()
    if result.ran and result.outputs == (42,):
        return
    if "uid map" in said or "RTM_NEWADDR" in said or "namespace" in said.lower():
        raise SandboxUnavailable(f"bubblewrap cannot create its namespaces ({said}); "
                                 f"{USERNS_HINT}")
    raise SandboxUnavailable(f"bubblewrap could not run a test program ({result.error}; "
                             f"bwrap said: {said or 'nothing'})")
