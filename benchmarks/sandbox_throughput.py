"""Sandbox throughput: target answers scored per second, this tree's sandbox against the one
of a baseline commit (by default the last one before the allow list, per-sandbox memory
cgroups and extraction inside the sandbox) and against no isolation (`unsafe_subprocess`).

Each side scores the same embedded target answers (worked line, then the `solution()`
program) with its own `soups.evaluation.scoring.score_programs`, as a trial does, in a process of
its own with its own source tree on `sys.path`, the same number of workers, best of
`--repeats`. Every side must score every answer correct (checked); the figure that matters
is this tree / baseline (goal: at least 0.8x).

    .venv/bin/python -m benchmarks.sandbox_throughput [--n 200] [--workers 4] [--repeats 3]
    .venv/bin/python -m benchmarks.sandbox_throughput --quick   # seconds: 8 answers, once
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit with the deny-list sandbox (extraction in the evaluator, no cgroups).
BASELINE_COMMIT = "049f221d7348195df69d581377164465bfc041c0"

# Runs in each side's process: argv = rows file, workers, repeats, sandbox, scoring module.
SIDE = """
import importlib, json, sys, time
score_programs = importlib.import_module(sys.argv[5]).score_programs
rows = json.load(open(sys.argv[1]))
workers, repeats, sandbox = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
answers = [r["completion"] for r in rows]
score_programs(rows[:workers], answers[:workers], sandbox=sandbox, workers=workers)  # warm-up
best, correct = 0.0, []
for _ in range(repeats):
    start = time.perf_counter()
    records, _ = score_programs(rows, answers, sandbox=sandbox, workers=workers)
    best = max(best, len(rows) / (time.perf_counter() - start))
    correct = [r["correct"] for r in records]
print(json.dumps({"rate": best, "correct": correct}))
"""


def target_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of the embedded target, whose completions are the answers scored."""
    from soups.data.datasets import DataSettings
    from soups.data.generated import math_code_example

    rng, settings = random.Random(seed), DataSettings()
    return [math_code_example(rng, settings) for _ in range(n)]


def baseline_tree(commit: str, into: Path) -> Path | None:
    """`soups/` as it was at `commit`, unpacked under `into` (None outside a clone)."""
    try:
        data = subprocess.run(["git", "archive", "--format=tar", commit, "soups"], cwd=ROOT,
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    archive = into / "baseline.tar"
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def scoring_module(tree: Path) -> str:
    """Where a tree keeps `score_programs` (`soups/scoring.py` before the core was laid out
    by stage)."""
    staged = (tree / "soups" / "evaluation" / "scoring.py").is_file()
    return "soups.evaluation.scoring" if staged else "soups.scoring"


def run_side(tree: Path, rows_file: Path, workers: int, repeats: int, sandbox: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", SIDE, str(rows_file), str(workers),
                           str(repeats), sandbox, scoring_module(tree)], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"side {tree} ({sandbox}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_COMMIT,
                        help="commit whose sandbox is the baseline")
    parser.add_argument("--quick", action="store_true", help="8 answers, 2 workers, once")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.workers, args.repeats = 8, 2, 1

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rows_file = folder / "rows.json"
        rows_file.write_text(json.dumps(target_rows(args.n)))
        sides = {"this tree (bwrap)": (ROOT, "bwrap")}
        baseline = baseline_tree(args.baseline, folder)
        if baseline is not None:
            sides[f"baseline {args.baseline[:7]} (bwrap)"] = (baseline, "bwrap")
        sides["this tree (unsafe_subprocess)"] = (ROOT, "unsafe_subprocess")
        results = {name: run_side(tree, rows_file, args.workers, args.repeats, sandbox)
                   for name, (tree, sandbox) in sides.items()}
    for name, result in results.items():
        assert all(result["correct"]), f"{name} scored a reference answer wrong"
    rates = {name: result["rate"] for name, result in results.items()}
    print(f"{args.n} target answers, {args.workers} workers, best of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:<32} {rate:7.1f} answers/s")
    mine = rates["this tree (bwrap)"]
    if baseline is not None:
        ratio = mine / rates[f"baseline {args.baseline[:7]} (bwrap)"]
        print(f"  this tree / baseline             {ratio:.2f}x (goal >= 0.8)")
    else:
        print("  (baseline commit not found: run from a clone for the ratio)")
    unsafe = rates["this tree (unsafe_subprocess)"]
    print(f"  this tree / unsafe_subprocess    {mine / unsafe:.2f}x")
    return rates


if __name__ == "__main__":
    main()
