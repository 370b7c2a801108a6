"""Hostile programs against the sandbox, scored the way `evaluate_rows` scores them
(`soups.evaluation.scoring.score_programs`, four sandboxes at once), beside honest ones.

Standard library only: the non-root test runs this file with the system Python as an
unprivileged user (`python3 sandbox_attacks.py CANARY PORT`, printing the records as JSON).
Each attack returns "pwned" exactly when it got through and its row expects "pwned", so a
correct row is a hole in the sandbox. Honest rows must keep their exact scores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PWNED = "pwned"
SECRET = "the-answer-key-7f3a"  # inside CANARY/answers.json: what a forger would return
HARNESS_MARK = "runs first inside the sandbox"  # from the harness docstring, in its argv
# names the attacks give files in their working directory (/tmp inside the sandbox)
PLANTED = {"x", "fifo", "node", "planted", "big", "d", "a.txt", "dirfd", "f0", "renamed"}


def _try(body: str) -> str:
    """A solution() that runs `body` (indented 8) and returns "pwned" if it completes."""
    indented = "\n".join("        " + line for line in body.strip().splitlines())
    return ("import os, sys\ndef solution():\n    try:\n" + indented
            + f"\n        return {PWNED!r}\n    except BaseException as err:\n"
            "        return 'blocked: ' + type(err).__name__\n")


LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# after taking a shared resource: keep it while the evaluator's probe tries to use it
HOLD = "import time\ntime.sleep(1.5)"


def attacks(canary: str, port: int) -> dict[str, str]:
    """name -> program. `canary` is a folder of the evaluator's (answer key, files it owns);
    `port` a TCP port the test listens on at 127.0.0.1."""
    answers = os.path.join(canary, "answers.json")
    return {
        # the answer key and the evaluator's files
        "read answer key": _try(f"assert {SECRET!r} in open({answers!r}).read()"),
        "write evaluator file": _try(f"open({os.path.join(canary, 'owned')!r}, 'w').write('x')"),
        "append evaluator file": _try(f"open({answers!r}, 'a').write('x')"),
        "symlink into evaluator dir": _try(f"os.symlink('/tmp', {canary + '/link'!r})"),
        "rename into evaluator dir": _try(
            f"open('x', 'w').write('x')\nos.rename('x', {canary + '/renamed'!r})"),
        "read project source": _try(f"open({str(Path(__file__).resolve())!r}).read()"),
        "read the evaluator's environment": _try(
            f"open({os.path.join(sys.prefix, 'pyvenv.cfg')!r}).read()"),
        "read passwd": _try("open('/etc/passwd').read()"),
        # the old audit hook's holes: switching it off, dir_fd, O_CREAT on read-only opens
        "switch off a hook then write": _try(
            "import __main__\n__main__.inside = lambda p: True\n"
            f"open({os.path.join(canary, 'hooked')!r}, 'w').write('x')"),
        "dir_fd write outside": _try(
            f"fd = os.open({canary!r}, os.O_RDONLY)\n"
            "os.close(os.open('dirfd', os.O_WRONLY | os.O_CREAT, dir_fd=fd))"),
        "O_RDONLY|O_CREAT|O_TRUNC outside": _try(
            f"os.close(os.open({answers!r}, os.O_RDONLY | os.O_CREAT | os.O_TRUNC))"),
        "write the root": _try("open('/planted', 'w').write('x')"),
        "write the interpreter": _try("open(sys.executable, 'ab').write(b'x')"),
        "mkfifo": _try("os.mkfifo('fifo')"),
        "mknod": _try("import stat\nos.mknod('node', stat.S_IFCHR | 0o600, os.makedev(1, 3))"),
        # other processes: siblings, the evaluator
        "see other processes": _try(
            "others = []\nfor pid in range(3, 65536):\n"
            "    try:\n        os.kill(pid, 0)\n        others.append(pid)\n"
            "    except OSError:\n        pass\nassert others, 'alone'"),
        "kill every process": _try("os.kill(-1, 9)\nraise RuntimeError('still here')"),
        "kill the parent": _try("os.kill(os.getppid(), 9)\nassert os.getppid() > 1"),
        "read /proc of others": _try("open(f'/proc/{os.getppid()}/environ').read()"),
        "pidfd signal": _try(
            LIBC + "fd = libc.syscall(434, os.getppid(), 0)\n"  # pidfd_open (x86_64, aarch64)
            "assert fd >= 0 and libc.syscall(424, fd, 9, None, 0) == 0"),
        "ptrace the parent": _try(LIBC + "assert libc.ptrace(16, os.getppid(), 0, 0) == 0"),
        "tamper with sibling work dirs": _try(
            "import time\nend = time.time() + 1.5\nseen = set()\n"
            "while time.time() < end:\n"
            "    for root in ('/tmp', '/'):\n"
            "        for name in os.listdir(root):\n"
            "            seen.add(os.path.join(root, name))\n"
            "assert any('job' in s or 'soups' in s for s in seen), sorted(seen)"),
        # processes, network, native code without audit events
        "fork": _try("pid = os.fork()\nif pid == 0:\n    os._exit(0)"),
        "subprocess": _try("import subprocess\nsubprocess.run(['true'])"),
        "native fork": _try(LIBC + "pid = libc.fork()\nif pid == 0:\n    os._exit(0)\n"
                            "assert pid > 0"),
        "exec a shell": _try("os.execv('/bin/sh', ['sh', '-c', 'exit 0'])"),
        "tcp connect": _try(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)"),
        "tcp listen": _try("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
                           "s.listen()"),
        "unix socket": _try("import socket\nsocket.socket(socket.AF_UNIX)"),
        "dns": _try("import socket\nsocket.getaddrinfo('localhost', 80)"),
        "native tcp connect": _try(
            LIBC + "import socket, struct\nfd = libc.socket(2, 1, 0)\nassert fd >= 0\n"
            f"addr = struct.pack('<HH4s8x', 2, socket.htons({port}), bytes([127, 0, 0, 1]))\n"
            "assert libc.connect(fd, addr, len(addr)) == 0"),
        "native memfd": _try(LIBC + "assert libc.memfd_create(b'x', 0) >= 0"),
        "site-packages native modules": _try(
            f"sys.path += {_site_packages()!r}\nimport _cffi_backend"),
        "new user namespace": _try(LIBC + "assert libc.unshare(0x10000000) == 0"),
        "x32 system call": _try(LIBC + "libc.syscall(0x40000000 | 39)"),
        # resources
        "memory": _try("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))"),
        "memfd beyond the memory limit": _try(
            "fds = []\nfor _ in range(40):\n    fd = os.memfd_create('m')\n"
            "    os.ftruncate(fd, 8 << 20)\n    os.write(fd, b'x' * (8 << 20))\n"
            "    fds.append(fd)"),
        "fill the tmpfs": _try(
            "for i in range(64):\n    with open(f'f{i}', 'wb') as f:\n"
            "        f.write(b'x' * (1 << 20))"),
        "one big file": _try("open('big', 'wb').write(b'x' * (64 << 20))"),
        "open files": _try("fds = [os.open('.', os.O_RDONLY) for _ in range(10000)]"),
        "threads": _try("import threading\nthreading.Thread(target=print).start()"),
        "cpu": "def solution():\n    while True:\n        pass\n",
        "sleep": "import time\ndef solution():\n    time.sleep(60)\n",
        # outputs the evaluator must survive
        "forged result: empty list": _forge("[]"),
        "forged result: missing keys": _forge('{"ran": true}'),
        "forged result: huge integer": _forge('{"parsed": true, "ran": true, "outputs": [1'
                                              + "0" * 5000 + '], "error": null}'),
        "forged result: deep nesting": _forge_bytes(
            "b'{\"parsed\": true, \"ran\": true, \"outputs\": [' + b'[' * 100000"
            " + b']' * 100000 + b'], \"error\": null}'"),
        "forged result: not utf-8": _forge_bytes("b'\\xff\\xfe{'"),
        "forged result: two objects": _forge('{"parsed": true, "ran": true, "outputs": ["a"], '
                                             '"error": null}{"x": 1}'),
        "forged result: too large": _forge_bytes("b'[' + b'1,' * (1 << 20) + b'1]'"),
        "forged result: wrong count": _forge('{"parsed": true, "ran": true, "outputs": ["a", '
                                             '"b"], "error": null}'),
        "return huge integer": "def solution():\n    return 10 ** 400\n",
        "return huger integer": "def solution():\n    return 10 ** 5000\n",
        "return nan": "def solution():\n    return float('nan')\n",
        "return deep list": "def solution():\n    x = []\n    for _ in range(100000):\n"
                            "        x = [x]\n    return x\n",
        "return huge string": "def solution():\n    return 'x' * (8 << 20)\n",
        "unary minus parser bomb": "def solution():\n    return " + "-" * 5000 + "1\n",
        "deep directory chain": "import os\ndef solution():\n    for _ in range(3000):\n"
                                "        os.mkdir('d')\n        os.chdir('d')\n"
                                f"    return {PWNED!r}[:1]\n",
        **resource_attacks(),
        **shared_state_attacks(),
    }


def resource_attacks() -> dict[str, str]:
    """Memory and kernel objects outside the program's address space, and quotas the host
    user or the whole host shares: each fills what it reaches until refused. The floods
    never return "pwned" (what they cost is measured outside, from the cgroup and
    /proc/meminfo); the others do on their first success, since one is already a hole."""
    masks = _masked_paths()
    return {
        "fill the package masks": _try(  # 1 MiB files (the file size limit), up to 1 GiB
            f"written = 0\nfor path in {masks!r}:\n    try:\n        for i in range(1024):\n"
            "            with open(f'{path}/f{i}', 'wb') as f:\n"
            "                written += f.write(b'x' * (1 << 20))\n    except OSError:\n"
            "        pass\nassert written > 32 << 20, f'{written} bytes'"),
        "xattrs in /tmp": _try(
            "open('x', 'w').close()\nfor i in range(100000):\n"
            "    os.setxattr('x', f'user.{i}', b'v' * 4000)"),
        "directory flood": "import os\ndef solution():\n    n = 0\n    try:\n"
                           "        while n < 400000:\n            os.mkdir('d' * 200 + str(n))\n"
                           "            n += 1\n    except OSError:\n        pass\n"
                           "    return f'made {n}'\n",
        "file flood": "import os\ndef solution():\n    n = 0\n    try:\n"
                      "        while n < 400000:\n"
                      "            name = 'f' * 200 + str(n)\n"
                      "            os.close(os.open(name, os.O_CREAT | os.O_WRONLY))\n"
                      "            n += 1\n    except OSError:\n        pass\n"
                      "    return f'made {n}'\n",
        "native aio contexts": _try(
            LIBC + f"ctx = ctypes.c_ulong(0)\nassert libc.syscall({_nr('io_setup')}, 1, "
            "ctypes.byref(ctx)) == 0\nfor _ in range(100000):\n"
            f"    ctx = ctypes.c_ulong(0)\n    if libc.syscall({_nr('io_setup')}, 1, "
            "ctypes.byref(ctx)):\n        break\n" + HOLD),
        "posix timers": _try(
            LIBC + "ids = [ctypes.c_void_p() for _ in range(100000)]\n"
            "assert libc.timer_create(1, None, ctypes.byref(ids[0])) == 0\n"
            "for t in ids[1:]:\n    if libc.timer_create(1, None, ctypes.byref(t)):\n"
            "        break\n" + HOLD),
        "queued real-time signals": _try(
            LIBC + "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])\n"
            "sent = 0\nwhile sent < 100000 and libc.sigqueue(os.getpid(), signal.SIGRTMIN, 0) == 0:"
            "\n    sent += 1\nassert sent > 100, sent\n" + HOLD),
        "inotify instances": _try(
            LIBC + "fds = [libc.inotify_init1(0) for _ in range(200)]\nassert max(fds) >= 0\n"
            + HOLD),
        "inotify watches": _try(
            LIBC + "fd = libc.inotify_init1(0)\nassert fd >= 0\nn = 0\n"
            "for root, dirs, files in os.walk('/usr/lib'):\n"
            "    n += libc.inotify_add_watch(fd, root.encode(), 0xfff) >= 0\nassert n\n" + HOLD),
        "locked memory": _try(
            LIBC + "import mmap\nm = mmap.mmap(-1, 1 << 20)\n"
            "assert libc.mlockall(3) == 0"),
    }


def shared_state_attacks() -> dict[str, str]:
    """What two sandboxes share without any file between them: locks and futexes on the
    same host inodes (the read-only library files), notifications on them."""
    library = "import sysconfig\nlib = sysconfig.get_paths()['stdlib'] + '/os.py'\n"
    return {
        "flock a library file": _try(
            library + "import fcntl\nf = open(lib)\nfcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)"),
        "posix lock a library file": _try(
            library + "import fcntl\nf = open(lib)\nfcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)"),
        "open-file lock a library file": _try(
            library + "import fcntl, struct\nf = open(lib)\n"
            "fcntl.fcntl(f, 37, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, 0, 0, 0))"),  # OFD_SETLK
        "lease or notify": _try(
            library + "import fcntl\nf = os.open(os.path.dirname(lib), os.O_RDONLY)\n"
            "fcntl.fcntl(f, fcntl.F_NOTIFY, fcntl.DN_ACCESS)"),
        "shared futex on a library mapping": _try(
            LIBC + library + "f = os.open(lib, os.O_RDONLY)\nlibc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
            " ctypes.c_int, ctypes.c_long]\naddr = libc.mmap(None, 4096, 1, 1, f, 0)\n"
            "assert addr and addr != 2 ** 64 - 1\n"  # PROT_READ, MAP_SHARED; FUTEX_WAKE below
            f"assert libc.syscall({_nr('futex')}, ctypes.c_void_p(addr), 1, 1, None, None, 0)"
            " >= 0"),
    }


def _nr(name: str) -> int:
    """The number of system call `name` here (-1 where this architecture has none)."""
    from soups.evaluation.sandbox.seccomp import syscall_number

    number = syscall_number(name)
    return -1 if number is None else number


def _masked_paths() -> list[str]:
    """The package folders the sandbox masks (empty, and read-only, inside it)."""
    from soups.evaluation.sandbox.bwrap import mount_args

    args = mount_args()
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--tmpfs"]


def _site_packages() -> list[str]:
    """The evaluator's package folders (numpy, cffi, torch... as native code to load)."""
    import site
    import sysconfig

    return [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]


def _forge(text: str) -> str:
    return _forge_bytes(repr(text.encode()))


def _forge_bytes(expr: str) -> str:
    """Writes bytes to the result descriptor (argv[1]) and exits before the harness does."""
    return (f"import os, sys\ndef solution():\n    data = {expr}\n    fd = int(sys.argv[-1])\n"
            "    while data:\n        data = data[os.write(fd, data):]\n    os._exit(0)\n")


# name -> (program, function, calls, expected outputs): exact values from the stdlib
HONEST = {
    "math": ("import math\ndef solution():\n    return math.comb(10, 3) + math.isqrt(99)\n",
             "solution", [[]], [129]),
    "itertools": ("import itertools\ndef solution(n):\n"
                  "    return len(list(itertools.permutations(range(n))))\n",
                  "solution", [[4], [5]], [24, 120]),
    "fractions": ("from fractions import Fraction\ndef solution():\n"
                  "    return float(Fraction(1, 3) + Fraction(1, 6))\n", "solution", [[]], [0.5]),
    "decimal": ("from decimal import Decimal\ndef solution():\n"
                "    return float(Decimal('0.1') * 3)\n", "solution", [[]], [0.3]),
    "re": ("import re\ndef solution(s):\n    return re.findall(r'\\d+', s)\n", "solution",
           [["a1b22c333"]], [["1", "22", "333"]]),
    "collections": ("from collections import Counter\ndef solution(s):\n"
                    "    return Counter(s).most_common(1)[0][0]\n", "solution", [["abcbb"]],
                    ["b"]),
    "functools": ("import functools\n@functools.lru_cache(None)\ndef fib(n):\n"
                  "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
                  "def solution():\n    return fib(80)\n", "solution", [[]], [23416728348467685]),
    "files in its own dir": ("def solution():\n    open('a.txt', 'w').write('ok')\n"
                             "    return open('a.txt').read()\n", "solution", [[]], ["ok"]),
    "big float answer": ("def solution():\n    return 1e300 * 10\n", "solution", [[]], [1e301]),
    "prints and returns": ("def solution():\n    print('noise ' * 10000)\n    return 42\n",
                           "solution", [[]], [42]),
}


def rows(canary: str, port: int) -> list[dict]:
    """Attack rows interleaved with honest rows, as task rows of the `program` scorer."""
    out = []
    honest = list(HONEST.items())
    for i, (name, program) in enumerate(attacks(canary, port).items()):
        out.append({"name": name, "kind": "attack", "answer": program, "function": "solution",
                    "calls": "[[]]", "expected": json.dumps([PWNED])})
        if i % 5 == 0 and honest:
            h_name, (h_program, function, calls, expected) = honest.pop()
            out.append({"name": h_name, "kind": "honest", "answer": h_program,
                        "function": function, "calls": json.dumps(calls),
                        "expected": json.dumps(expected)})
    for h_name, (h_program, function, calls, expected) in honest:
        out.append({"name": h_name, "kind": "honest", "answer": h_program, "function": function,
                    "calls": json.dumps(calls), "expected": json.dumps(expected)})
    return out


def run_battery(canary: str, port: int, workers: int = 4, battery: list[dict] | None = None
                ) -> list[dict]:
    """Score every row in four sandboxes at once; one record per row, with its name."""
    from soups.evaluation.scoring import score_programs

    battery = rows(canary, port) if battery is None else battery
    records, _ = score_programs(battery, [r["answer"] for r in battery], workers=workers)
    return [{"name": row["name"], "kind": row["kind"], "correct": record["correct"],
             "ran": record["ran"], "outputs": [repr(o)[:200] for o in record["outputs"]],
             "error": record["error"]} for row, record in zip(battery, records, strict=True)]


def resource_rows(copies: int = 4) -> list[dict]:
    """Each resource attack `copies` times in a row (so that many run at once), then the
    honest rows: what an evaluator in a small memory cgroup must survive."""
    out = [{"name": name, "kind": "attack", "answer": program, "function": "solution",
            "calls": "[[]]", "expected": json.dumps([PWNED])}
           for name, program in resource_attacks().items() for _ in range(copies)]
    for name, (program, function, calls, expected) in HONEST.items():
        out.append({"name": name, "kind": "honest", "answer": program, "function": function,
                    "calls": json.dumps(calls), "expected": json.dumps(expected)})
    return out


class EvaluatorProbe:
    """While attacks run: the evaluator's own use of what the host shares with them (native
    AIO contexts, POSIX timers and their queued signals, inotify instances and watches),
    every 20 ms, with each failure recorded; and the lowest MemAvailable seen."""

    def __init__(self):
        import threading

        self.failures: list[str] = []
        self.rounds = 0
        self.io_setup, self.io_destroy = _nr("io_setup"), _nr("io_destroy")  # imports here
        self.lowest_available_kb = self.available_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def available_kb() -> int:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
        return 0

    def _loop(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        io_setup, io_destroy = self.io_setup, self.io_destroy
        while not self._stop.is_set():
            ctx = ctypes.c_ulong(0)
            if libc.syscall(io_setup, 1, ctypes.byref(ctx)) != 0:
                self.failures.append(f"io_setup: errno {ctypes.get_errno()}")
            else:
                libc.syscall(io_destroy, ctx)
            timer = ctypes.c_void_p()
            if libc.timer_create(1, None, ctypes.byref(timer)) != 0:
                self.failures.append(f"timer_create: errno {ctypes.get_errno()}")
            else:
                libc.timer_delete(timer)
            fd = libc.inotify_init1(0)
            if fd < 0:
                self.failures.append(f"inotify_init1: errno {ctypes.get_errno()}")
            else:
                if libc.inotify_add_watch(fd, b"/tmp", 0x100) < 0:  # IN_CREATE
                    self.failures.append(f"inotify_add_watch: errno {ctypes.get_errno()}")
                os.close(fd)
            self.lowest_available_kb = min(self.lowest_available_kb, self.available_kb())
            self.rounds += 1
            self._stop.wait(0.02)

    def __enter__(self):
        self.start_available_kb = self.available_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"failures": self.failures, "rounds": self.rounds,
                "available_drop_kb": self.start_available_kb - self.lowest_available_kb}


def sandbox_processes() -> list[str]:
    """Command lines of sandbox processes still alive on this machine (bwrap or harness)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if HARNESS_MARK in cmdline or cmdline.startswith(("bwrap ", "/usr/bin/bwrap ")):
            found.append(f"{entry}: {cmdline[:120]}")
    return found


if __name__ == "__main__":
    # python3 sandbox_attacks.py CANARY PORT [--resources]: the records and the probe as JSON
    only_resources = "--resources" in sys.argv
    with EvaluatorProbe() as probe:
        found = run_battery(sys.argv[1], int(sys.argv[2]),
                            battery=resource_rows() if only_resources else None)
    print(json.dumps({"records": found, "probe": probe.report()}))
