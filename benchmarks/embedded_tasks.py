"""Does the embedded benchmark discriminate? Base model vs quick single-skill LoRAs.

Builds (or reuses) the embedded base model and data, trains one quick LoRA per skill with the
plain PEFT loop (`soups.training.lora_training.train_lora`), and scores base, each skill LoRA (and a
quick DATA-MIX LoRA) on every task's validation split, with partial credit. Wanted: each skill
LoRA clearly beats the base on its own skill; neither base nor a single skill solves the
target.

    .venv/bin/python -m benchmarks.embedded_tasks [--steps 300] [--rank 16] [--out FILE]
    .venv/bin/python -m benchmarks.embedded_tasks --quick   # seconds: 3 steps, 4 rows a task
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from benchmarks import quick_data
from soups.data.datasets import DataSettings, build_task_datasets, load_task_dataset
from soups.data.generated import TASK_NAMES
from soups.evaluation.evaluate import evaluate_rows, load_model
from soups.home import cache_dir
from soups.training.base_model import BUILD_FILE, BaseModelSettings, build_base_model
from soups.training.lora_training import train_lora
from soups.training.train_settings import LoraSettings, TrainSettings


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, default=200, help="validation examples per task")
    parser.add_argument("--work", type=Path, default=Path("soups_home/benchmarks/embedded"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="seconds: 3 steps of rank 4 on 16 rows a skill, 4 rows a task")
    args = parser.parse_args(argv)
    data = DataSettings()
    if args.quick:
        args.steps, args.rank, args.limit = 3, 4, 4
        data = quick_data(train=16)

    t0 = time.perf_counter()
    model_dir = build_base_model(cache_dir("base_models"), BaseModelSettings())
    build = json.loads((model_dir / BUILD_FILE).read_text())
    data_dir = build_task_datasets(cache_dir("datasets"), data)
    print(f"base model {build['parameters'] / 1e6:.2f}M params, built in "
          f"{build['build_seconds']:.0f} s; ready after {time.perf_counter() - t0:.0f} s")

    val = {t: load_task_dataset(data_dir / t, "validation") for t in TASK_NAMES}
    val = {t: rows.select(range(min(args.limit, len(rows)))) for t, rows in val.items()}
    lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    train = TrainSettings(learning_rate=args.lr, max_steps=args.steps, micro_batch_size=16,
                          warmup_steps=min(20, args.steps), max_length=192)
    train_sets = {s: list(load_task_dataset(data_dir / s, "train")) for s in ("math", "code")}
    mix = train_sets["math"] + train_sets["code"]
    random.Random(0).shuffle(mix)
    train_sets["data_mix"] = mix

    adapters: dict[str, Path | None] = {"base": None}
    for name, rows in train_sets.items():
        out = args.work / f"{name}-r{args.rank}-s{args.steps}"
        result = train_lora(model_dir, rows, out, lora, train)
        print(f"trained {name} LoRA: {result.steps} steps in {result.seconds:.0f} s, "
              f"final train loss {result.train_loss:.3f}")
        adapters[name] = out

    table = {}
    for name, adapter in adapters.items():
        model, tokenizer = load_model(model_dir, adapter)
        table[name] = {}
        for task in TASK_NAMES:
            scores = evaluate_rows(model, tokenizer, task, val[task])
            table[name][task] = {"accuracy": scores.accuracy, **scores.partial,
                                 "seconds": round(scores.seconds, 1)}
    print(f"\n{'model':<10} " + " ".join(f"{t:>30}" for t in TASK_NAMES))
    for name, row in table.items():
        cells = []
        for task in TASK_NAMES:
            cell = row[task]
            extra = ",".join(f"{k[0]}={v:.2f}" for k, v in cell.items()
                             if k not in ("accuracy", "seconds"))
            cells.append(f"{cell['accuracy']:.3f} ({extra})")
        print(f"{name:<10} " + " ".join(f"{c:>30}" for c in cells))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
