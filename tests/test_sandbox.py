"""The program sandbox (docs/sandbox.md): honest programs return their values; hostile ones
(tests/sandbox_attacks.py) are scored wrong, change nothing outside, leave no process behind,
and never cost another row its score; under this user and under an unprivileged one."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sandbox_attacks  # tests/ is on sys.path (rootdir conftest)

from soups.evaluation.sandbox import (
    UNSAFE,
    ExecutionResult,
    ProgramJob,
    SandboxUnavailable,
    bwrap,
    cgroup,
    check_sandbox,
    run,
    run_function,
    run_many,
    seccomp,
)
from soups.evaluation.sandbox.result import MAX_RESULT_BYTES, parse_result
from soups.evaluation.scoring import values_equal

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


# ---- honest programs -------------------------------------------------------------------

def test_correct_program_returns_its_values():
    program = "def add(a, b):\n    return a + b"
    assert run_function(program, "add", [(1, 2), (40, 2)]) == \
        ExecutionResult(True, True, (3, 42), None)


def test_syntax_error_and_missing_function_do_not_parse():
    assert not run_function("def solution(:\n    return 1").parsed
    result = run_function("def other():\n    return 1")
    assert not result.parsed and "solution" in result.error
    nested = run_function("class A:\n    def solution():\n        return 1")  # not top level
    assert not nested.parsed and "solution" in nested.error


def test_exception_is_not_ran():
    result = run_function("def solution():\n    return 1 / 0")
    assert result.parsed and not result.ran and "ZeroDivisionError" in result.error


def test_standard_library_works():
    program = ("import math, itertools, fractions, decimal, re, collections, functools, json\n"
               "import statistics, datetime, heapq, bisect, string, random, operator\n"
               "def solution():\n    random.seed(0)\n"
               "    return [math.factorial(5), statistics.median([3, 1, 2]),\n"
               "            str(fractions.Fraction(2, 4)), heapq.nsmallest(1, [5, 2])[0]]")
    assert run_function(program).outputs == ([120, 2, "1/2", 2],)


def test_stdout_noise_and_odd_values():
    program = "def solution():\n    print('noise ' * 1000)\n    return {1, 2}"
    assert run_function(program).outputs == ("{1, 2}",)


def test_run_many_keeps_order():
    jobs = [ProgramJob(f"def solution():\n    return {i}") for i in range(24)]
    results = run_many(jobs, workers=4)
    assert [r.outputs for r in results] == [(i,) for i in range(24)]


def test_works_when_descriptors_are_numbered_above_1024():
    """A long-lived worker (Ray, torch) may hold over a thousand open files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("the open-file limit is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.dup(0))
        assert run_function("def solution():\n    return 5").outputs == (5,)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_sandbox_sees_only_the_interpreter_and_libraries():
    program = ("import os\ndef solution(paths):\n"
               "    return [sorted(os.listdir('/')), os.getuid(), os.getpid(),\n"
               "            [p for p in paths if os.path.exists(p)]]")
    secret_places = [str(ROOT), sys.prefix, "/proc/self", "/dev/null", "/etc/passwd",
                     "/home", "/usr/bin", os.environ.get("SOUPS_HOME", "/nonexistent")]
    ((top, uid, pid, visible),) = run_function(program, calls=[(secret_places,)]).outputs
    assert set(top) <= {"tmp", "usr", "lib", "lib64", "lib32", "etc", "root", "opt", "home"}
    assert uid == NOBODY and pid == 2  # own user and pid namespaces
    assert visible == []


def test_the_seccomp_filter_is_a_bpf_program():
    program = seccomp.filter_program()
    assert len(program) % 8 == 0 and len(program) // 8 > len(seccomp.ALLOWED)


# ---- hostile programs ------------------------------------------------------------------

# attack name -> text its record must show (in its outputs or its error)
EXPECTED_FAILURES = {
    "tcp connect": "PermissionError", "native tcp connect": "AssertionError",
    "unix socket": "PermissionError", "dns": "gaierror", "fork": "PermissionError",
    "subprocess": "PermissionError", "native memfd": "AssertionError",
    "memfd beyond the memory limit": "PermissionError", "read answer key": "FileNotFoundError",
    "write evaluator file": "FileNotFoundError", "write the root": "OSError",
    "mknod": "PermissionError", "mkfifo": "PermissionError", "memory": "MemoryError",
    "fill the tmpfs": "OSError", "one big file": "OSError", "open files": "OSError",
    "cpu": "timeout", "sleep": "timeout", "threads": "RuntimeError", "x32 system call": "crashed",
    "see other processes": "AssertionError", "read /proc of others": "FileNotFoundError",
    "forged result: empty list": "malformed result", "forged result: huge integer":
    "<int of 5001 digits>", "site-packages native modules": "ModuleNotFoundError",
    "forged result: deep nesting": "malformed result",
    "forged result: not utf-8": "malformed result", "forged result: two objects":
    "malformed result", "forged result: too large": "malformed result",
    "forged result: wrong count": "malformed result",
    "forged result: missing keys": "malformed result",
    "unary minus parser bomb": "", "return huge string": "result too large",
    "fill the package masks": "AssertionError", "xattrs in /tmp": "PermissionError",
    "native aio contexts": "AssertionError", "posix timers": "AssertionError",
    "queued real-time signals": "AssertionError", "inotify instances": "AssertionError",
    "inotify watches": "AssertionError", "locked memory": "AssertionError",
    "flock a library file": "PermissionError", "posix lock a library file": "PermissionError",
    "open-file lock a library file": "PermissionError", "lease or notify": "PermissionError",
    "shared futex on a library mapping": "AssertionError",
}


def _snapshot(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(folder))] = (info.st_mode, info.st_size, info.st_mtime_ns,
                                              path.read_bytes() if path.is_file() else None)
    return out


def _canary(folder: Path, owner: int | None = None) -> Path:
    """The evaluator's files a program must not read or touch: the answer key (world
    readable, as datasets are) and a file of the evaluator's own."""
    folder.mkdir(mode=0o755)
    (folder / "answers.json").write_text(json.dumps({"expected": sandbox_attacks.SECRET}))
    (folder / "mine.txt").write_text("evaluator's file")
    for path in (folder, *folder.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if owner is not None:
            os.chown(path, owner, owner)
    return folder


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    return server


def _check_battery(records: list[dict], canary: Path, before: dict, server: socket.socket,
                   tmp_before: set) -> None:
    names = [r["name"] for r in sandbox_attacks.rows(str(canary), 1)]
    assert [r["name"] for r in records] == names  # a record for every row, in order
    broken = [r for r in records if r["kind"] == "attack" and r["correct"]]
    assert not broken, broken
    honest = [r for r in records if r["kind"] == "honest"]
    assert len(honest) == len(sandbox_attacks.HONEST)
    assert all(r["correct"] for r in honest), [r for r in honest if not r["correct"]]
    by_name = {r["name"]: r for r in records}
    for name, text in EXPECTED_FAILURES.items():
        shown = " ".join(by_name[name]["outputs"]) + " " + (by_name[name]["error"] or "")
        assert text in shown, (name, by_name[name])
    assert by_name["return huge integer"]["ran"] and by_name["deep directory chain"]["ran"]
    assert _snapshot(canary) == before  # nothing read back, written, renamed or linked
    with pytest.raises(BlockingIOError):
        server.accept()  # nobody connected to the evaluator's loopback port
    assert not Path("/planted").exists()
    # what the attacks create in their own working directory never shows up in ours
    assert not (set(os.listdir("/tmp")) - tmp_before) & sandbox_attacks.PLANTED
    assert sandbox_attacks.sandbox_processes() == []  # no sandbox survives its row


WORKERS = 4
BOUND = run.memory_bound_mb(256) << 20  # one sandbox's cgroup limit, at the default memory
SLACK = 512 << 20  # MemAvailable moves with the rest of the machine too


@contextlib.contextmanager
def _test_cgroup(owner: int | None = None, limit: int | None = None):
    """A fresh cgroup under this process's own memory cgroup, for one test's sandboxes or
    evaluator; yields it (None where this user cannot make one). `owner`: delegated to that
    user, as an operator delegates a subtree to a non-root evaluator."""
    found = cgroup.find_parent() if os.environ.get(cgroup.ENV) is None else None
    if not isinstance(found, cgroup.Parent):
        yield None
        return
    group = cgroup.SandboxCgroup(found, limit if limit is not None else 64 << 30)
    if found.version == 2:
        with open(os.path.join(group.path, "cgroup.subtree_control"), "w") as handle:
            handle.write("+memory")
    if owner is not None:
        for name in ("", "cgroup.procs", "tasks", "cgroup.threads", "cgroup.subtree_control"):
            if os.path.exists(os.path.join(group.path, name)):
                os.chown(os.path.join(group.path, name), owner, owner)
    try:
        yield group
    finally:
        for child in os.listdir(group.path):
            if os.path.isdir(os.path.join(group.path, child)):
                cgroup.remove(os.path.join(group.path, child))
        group.remove()


def _check_bounded(group: cgroup.SandboxCgroup | None, probe: dict) -> None:
    """The evaluator's own kernel objects kept working, and memory stayed within the bound
    of four sandboxes (from the cgroup that held them all, and from /proc/meminfo)."""
    assert probe["rounds"] > 10 and probe["failures"] == [], probe
    assert probe["available_drop_kb"] << 10 <= WORKERS * BOUND + SLACK, probe
    if group is not None:
        assert group.peak_bytes() <= WORKERS * BOUND, (group.peak_bytes(), WORKERS * BOUND)


def test_hostile_programs_as_this_user(tmp_path, monkeypatch):
    canary = _canary(tmp_path / "canary")
    before, tmp_before = _snapshot(canary), set(os.listdir("/tmp"))
    with _test_cgroup() as group, _listener() as server:
        if group is not None:
            monkeypatch.setenv(cgroup.ENV, group.path)
        with sandbox_attacks.EvaluatorProbe() as probe:
            records = sandbox_attacks.run_battery(str(canary), server.getsockname()[1])
        _check_battery(records, canary, before, server, tmp_before)
        _check_bounded(group, probe.report())


SYSTEM_PYTHON = "/usr/bin/python3"


def _copy_for(user: int) -> Path:
    """The project's sandbox code and the attacks, readable by `user`, outside the checkout."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="soups-nonroot-"))
    os.chmod(work, 0o755)
    shutil.copytree(ROOT / "soups", work / "soups",
                    ignore=shutil.ignore_patterns("__pycache__", "embedded_model"))
    shutil.copy(ROOT / "tests" / "sandbox_attacks.py", work)
    for path in work.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return work


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become an unprivileged user")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no system Python")
def test_hostile_programs_as_an_unprivileged_user():
    """As a typical cluster node runs it: the evaluator is an ordinary user, whose files
    and environment the program must not reach either, in a cgroup delegated to it."""
    work = _copy_for(NOBODY)
    try:
        canary = _canary(work / "canary", owner=NOBODY)
        before, tmp_before = _snapshot(canary), set(os.listdir("/tmp"))
        with _test_cgroup(owner=NOBODY) as group, _listener() as server:
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(work), "SECRET_TOKEN": "hunter2"}
            if group is not None:
                env[cgroup.ENV] = group.path
            done = subprocess.run(
                [SYSTEM_PYTHON, str(work / "sandbox_attacks.py"), str(canary),
                 str(server.getsockname()[1])], cwd=work, user=NOBODY, group=NOBODY,
                extra_groups=[], env=env, capture_output=True, text=True, timeout=600,
                stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr[-3000:]
            output = json.loads(done.stdout)
            _check_battery(output["records"], canary, before, server, tmp_before)
            _check_bounded(group, output["probe"])
        assert "hunter2" not in done.stdout
    finally:
        shutil.rmtree(work)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a limited cgroup")
def test_an_evaluator_in_a_small_memory_cgroup_survives_every_resource_attack():
    """As in a Kubernetes pod or a Ray worker with a memory limit: the evaluator in 1.5 GiB,
    every resource attack four at a time; it must return a score for every row."""
    with _test_cgroup(limit=3 << 29) as evaluator:  # 1.5 GiB
        if evaluator is None:
            pytest.skip("no memory cgroup can be made here")
        battery = sandbox_attacks.resource_rows()
        done = subprocess.run(
            ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', evaluator.procs, sys.executable,
             str(ROOT / "tests" / "sandbox_attacks.py"), "/nonexistent", "1", "--resources"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]  # not OOM-killed
        records = json.loads(done.stdout)["records"]
        assert [r["name"] for r in records] == [r["name"] for r in battery]
        assert all(r["correct"] == (r["kind"] == "honest") for r in records), records
        assert evaluator.peak_bytes() < 3 << 29


def test_no_bit_crosses_between_two_sandboxes():
    """Two sandboxes at once, as siblings of one evaluator: the sender encodes 16 bits as
    locks (flock, POSIX, open-file) on the library files both see; the receiver, started
    at the same time, reads them back. Every lock is refused, so nothing crosses."""
    secret = 0b1011001110001101
    files = ("import sysconfig, os\nroot = sysconfig.get_paths()['stdlib']\n"
             "files = sorted(os.path.join(root, n) for n in os.listdir(root) "
             "if n.endswith('.py'))[:16]\n")
    sender = ("import fcntl, struct, time\n" + files + "def solution(secret):\n"
              "    held, refused = [], 0\n    for i, path in enumerate(files):\n"
              "        if secret >> i & 1:\n            f = open(path)\n"
              "            held.append(f)\n"
              "            for lock in (lambda: fcntl.flock(f, fcntl.LOCK_SH),\n"
              "                         lambda: fcntl.lockf(f, fcntl.LOCK_SH),\n"
              "                         lambda: fcntl.fcntl(f, 37, struct.pack('hhqqi4x', 0, 0, "
              "0, 0, 0))):\n"
              "                try:\n                    lock()\n"
              "                except OSError:\n                    refused += 1\n"
              "    time.sleep(2.5)\n    return refused\n")
    receiver = ("import fcntl, struct, time\n" + files + "def solution():\n    time.sleep(1)\n"
                "    bits = 0\n    for i, path in enumerate(files):\n        f = open(path)\n"
                "        try:\n            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "        except BlockingIOError:\n            bits |= 1 << i\n"
                "        except OSError:\n            pass\n"
                "        try:\n            got = fcntl.fcntl(f, fcntl.F_GETLK, struct.pack("
                "'hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0))\n"
                "            if struct.unpack('hhqqi4x', got)[0] != fcntl.F_UNLCK:\n"
                "                bits |= 1 << i\n"
                "        except OSError:\n            pass\n    return bits\n")
    refused, bits = run_many([ProgramJob(sender, calls=((secret,),)), ProgramJob(receiver)],
                             timeout_s=5, workers=2)
    assert refused.ran and refused.outputs == (3 * bin(secret).count("1"),)  # every lock
    assert bits.ran and bits.outputs == (0,)


def test_every_system_call_outside_the_allow_list_is_refused():
    """Each number this architecture has (and the gaps between them), called with zero
    arguments from inside the sandbox: EPERM, except the few refused with another error."""
    names = seccomp.syscall_names()
    allowed = {seccomp.syscall_number(n) for n in seccomp.ALLOWED} - {None}
    other = {seccomp.syscall_number(n): code for n, code in seccomp.ERRNO.items()}
    # x86_64's uretprobe (335, kernel 6.11+) and uprobe (336, 6.16+) pass every seccomp
    # filter by design; outside a probe trampoline they kill the caller (SIGILL) or fail
    # with ENXIO: nothing to refuse.
    passthrough = {335, 336} if platform.machine() == "x86_64" else set()
    numbers = [n for n in range(max(names) + 1)
               if (n not in allowed or n in other) and n not in passthrough]
    program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "def solution(numbers):\n    out = []\n    for n in numbers:\n"
               "        ctypes.set_errno(0)\n        r = libc.syscall(n, 0, 0, 0, 0, 0, 0)\n"
               "        out.append([n, r, ctypes.get_errno()])\n    return out\n")
    (results,) = run_function(program, calls=[(numbers,)], timeout_s=10).outputs
    import errno

    wrong = [(names.get(n, n), r, e) for n, r, e in results
             if (r, e) != (-1, other.get(n, errno.EPERM))]
    assert len(results) == len(numbers) > 300 and wrong == []
    assert len(allowed) < 110  # an allow list, not a deny list


def test_the_allow_list_covers_what_honest_programs_call():
    """The derivation, rerun: strace over the sandboxed honest programs finds nothing the
    filter does not allow (a new interpreter or C library would show up here)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (make system installs it)")
    from soups.evaluation.sandbox import trace

    counts, arguments = trace.trace()
    assert {"execve", "openat", "mmap", "wait4"} <= set(counts)
    assert set(counts) <= set(seccomp.ALLOWED), set(counts) - set(seccomp.ALLOWED)
    assert arguments["fcntl"] <= {"F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_DUPFD",
                                  "F_DUPFD_CLOEXEC"}
    assert all("PRIVATE" in op for op in arguments["futex"])


def test_without_a_cgroup_programs_still_run_and_it_is_said(monkeypatch, capfd):
    monkeypatch.setenv(cgroup.ENV, "/nonexistent/cgroup")
    run._note_no_cgroup.cache_clear()
    assert "is not a directory" in cgroup.parent()
    assert run_function("def solution():\n    return 3").outputs == (3,)
    assert "without a memory cgroup" in capfd.readouterr().err


def test_a_sandbox_cgroup_is_limited_and_leaves_nothing():
    found = cgroup.parent()
    if isinstance(found, str):
        pytest.skip(found)
    before = set(os.listdir(found.path))
    program = "def solution():\n    x = bytearray(200 << 20)\n    return len(x)"
    assert run_function(program, memory_mb=512).outputs == (200 << 20,)
    small = run_function(program, memory_mb=64)  # the address space limit comes first
    assert not small.ran and "MemoryError" in small.error
    assert set(os.listdir(found.path)) == before  # every per-sandbox cgroup removed
    group = cgroup.SandboxCgroup(found, 64 << 20)
    limit = "memory.limit_in_bytes" if found.version == 1 else "memory.max"
    with open(os.path.join(group.path, limit)) as handle:
        assert int(handle.read()) == 64 << 20
    sleeper = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec sleep 60', group.procs])
    time.sleep(0.2)
    group.remove()  # kills what is left in it, then removes it
    assert sleeper.wait(timeout=5) == -9 and not os.path.exists(group.path)


def test_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    program = "import os\ndef solution():\n    return sorted(os.environ.items())"
    (env,) = run_function(program).outputs
    assert "secret-token" not in str(env) and "hunter2" not in str(env)


def test_a_timed_out_sandbox_is_gone_within_its_deadline():
    start = time.monotonic()
    result = run_function("import time\ndef solution():\n    time.sleep(60)", timeout_s=0.5)
    assert result.error == "timeout" and time.monotonic() - start < 5
    assert sandbox_attacks.sandbox_processes() == []


# ---- the parent's reading of results, and comparison -----------------------------------

@pytest.mark.parametrize("data", [
    b"", b"[]", b"null", b"{}", b'{"ran": true}', b"\xff\xfe",
    b'{"parsed": true, "ran": true, "outputs": [' + b"[" * 50000 + b"]" * 50000 + b'], '
    b'"error": null}',
    b'{"parsed": true, "ran": true, "outputs": [1, 2], "error": null}',  # 2 values, 1 call
    b'{"parsed": false, "ran": true, "outputs": [1], "error": null}',
    b'{"parsed": true, "ran": false, "outputs": [1], "error": "x"}',
    b'{"parsed": true, "ran": true, "outputs": ["' + b"x" * 20000 + b'"], "error": null}',
    b'{"parsed": "yes", "ran": true, "outputs": [1], "error": null}',
    b'{"parsed": true, "ran": true, "outputs": [1], "error": null, "extra": 1}',
    b"[" * (MAX_RESULT_BYTES + 1),
])
def test_malformed_results_never_raise(data):
    assert isinstance(parse_result(data, 1), str)


def test_well_formed_results_are_read_exactly():
    data = b'{"parsed": true, "ran": true, "outputs": [[1, 2.5, "a", null, NaN]], "error": null}'
    result = parse_result(data, 1)
    assert result.ran and result.outputs[0][:4] == [1, 2.5, "a", None]
    assert parse_result(b'{"parsed": true, "ran": true, "outputs": [1' + b"0" * 450 + b'], '
                        b'"error": null}', 1).outputs == ("<int of 451 digits>",)
    huge = b'{"parsed": true, "ran": true, "outputs": [1' + b"0" * 5000 + b'], "error": null}'
    assert parse_result(huge, 1).outputs == ("<int of 5001 digits>",)  # never int() it


@pytest.mark.parametrize("got, want, equal", [
    (10 ** 400, 1.5, False), (10 ** 400, 10 ** 400, True), (float("inf"), 1.0, False),
    (float("inf"), float("inf"), True), (float("nan"), float("nan"), False),
    (0.1 + 0.2, 0.3, True), (3, 3.0000001, True), (3, 3.01, False), ("3", 3, False),
    (True, 1, False), (1, True, False), (True, True, True), ([1, [2.0]], [1, [2]], True),
    ([1], [1, 2], False), ({"a": 1}, {"a": 1.0}, True), (None, None, True), (None, 0, False),
    ("<int of 451 digits>", 10 ** 450, False), (1e308 * 10, 1e308, False),
])
def test_comparison_is_total(got, want, equal):
    assert values_equal(got, want) is equal


def test_deep_values_compare_without_recursion_errors():
    deep = []
    for _ in range(10000):
        deep = [deep]
    assert values_equal(deep, deep) is False  # beyond the depth bound: not the reference


# ---- where the sandbox cannot run ------------------------------------------------------

@pytest.fixture()
def fresh_probe():
    run._probe_bwrap.cache_clear()
    yield
    run._probe_bwrap.cache_clear()


def test_missing_bubblewrap_says_how_to_install_it(fresh_probe, monkeypatch):
    monkeypatch.setattr(bwrap, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        check_sandbox()
    with pytest.raises(SandboxUnavailable, match=UNSAFE):
        run_function("def solution():\n    return 1")


def test_forbidden_user_namespaces_name_the_fix(fresh_probe, monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\n"
                    "exit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(bwrap, "find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="apparmor_restrict_unprivileged_userns"):
        check_sandbox()


def test_missing_libseccomp_says_how_to_install_it(fresh_probe, monkeypatch):
    def missing():
        raise seccomp.SeccompUnavailable("libseccomp is not installed; apt-get install "
                                         "libseccomp2")

    monkeypatch.setattr(seccomp, "filter_program", missing)
    with pytest.raises(SandboxUnavailable, match="libseccomp2"):
        check_sandbox()


def test_unknown_sandbox_is_refused():
    with pytest.raises(ValueError, match="'docker'"):
        check_sandbox("docker")


def test_unsafe_subprocess_runs_programs_and_says_so(capfd):
    run._warn_unsafe.cache_clear()
    deep = ("import os\ndef solution():\n    for _ in range(3000):\n        os.mkdir('d')\n"
            "        os.chdir('d')\n    return 7")
    results = run_many([ProgramJob("def solution():\n    return 41 + 1"), ProgramJob(deep),
                        ProgramJob("def solution():\n    while True:\n        pass")],
                       timeout_s=1, sandbox=UNSAFE)
    assert [r.outputs for r in results[:2]] == [(42,), (7,)]
    assert "timeout" in results[2].error
    assert "WITHOUT isolation" in capfd.readouterr().err
    assert not [p for p in os.listdir("/tmp") if p.startswith("soups-unsafe-")]
