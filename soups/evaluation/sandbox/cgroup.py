"""A memory cgroup per sandbox: the bound on everything the kernel spends for a program.

Rlimits bound a process's address space, not what the kernel allocates on its behalf: the
pages of its tmpfs, the inodes and directory entries it creates, page tables, pipe buffers.
A memory cgroup counts all of it (kernel memory included), so each sandbox runs in a cgroup
of its own, created here under a parent cgroup the evaluator may write to, limited to
`memory_mb + tmpfs + KERNEL_SLACK_MB`, swap off, and removed (after killing anything left
in it) when its row is done. Over the limit, the kernel refuses the allocation or kills the
program; the evaluator and the other rows are untouched.

The parent cgroup, first found wins:
1. `$SOUPS_SANDBOX_CGROUP`: a cgroup directory prepared for it (a delegated subtree on
   cgroup v2 with the memory controller enabled for its children, or a v1 memory cgroup
   the evaluator's user owns), as an operator or `cluster.yaml` sets up;
2. the evaluator's own memory cgroup, where it may create children there (root on cgroup
   v1; a delegated cgroup v2 subtree whose `cgroup.subtree_control` enables `memory`).
Where neither exists, `parent()` says why, and the sandbox runs without one (what still holds
there: docs/sandbox.md).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

ENV = "SOUPS_SANDBOX_CGROUP"
KERNEL_SLACK_MB = 64  # page tables, inodes, dentries and the interpreter's own pages
PREFIX = "soups-sandbox-"
REMOVE_WAIT_S = 5.0  # a killed program's memory is uncharged asynchronously: rmdir waits
_counter = itertools.count()
_lock = threading.Lock()


@dataclass(frozen=True)
class Parent:
    path: str
    version: int  # 1 (the v1 memory hierarchy) or 2 (the unified hierarchy)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root in the hierarchy, mount point, fs type, super options) of cgroup mounts."""
    found = []
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                    found.append((fields[3], fields[4], tail[0], tail[2]))
    except OSError:
        pass
    return found


def _own_cgroups() -> dict[str, str]:
    """controller ('' for the unified hierarchy) -> this process's cgroup path."""
    own = {}
    try:
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    own[controller] = path
    except (OSError, ValueError):
        pass
    return own


def _join(mount: str, root: str, path: str) -> str | None:
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None  # our cgroup is outside what this mount shows
    relative = path[len(root):] if root != "/" else path
    return os.path.normpath(mount + "/" + relative.lstrip("/"))


def _version(path: str) -> int | None:
    if os.path.isfile(os.path.join(path, "memory.limit_in_bytes")):
        return 1
    if os.path.isfile(os.path.join(path, "cgroup.subtree_control")):
        return 2
    return None


def _usable(path: str) -> Parent | str:
    """`path` as a parent of per-sandbox cgroups, or why it cannot be one."""
    version = _version(path)
    if version is None:
        return f"{path} is not a memory cgroup (v1) or a cgroup v2 directory"
    if version == 2:
        try:
            with open(os.path.join(path, "cgroup.subtree_control")) as handle:
                enabled = handle.read().split()
        except OSError as err:
            return f"cannot read {path}/cgroup.subtree_control ({err})"
        if "memory" not in enabled:
            return (f"the memory controller is not enabled for the children of {path} "
                    "(cgroup.subtree_control)")
    if not os.access(path, os.W_OK | os.X_OK):
        return f"this user may not create cgroups in {path}"
    return Parent(path, version)


def find_parent() -> Parent | str:
    """Where per-sandbox cgroups go, or why there is nowhere (see the module docstring)."""
    explicit = os.environ.get(ENV)
    if explicit:
        if not os.path.isdir(explicit):
            return f"${ENV}={explicit} is not a directory"
        return _usable(explicit)
    own, reasons = _own_cgroups(), []
    for root, mount, kind, options in _mounts():
        if kind == "cgroup" and "memory" in options.split(","):
            path = _join(mount, root, own.get("memory", ""))
        elif kind == "cgroup2" and "" in own:
            path = _join(mount, root, own[""])
        else:
            continue
        if path is None or not os.path.isdir(path):
            continue
        found = _usable(path)
        if isinstance(found, Parent):
            return found
        reasons.append(found)
    return "; ".join(reasons) or "no memory cgroup is mounted"


@functools.cache
def _probe(explicit: str | None) -> Parent | str:
    del explicit  # the cache key: a test or an operator may change the variable
    found = find_parent()
    if isinstance(found, str):
        return found
    _remove_stale(found)
    try:
        probe = SandboxCgroup(found, 64 << 20)
    except OSError as err:
        return f"cannot create a limited cgroup in {found.path} ({err})"
    try:
        # As a sandbox joins (run.py): cgroup v2 lets a process move only within a subtree
        # its user may write at the top of, which creating the cgroup does not prove.
        joined = subprocess.run(["/bin/sh", "-c", 'echo $$ > "$0"', probe.procs],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        joined = subprocess.CompletedProcess([], 1, "", str(err))
    probe.remove()
    if joined.returncode != 0:
        return (f"a process cannot join a cgroup in {found.path} "
                f"({joined.stderr.strip()[-200:] or 'refused'})")
    return found


def parent() -> Parent | str:
    """The probed parent (a cgroup was created, limited and removed there), or why none."""
    return _probe(os.environ.get(ENV))


def _remove_stale(found: Parent) -> None:
    """Remove per-sandbox cgroups left by evaluators that died (their pid is gone)."""
    try:
        names = os.listdir(found.path)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:  # one try: a probe does not wait on what a dead evaluator left
                os.rmdir(os.path.join(found.path, name))
            except OSError:
                pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


class SandboxCgroup:
    """One sandbox's cgroup: created limited, joined by the sandbox, removed afterwards."""

    def __init__(self, found: Parent, limit_bytes: int):
        with _lock:
            number = next(_counter)
        self.version = found.version
        self.path = os.path.join(found.path, f"{PREFIX}{os.getpid()}-{number}")
        self.limit_bytes = limit_bytes
        os.mkdir(self.path)
        try:
            if self.version == 1:
                _write(os.path.join(self.path, "memory.limit_in_bytes"), str(limit_bytes))
                swap = os.path.join(self.path, "memory.memsw.limit_in_bytes")
                if os.path.exists(swap):  # memory + swap: the same bound, so no swap
                    _write(swap, str(limit_bytes))
            else:
                _write(os.path.join(self.path, "memory.max"), str(limit_bytes))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if os.path.exists(os.path.join(self.path, name)):
                        _write(os.path.join(self.path, name), value)
        except OSError:
            os.rmdir(self.path)
            raise

    @property
    def procs(self) -> str:
        """The file a process writes its pid to in order to join."""
        return os.path.join(self.path, "cgroup.procs")

    def peak_bytes(self) -> int | None:
        """The most memory the cgroup held (None where the kernel does not say)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            with open(os.path.join(self.path, name)) as handle:
                return int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remove(self) -> None:
        remove(self.path)


def _pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            return [int(p) for p in handle.read().split()]
    except (OSError, ValueError):
        return []


def remove(path: str) -> None:
    """Kill whatever is still in the cgroup at `path`, then remove it (waiting for the kernel
    to let go of exiting processes). Never raises: a cgroup that will not go is left for the
    next evaluator's clean-up of stale ones."""
    end = time.monotonic() + REMOVE_WAIT_S
    delay = 0.001
    while True:
        for pid in _pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > end:
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
