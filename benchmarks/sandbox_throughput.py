"""Sandbox throughput: programs scored per second by the kernel sandbox (bubblewrap +
seccomp, `soups.sandbox`) against the sandbox it replaced (`python -I -S`, rlimits, a setuid
drop and an audit hook; read from git history) and against no isolation at all
(`unsafe_subprocess`), on the same target answers with the same number of workers.

Every side must return the same outputs (checked); the figure that matters is the ratio
bwrap / previous (the goal: at least one half).

    .venv/bin/python -m benchmarks.sandbox_throughput [--n 200] [--workers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from soups.sandbox import BWRAP, UNSAFE, ProgramJob, check_sandbox, run_many
from soups.tasks import math_code_example

# The last commit with the previous sandbox (soups/sandbox.py, before the kernel sandbox).
PREVIOUS_COMMIT = "0d7961d1568573a7a35dba67bd4e5803ed12ff81"
ROOT = Path(__file__).resolve().parents[1]


def target_answers(n: int, seed: int = 0) -> list[ProgramJob]:
    """`n` target answers (the embedded target's reference programs), as a trial scores."""
    rng = random.Random(seed)
    rows = [math_code_example(rng, 50, 0.3) for _ in range(n)]
    return [ProgramJob(r["completion"], r["function"],
                       tuple(tuple(c) for c in json.loads(r["calls"]))) for r in rows]


def previous_sandbox():
    """The previous sandbox module, loaded from git history (None outside a clone)."""
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:soups/sandbox.py"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "previous_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def timed(run, jobs, repeats: int) -> tuple[float, list]:
    """Best programs/s over `repeats` runs, and the outputs of the last run."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = run(jobs)
        best = max(best, len(jobs) / (time.perf_counter() - start))
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    jobs = target_answers(args.n)
    check_sandbox(BWRAP)
    sides = {
        "bwrap": lambda js: [r.outputs for r in run_many(js, sandbox=BWRAP,
                                                         workers=args.workers)],
        "unsafe_subprocess": lambda js: [r.outputs for r in run_many(
            js, sandbox=UNSAFE, workers=args.workers)],
    }
    previous = previous_sandbox()
    if previous is not None:
        def run_previous(js):
            with ThreadPoolExecutor(max_workers=args.workers) as pool:  # as it was scored
                return [r.outputs for r in pool.map(
                    lambda j: previous.run_function(j.program, j.function, j.calls), js)]
        sides["previous"] = run_previous
    rates, answers = {}, {}
    for name, run in sides.items():
        timed(run, jobs[: args.workers], 1)  # warm-up (probe, page cache)
        rates[name], answers[name] = timed(run, jobs, args.repeats)
    reference = answers["bwrap"]
    for name, outputs in answers.items():
        assert outputs == reference, f"{name} returned other outputs than bwrap"
    print(f"{args.n} target answers, {args.workers} workers, best of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:<18} {rate:7.1f} programs/s")
    if "previous" in rates:
        print(f"  bwrap / previous   {rates['bwrap'] / rates['previous']:.2f}x (goal >= 0.5)")
    else:
        print("  (previous sandbox not found in git history: no ratio)")
    print(f"  bwrap / unsafe     {rates['bwrap'] / rates['unsafe_subprocess']:.2f}x")


if __name__ == "__main__":
    main()
