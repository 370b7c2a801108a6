"""The real-model tier on one GPU, in one command and one table (under 8 minutes on one GPU):

1. the real-model check study (`studies/real_check.yaml`, SmolLM2-135M-Instruct) with its
   fine-tunes in DeepSpeed ZeRO-2 and bfloat16 on the GPU and its evaluation on CUDA in
   bfloat16: wall seconds, and that it finished;
2. the resident evaluator on the same base in bfloat16: candidates per minute with one
   candidate installed at a time (k = 1) and eight side by side (k = 8), against merging
   each candidate into its own model (today's per-candidate path), and how many answers the
   merged and the unmerged (resident) models share in bfloat16;
3. peak GPU memory of each step.

    make gpu-check                                   # on a machine with a CUDA GPU
    .venv/bin/python -m benchmarks.gpu_check --cpu   # the same path on the CPU, small

`--cpu` runs every step on the CPU in float32 with fewer rows and tokens: what the tests run,
so the GPU command is known to work before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_STUDY = ["finetune.use_gpu=true", "finetune.zero_stage=2", "evaluation.device=cuda",
             "evaluation.dtype=bfloat16", "search.gpus_per_trial=0.25",
             "evaluation.evaluator_gpus=0.25"]


def run_study(cpu: bool, name: str) -> dict:
    sets = [] if cpu else GPU_STUDY
    command = [sys.executable, "-m", "study.cli", "run", "studies/real_check.yaml", "--name",
               name, *[f"--set={s}" for s in sets]]
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
    from soups.home import soups_home

    board = soups_home() / name / "leaderboard.json"
    rows = json.loads(board.read_text()) if board.is_file() else []
    return {"ok": done.returncode == 0, "seconds": seconds, "trials": len(rows),
            "best": rows[0]["candidate"] if rows else None}


def run_evaluator(cpu: bool) -> list[dict]:
    from benchmarks import eval_candidates

    args = ["--model", "smollm2-135m-instruct", "--modes", "merged,resident,side8",
            "--candidates", "8", "--device", "cpu" if cpu else "cuda",
            "--dtype", "float32" if cpu else "bfloat16",
            "--n", "4" if cpu else "32", "--max-new-tokens", "8" if cpu else "64",
            "--batch-size", "4" if cpu else "16"]
    return eval_candidates.main(args)


def table(study: dict, modes: list[dict], candidates: int = 8) -> list[str]:
    by_mode = {m["mode"]: m for m in modes}

    def per_minute(mode: str) -> float:
        return 60 * candidates / by_mode[mode]["total_s"]

    from benchmarks.eval_candidates import agreement

    same, total = agreement(by_mode["merged"]["answers"], by_mode["resident"]["answers"])

    def gpu(mode: str) -> str:
        peak = by_mode[mode].get("gpu_peak_mb")
        return f"{peak:.0f} MB" if peak is not None else "-"

    rows = [("real-model check study", f"{'finished' if study['ok'] else 'FAILED'} in "
             f"{study['seconds']:.0f} s, {study['trials']} trials, best {study['best']}"),
            ("candidates/min, merged per candidate", f"{per_minute('merged'):.1f} "
             f"(GPU peak {gpu('merged')})"),
            ("candidates/min, resident k = 1", f"{per_minute('resident'):.1f} "
             f"(GPU peak {gpu('resident')})"),
            ("candidates/min, resident k = 8", f"{per_minute('side8'):.1f} "
             f"({per_minute('side8') / per_minute('merged'):.1f}x merged; GPU peak "
             f"{gpu('side8')})"),
            ("merged vs unmerged answers", f"{same}/{total} identical")]
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same path on the CPU, small")
    parser.add_argument("--name", default=None, help="the check study's name (default: "
                        "gpu-check-<time>)")
    args = parser.parse_args(argv)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run on a GPU machine, or --cpu for the path")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    study = run_study(args.cpu, args.name or f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    modes = run_evaluator(args.cpu)
    lines = table(study, modes)
    print("\n".join(["", "gpu check" + (" (CPU path)" if args.cpu else ""), *lines]))
    if not study["ok"]:
        raise SystemExit(1)
    return lines


if __name__ == "__main__":
    main()
