"""Run model-generated Python in a kernel sandbox and return what its function returned.

Each program runs in its own bubblewrap sandbox (`bwrap.py`: user, pid, network, ipc, uts,
cgroup and mount namespaces; a read-only view of just the interpreter, its standard library
and the system's shared libraries; a private tmpfs of bounded size as working directory;
dies with its parent) under a seccomp filter (`seccomp.py`: no process creation, ptrace,
sockets, memfd, mounts, namespaces, bpf, io_uring, ...) and rlimits set by the harness
before the program runs (`harness.py`: address space, CPU seconds, file size, open files,
processes). The job goes in over stdin and the result comes back over a pipe the parent
owns; the parent reads it strictly (`result.py`) and never fails on it (`run.py`).
Threat model and limits: docs/sandbox.md.
"""

from soups.sandbox.result import ExecutionResult
from soups.sandbox.run import (
    BWRAP,
    SANDBOXES,
    UNSAFE,
    ProgramJob,
    SandboxUnavailable,
    check_sandbox,
    run_function,
    run_job,
    run_many,
)

__all__ = ["BWRAP", "SANDBOXES", "UNSAFE", "ExecutionResult", "ProgramJob",
           "SandboxUnavailable", "check_sandbox", "run_function", "run_job", "run_many"]
