"""Evaluation throughput: batched greedy generation (soups.evaluation.evaluate.generate) against
one-example-at-a-time `generate` on the same model, prompts and token budget.

Both sides produce the same answers (checked); the ratio is examples/s batched over
examples/s one at a time.

    .venv/bin/python -m benchmarks.eval_throughput [--n 128] [--batch-size 32] [--model DIR]
    .venv/bin/python -m benchmarks.eval_throughput --quick   # seconds: 4 prompts, 8 tokens
"""

from __future__ import annotations

import argparse
import time

from benchmarks import quick_data
from soups.data.datasets import DataSettings, build_task_datasets, load_task_dataset
from soups.evaluation.evaluate import GenerationSettings, generate, load_model
from soups.home import cache_dir
from soups.training.base_model import BaseModelSettings, build_base_model


def _settings(max_new_tokens: int, batch_size: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--task", default="math_code")
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="seconds: 4 prompts of a small generated split, 8 new tokens")
    args = parser.parse_args(argv)
    data = DataSettings()
    if args.quick:
        args.n, args.batch_size, args.max_new_tokens = 4, 4, 8
        data = quick_data(train=4)

    model_dir = args.model or build_base_model(cache_dir("base_models"), BaseModelSettings())
    data_dir = build_task_datasets(cache_dir("datasets"), data)
    rows = load_task_dataset(data_dir / args.task, "validation")
    prompts = [r["prompt"] for r in rows.select(range(min(args.n, len(rows))))]
    model, tokenizer = load_model(model_dir)
    generate(model, tokenizer, prompts[:2], _settings(args.max_new_tokens, 2))  # warm-up

    start = time.perf_counter()
    one = _settings(args.max_new_tokens, 1)
    single = [generate(model, tokenizer, [p], one)[0] for p in prompts]
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate(model, tokenizer, prompts, _settings(args.max_new_tokens, args.batch_size))
    t_batched = time.perf_counter() - start
    same = sum(a == b for a, b in zip(single, batched, strict=True))
    print(f"{len(prompts)} prompts of {args.task}, max {args.max_new_tokens} new tokens")
    print(f"one at a time : {t_single:7.2f} s  {len(prompts) / t_single:7.1f} examples/s")
    print(f"batched ({args.batch_size:>3}) : {t_batched:7.2f} s  "
          f"{len(prompts) / t_batched:7.1f} examples/s")
    print(f"speed-up {t_single / t_batched:.1f}x; identical answers {same}/{len(prompts)}")
    return {"single_s": t_single, "batched_s": t_batched, "identical": same,
            "prompts": len(prompts)}


if __name__ == "__main__":
    main()
