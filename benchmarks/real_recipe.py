"""The fine-tune recipe for the real-model tier, chosen by measurement: held-out loss of a
skill LoRA on SmolLM2-135M-Instruct (chat-templated generated rows) after the same number of
steps, over learning rates (and ranks), with the plain single-process loop the study's
trainable is checked against (`soups.training.lora_training.train_lora`).

    .venv/bin/python -m benchmarks.real_recipe [--skill math] [--steps 40] \
        [--lr 1e-4 3e-4 1e-3 3e-3] [--rank 8]
    .venv/bin/python -m benchmarks.real_recipe --quick       # seconds: the embedded model

Prints one row per setting: the held-out loss before and after, and seconds. The lowest
loss after the same steps is the recipe `studies/real_composition.yaml` uses.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from soups.training.train_settings import LoraSettings, TrainSettings


def _rows(base: str, skill: str, train: int, held: int, model_dir: str):
    from soups.data.datasets import DataSettings, build_task_datasets
    from soups.home import cache_dir
    from soups.tasks.task_data import TaskData
    from soups.tasks.task_spec import TaskSpec

    sizes = {"math": {"train": 2000, "validation": 200, "test": 200},
             "code": {"train": 2000, "validation": 200, "test": 200},
             "math_code": {"train": 100, "validation": 200, "test": 300}}
    if train + held < 200:  # a quick run: generate only what it reads
        sizes = {name: {"train": train, "validation": held, "test": 1}
                 for name in ("math", "code", "math_code")}
    data = build_task_datasets(cache_dir("datasets"), DataSettings(sizes=sizes))
    task = TaskData(skill, TaskSpec(), str(data / skill), model_dir=model_dir)
    rows = task.rows("train")
    return rows[:train], task.rows("validation")[:held]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--skill", default="math")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--rank", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="the embedded model, 3 steps, two rates")
    args = parser.parse_args(argv)
    if args.quick:
        args.base, args.steps, args.lr, args.batch = "embedded", 3, [1e-3, 3e-3], 4

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soups.training.lora_training import train_lora
    from soups.training.text_batches import encode_dataset, pad_token_id
    from soups.training.training_loop import held_out_loss
    from study.resolve import resolve_base

    model_dir = resolve_base(args.base)
    held_count = 8 if args.quick else 32
    train_rows, held_rows = _rows(args.base, args.skill, args.steps * args.batch, held_count,
                                  model_dir)
    base = TrainSettings(max_steps=args.steps, micro_batch_size=args.batch, warmup_steps=0,
                         max_length=192, eval_every=args.steps)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held = encode_dataset(tokenizer, held_rows, base.max_length, base.loss_on)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = held_out_loss(model, held, args.batch, pad_token_id(tokenizer))
    del model
    results = []
    print(f"{args.base}: {args.skill} LoRA, {args.steps} steps of {args.batch} rows, held-out "
          f"loss on {len(held_rows)} validation rows (before: {before:.3f})")
    print(f"  {'rank':>4} {'lr':>8} {'after':>7} {'seconds':>8}")
    for rank in args.rank:
        for lr in args.lr:
            lora = LoraSettings(rank=rank, alpha=2.0 * rank, dropout=0.0)
            train = replace(base, learning_rate=lr)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                result = train_lora(model_dir, train_rows, out, lora, train, held_rows)
            seconds = time.perf_counter() - start
            results.append({"rank": rank, "lr": lr, "before": before,
                            "after": result.eval_loss, "seconds": seconds})
            print(f"  {rank:>4} {lr:>8.0e} {result.eval_loss:>7.3f} {seconds:>8.0f}")
    best = min(results, key=lambda r: r["after"])
    print(f"  lowest held-out loss: rank {best['rank']}, lr {best['lr']:.0e}")
    return results


if __name__ == "__main__":
    main()
