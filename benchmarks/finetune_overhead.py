"""Ray Train + DeepSpeed fine-tune (1 worker, ZeRO 0) against the plain single-process PEFT
loop (`soups.training.lora_training.train_lora`) on the same model, data, settings and steps.

Reported separately: start-up (call -> end of the first optimizer step: Ray workers, process
group, DeepSpeed engine, model load) and steady-state throughput (tokens per second of
compute over the steps after the first `--skip`, per optimizer step, same token counts on
both sides since the data order is the same). Ratio = plain tokens/s / Ray tokens/s.

    python -m benchmarks.finetune_overhead [--steps 60] [--rank 8] [--out results.json]
    python -m benchmarks.finetune_overhead --base smollm2-135m-instruct --steps 20 \
        --batch-size 8 --lr 1e-3      # the real-model tier (goal: Ray / plain >= 0.9x)
    python -m benchmarks.finetune_overhead --quick   # under a minute: 4 steps of 4 rows

`--base`: embedded (default), a folder, a .gguf file or smollm2-135m-instruct; its rows go
through its chat template where it has one, as in a study.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import quick_data
from soups.data.datasets import DataSettings, build_task_datasets
from soups.home import cache_dir
from soups.training.lora_training import train_lora
from soups.training.train_settings import LoraSettings, TrainSettings


def plain(model_dir, rows, out, lora, train, skip):
    stamps = []
    called = time.perf_counter()
    result = train_lora(model_dir, rows, out, lora, train,
                        on_step=lambda r: stamps.append((time.perf_counter(), r["tokens"])))
    steady_s = stamps[-1][0] - stamps[skip][0]
    steady_tokens = stamps[-1][1] - stamps[skip][1]
    return {"startup_s": stamps[0][0] - called, "steady_tokens_per_s": steady_tokens / steady_s,
            "wall_s": result.seconds, "steps": result.steps, "final_loss": result.train_loss}


def ray_train(model_dir, rows, out, lora, train, skip, storage, cpus):
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, finetune_adapter

    called = time.perf_counter()
    result = finetune_adapter(model_dir, rows, out, lora, train,
                              deepspeed=DeepSpeedSettings(zero_stage=0),
                              scaling=ScalingSettings(num_workers=1, cpus_per_worker=cpus),
                              storage_path=storage)
    wall = time.perf_counter() - called
    seconds, tokens = result.step_seconds[skip + 1:], result.step_tokens[skip + 1:]
    first_step = result.step_seconds[0]
    return {"startup_s": result.startup_seconds + first_step,
            "steady_tokens_per_s": sum(tokens) / sum(seconds), "wall_s": wall,
            "steps": result.steps, "final_loss": result.train_loss}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--quick", action="store_true",
                        help="under a minute: 4 steps of 4 rows, rank 4 (the tests run it)")
    args = parser.parse_args(argv)
    data_settings = DataSettings()
    if args.quick:
        args.steps, args.batch_size, args.rank, args.skip = 4, 4, 4, 1
        data_settings = quick_data(train=32)
    import ray

    from soups.tasks.task_data import TaskData
    from soups.tasks.task_spec import TaskSpec
    from study.resolve import resolve_base

    model_dir = resolve_base(args.base, log=print)
    data = build_task_datasets(cache_dir("datasets"), data_settings)
    rows = TaskData("math", TaskSpec(), str(data / "math"), model_dir=model_dir).rows("train")
    lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0)
    train = TrainSettings(learning_rate=args.lr, max_steps=args.steps,
                          micro_batch_size=args.batch_size, max_length=192, seed=0)
    # The worker gets as many cores (torch threads) as the plain loop uses.
    ray.init(num_cpus=torch.get_num_threads(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows_out = {
            "plain PEFT loop": plain(model_dir, rows, Path(tmp) / "plain", lora, train,
                                     args.skip),
            "Ray Train + DeepSpeed (1 worker)": ray_train(
                model_dir, rows, Path(tmp) / "ray", lora, train, args.skip, Path(tmp) / "runs",
                torch.get_num_threads()),
        }
    ray.shutdown()
    base = rows_out["plain PEFT loop"]["steady_tokens_per_s"]
    print(f"{args.base}: {args.steps} steps of {args.batch_size} rows, rank {args.rank}")
    print(f"{'side':<34}{'start-up s':>11}{'steady tok/s':>14}{'vs plain':>10}{'wall s':>8}"
          f"{'loss':>8}")
    for side, r in rows_out.items():
        r["slowdown_vs_plain"] = base / r["steady_tokens_per_s"]
        print(f"{side:<34}{r['startup_s']:>11.1f}{r['steady_tokens_per_s']:>14.0f}"
              f"{r['slowdown_vs_plain']:>9.2f}x{r['wall_s']:>8.1f}{r['final_loss']:>8.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows_out, indent=2))
    return rows_out


if __name__ == "__main__":
    main()
