"""Derive the seccomp allow list: trace what sandboxed honest programs call.

    python -m soups.evaluation.sandbox.trace            # the calls, counts and arguments that
    matter python -m soups.evaluation.sandbox.trace --check    # exit 1 if a traced call is not
    allowed

Runs the harness on honest programs (`HONEST`: the standard library modules docs/sandbox.md
promises, files in the working directory, program extraction from an answer) in the real
bubblewrap sandbox, under `strace -f`, with a filter that allows everything, and collects
every system call made after a process loaded that filter: bubblewrap's init (it reaps the
program) and the program from the `execve` of the interpreter on. Those calls, with the
commands of `fcntl`, the operations of `futex` and the requests of `ioctl`, are what
`seccomp.TRACED` lists; a new interpreter or C library shows its additions here.
Needs strace (`apt-get install strace`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

from soups.evaluation.sandbox import bwrap, seccomp
from soups.evaluation.sandbox.run import FILE_MB, HARNESS, MAX_RESULT_BYTES, OPEN_FILES, TMP_MB

_STDLIB = ("import math, itertools, fractions, decimal, re, collections, functools, json\n"
           "import statistics, datetime, heapq, bisect, string, random, operator, time\n"
           "def solution(n):\n    random.seed(n)\n    time.sleep(0.001)\n"
           "    return [math.comb(10, 3), statistics.median([3, 1, n]), str(fractions.Fraction("
           "2, 4)),\n            float(decimal.Decimal('0.1') * 3), re.findall(r'\\d+', 'a1b22'),"
           "\n            collections.Counter('abb').most_common(1)[0][0], heapq.nsmallest(1, "
           "[5, 2]),\n            bisect.bisect([1, 3], 2), json.dumps({'a': n}), "
           "str(datetime.date(2024, 1, n)),\n            random.randint(0, 9), "
           "list(itertools.accumulate([1, 2, 3]))]\n")
_FILES = ("import os\ndef solution():\n    os.mkdir('d')\n    with open('d/a.txt', 'w') as f:\n"
          "        f.write('ok')\n    os.rename('d/a.txt', 'b.txt')\n"
          "    text = open('b.txt').read()\n    os.remove('b.txt')\n    os.rmdir('d')\n"
          "    return [text, sorted(os.listdir('.'))]\n")
_ERRORS = "def solution():\n    return 1 / 0\n"
_ANSWER = ("4 * 3 = 12.\ndef solution():\n    result = 4 * 3\n    return result\n"
           "Q: Sam has 3 pens. How many?\nA: def solution():\n    return 3\n")
# (text, function, calls, extract): what an honest evaluation sends
HONEST = ((_STDLIB, "solution", [[1], [2]], False), (_FILES, "solution", [[]], False),
          (_ERRORS, "solution", [[]], False), (_ANSWER, "solution", [[]], True))
WATCHED_ARGUMENTS = ("fcntl", "fcntl64", "futex", "ioctl")
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)")


def _trace_one(strace: str, text: str, function: str, calls, extract: bool, out: str) -> bytes:
    payload = {"program": text, "function": function, "calls": calls, "extract": extract,
               "timeout_s": 10, "memory_mb": 256, "file_mb": FILE_MB,
               "open_files": OPEN_FILES, "result_bytes": MAX_RESULT_BYTES}
    result_r, result_w = os.pipe()
    filter_r, filter_w = os.pipe()
    info_r, info_w = os.pipe()
    os.write(filter_w, _allow_all_filter())
    os.close(filter_w)
    command = bwrap.command(bwrap.find_bwrap(), HARNESS, result_w, filter_r, info_w, TMP_MB)
    try:
        subprocess.run([strace, "-f", "-qq", "-s", "0", "-o", out, *command],
                       input=json.dumps(payload).encode(), pass_fds=(result_w, filter_r, info_w),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=False)
    finally:
        for fd in (result_w, filter_r, info_w, info_r):
            os.close(fd)
    data = os.read(result_r, MAX_RESULT_BYTES)
    os.close(result_r)
    return data


def _allow_all_filter() -> bytes:
    """A filter that allows every call (bwrap still loads one, so the trace shows where)."""
    lib = seccomp.library()
    ctx = lib.seccomp_init(seccomp.ALLOW)
    try:
        return seccomp.export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def parse_trace(path: str) -> tuple[Counter, dict[str, set[str]]]:
    """(call -> count, call -> second arguments seen) of every process after it loaded the
    filter (strace's `prctl(PR_SET_SECCOMP` or `seccomp(` line)."""
    counts, arguments, filtered = Counter(), defaultdict(set), set()
    with open(path, errors="replace") as handle:
        for line in handle:
            match = _LINE.match(line)
            if not match:
                continue
            pid, name = match.groups()
            if "PR_SET_SECCOMP" in line or name == "seccomp":
                filtered.add(pid)
                continue
            if pid not in filtered or "resumed>" in line:
                continue
            counts[name] += 1
            if name in WATCHED_ARGUMENTS and "," in line:
                arguments[name].add(line.split(",")[1].split(")")[0].strip())
    return counts, arguments


def trace() -> tuple[Counter, dict[str, set[str]]]:
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("strace is not installed: `apt-get install strace`")
    counts, arguments = Counter(), defaultdict(set)
    with tempfile.TemporaryDirectory() as folder:
        for i, (text, function, calls, extract) in enumerate(HONEST):
            out = os.path.join(folder, f"trace{i}")
            result = json.loads(_trace_one(strace, text, function, calls, extract, out))
            if text is not _ERRORS and not result["ran"]:
                raise SystemExit(f"honest program {i} did not run: {result}")
            c, a = parse_trace(out)
            counts.update(c)
            for name, values in a.items():
                arguments[name] |= values
    return counts, arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a traced call is missing from the allow list")
    args = parser.parse_args(argv)
    counts, arguments = trace()
    missing = sorted(set(counts) - set(seccomp.ALLOWED))
    print(f"{len(counts)} system calls traced ({sum(counts.values())} calls):")
    for name, count in sorted(counts.items()):
        note = "  NOT ALLOWED" if name in missing else ""
        print(f"  {name:<18} {count:6d}{note}")
    for name, values in sorted(arguments.items()):
        print(f"  {name} arguments: {', '.join(sorted(values))}")
    print(f"allow list: {len(seccomp.ALLOWED)} names ({len(seccomp.TRACED)} traced here or "
          f"for bubblewrap's init, {len(seccomp.EQUIVALENTS)} equivalents and honest uses)")
    if missing:
        print(f"missing from seccomp.ALLOWED: {', '.join(missing)}")
    return 1 if (args.check and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
