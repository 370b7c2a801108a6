"""Run model-generated Python in a kernel sandbox and return what its function returned.

Each program runs in its own bubblewrap sandbox (`bwrap.py`: user, pid, network, ipc, uts,
cgroup and mount namespaces; a read-only view of just the interpreter, its standard library
and the system's shared libraries; a private tmpfs of bounded size as working directory;
dies with its parent) under a seccomp allow list (`seccomp.py`: the system calls an honest
program makes, derived by `trace.py`; everything else refused), in a memory cgroup of its own
where one can be made (`cgroup.py`: what the kernel spends for it, bounded), with rlimits set
by the harness before the program runs (`harness.py`: address space, CPU seconds, file size,
open files, processes, queued signals). The job goes in over stdin (with `extract`, a model's
whole answer, cut into its program inside the sandbox) and the result comes back over a pipe
the parent owns; the parent reads it strictly (`result.py`) and never fails on it (`run.py`).
Threat model and limits: docs/sandbox.md.
"""

from soups.evaluation.sandbox.result import ExecutionResult
from soups.evaluation.sandbox.run import (
    BWRAP,
    SANDBOXES,
    UNSAFE,
    ProgramJob,
    SandboxUnavailable,
    check_sandbox,
    memory_bound_mb,
    run_function,
    run_job,
    run_many,
)

__all__ = ["BWRAP", "SANDBOXES", "UNSAFE", "ExecutionResult", "ProgramJob",
           "SandboxUnavailable", "check_sandbox", "memory_bound_mb", "run_function", "run_job",
           "run_many"]
