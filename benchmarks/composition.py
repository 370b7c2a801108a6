"""Why (or whether) the embedded benchmark composes: diagnostics of the default study's LoRAs.

Trains the default study's skill LoRAs (its `finetune` recipe, one seed) with the plain PEFT
loop on the embedded base model and data, then measures, on the validation splits:

- each skill LoRA on its own skill and on the other (and the base), with partial credit;
- scale curves: each skill's accuracy with its LoRA scaled by s (how linear the LoRA is);
- the sum of the two LoRAs (static cat, weights 1, 1) and learned CAT on the skill mix (the
  default study's CAT recipe), on every task;
- the oracle: CAT weights trained directly on the target's train split, softmax and free
  scalars. It bounds what any per-module weighting of these two LoRAs can reach; it is a
  diagnostic only (the study's methods never see the target's train split);
- a control: learned CAT with the code LoRA replaced by a random LoRA of the same per-module
  norm (a learned mixture can help as a regulariser alone);
- the per-token loss of the gold target answers (teacher forcing) under the base, each
  LoRA, their sum and learned CAT, split into content tokens (numbers, operators) and frame
  tokens (everything else): does a merge fail at the format or at the content?

    .venv/bin/python -m benchmarks.composition [--limit 200] [--scales 0.25,0.5,0.75,1,1.25]
        [--out FILE.json] [--seed 0] [--reuse]
    .venv/bin/python -m benchmarks.composition --quick   # seconds: a few steps and rows
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from pathlib import Path

import torch

from soups.adapters import LoraAdapter, LoraModule, save_adapter
from soups.compose.cat import CatSettings, learn_cat
from soups.compose.merge import merge_adapters
from soups.data.datasets import build_task_datasets, load_task_dataset
from soups.data.generated import SKILL_NAMES, TASK_NAMES
from soups.evaluation.evaluate import evaluate_rows, load_model
from soups.home import cache_dir
from soups.training.base_model import BUILD_FILE
from soups.training.lora_training import train_lora
from soups.training.text_batches import encode_example
from study.resolve import resolve_base_model
from study.spec import StudySpec, assignments, parse_model

TARGET = "math_code"
CONTENT = re.compile(r"^\s*(\d+|[-+*/]|//)\s*$")  # a number or an operator token
EXPRESSION = re.compile(r"(\d+) (//|[-+*/]) (\d+)")


def _first_expression(text: str) -> tuple[str, str, str] | None:
    found = EXPRESSION.search(text)
    return (found[1], found[2].replace("//", "/"), found[3]) if found else None


def _line_right(rows: list[dict], records: list[dict]) -> float:
    """Share of answers whose first `a op b` is the gold answer's: the content (which
    numbers, which operator), whatever the format around it."""
    right = [_first_expression(rec["output"]) == _first_expression(row["completion"])
             for row, rec in zip(rows, records, strict=True)]
    return sum(right) / max(len(right), 1)


def _scores(model_dir: Path, adapter: Path | None, rows: dict[str, list[dict]],
            tasks=TASK_NAMES) -> dict[str, dict]:
    model, tokenizer = load_model(model_dir, adapter)
    out = {}
    name = adapter.name if adapter else "base"
    for task in tasks:
        scores = evaluate_rows(model, tokenizer, task, rows[task])
        out[task] = {"accuracy": round(scores.accuracy, 4),
                     **{k: round(v, 4) for k, v in scores.partial.items()},
                     "line": round(_line_right(rows[task], scores.records), 4),
                     "sample": scores.records[0]["output"][:160]}
        print(f"  {name} on {task}: {scores.accuracy:.3f} {scores.partial}", flush=True)
    return out


def _scaled(adapter: Path, scale: float, out: Path) -> Path:
    return merge_adapters([adapter], "task_arithmetic", out, weights=[scale])


def _random_like(adapter: Path, out: Path, seed: int) -> Path:
    """A LoRA with the same modules, ranks and per-module norm ||s B A||_F as `adapter`, with
    random directions."""
    source = LoraAdapter.open(adapter)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in source.modules():
        a = torch.randn(module.A.shape, generator=generator)
        b = torch.randn(module.B.shape, generator=generator)
        fresh = LoraModule(A=a, B=b, scaling=module.scaling)
        ratio = torch.linalg.norm(module.delta()) / torch.linalg.norm(fresh.delta())
        factor = float(ratio.sqrt())
        modules[name] = LoraModule(A=a * factor, B=b * factor, scaling=module.scaling)
    return save_adapter(out, modules, source.config, provenance={"random_like": str(adapter)})


def _token_losses(model_dir: Path, adapter: Path | None, rows: list[dict]) -> dict[str, float]:
    """Mean NLL of the gold completions' content and frame tokens (teacher forcing)."""
    model, tokenizer = load_model(model_dir, adapter)
    sums, counts = {"content": 0.0, "frame": 0.0}, {"content": 0, "frame": 0}
    with torch.no_grad():
        for row in rows:
            ids, labels = encode_example(tokenizer, row["prompt"], row["completion"], 512)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]),
                                                    reduction="none")
            for position, label in enumerate(labels[1:]):
                if label < 0:
                    continue
                kind = "content" if CONTENT.match(tokenizer.decode([label])) else "frame"
                sums[kind] += float(nll[position])
                counts[kind] += 1
    return {kind: round(sums[kind] / max(counts[kind], 1), 4) for kind in sums}


def _cat(model_dir: Path, adapters: list[Path], rows: list[list[dict]], out: Path,
         spec: StudySpec, normalisation: str, seed: int, steps: int | None = None,
         lr: float | None = None) -> Path:
    """CAT weights trained with the study's CAT recipe (or `steps` / `lr`), from the
    uniform mixture (softmax) or from the plain sum (free scalars, init 1)."""
    from dataclasses import replace

    from soups.compose.cat import PAPER_CAT_TRAIN

    cat = spec.cat
    train = replace(PAPER_CAT_TRAIN, seed=seed, learning_rate=lr or cat.learning_rate,
                    max_steps=steps or cat.max_steps, micro_batch_size=cat.micro_batch_size,
                    warmup_steps=cat.warmup_steps, eval_every=cat.eval_every)
    init = "uniform" if normalisation == "softmax" else "ones"
    fraction = None if cat.count else (1.0 if len(rows) == 1 else cat.fraction)
    held = min(cat.held_out, len(rows[0]) // 4) if len(rows) == 1 else cat.held_out
    if len(rows) == 1:  # the oracle: the target's train split, some of it held out
        fraction = (len(rows[0]) - held) / len(rows[0])
    learn_cat(adapters, model_dir, rows, out,
              CatSettings(normalisation=normalisation, init=init, seed=seed), train,
              fraction=fraction, count=cat.count, held_out=held, log=None)
    return out


# --quick: every stage on a few rows and steps (the tests run it; it measures nothing).
QUICK_SETS = ["finetune.max_steps=3", "finetune.held_out=0", "finetune.warmup_steps=1",
              "cat.max_steps=2", "cat.eval_every=1", "cat.held_out=4",
              "generated.sizes={math: {train: 24, validation: 4, test: 4}, code: {train: 24, "
              "validation: 4, test: 4}, math_code: {train: 8, validation: 4, test: 4}}"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="validation rows per task")
    parser.add_argument("--scales", default="0.25,0.5,0.75,1,1.25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("soups_home/benchmarks/composition"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--oracle-steps", type=int, default=300)
    parser.add_argument("--oracle-lr", type=float, default=0.05)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a study key over the default study, KEY.PATH=VALUE (as soups "
                        "run --set), e.g. finetune.learning_rate=5e-4")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the skill LoRAs of an earlier run in --work")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: 3 fine-tune and 2 CAT steps, 4 rows a task, one scale")
    args = parser.parse_args(argv)
    if args.quick:
        args.overrides = QUICK_SETS + args.overrides
        args.limit, args.scales, args.oracle_steps = 4, "1", 2
    spec = parse_model(StudySpec, assignments(args.overrides), "--set")
    t0 = time.perf_counter()
    model_dir = Path(resolve_base_model(spec))
    data_dir = build_task_datasets(cache_dir("datasets"), spec.generated.settings())
    build = json.loads((model_dir / BUILD_FILE).read_text())
    print(f"base {build['parameters'] / 1e6:.2f}M params (built in {build['build_seconds']} s)")
    val = {t: list(load_task_dataset(data_dir / t, "validation"))[: args.limit]
           for t in TASK_NAMES}
    train_rows = {t: list(load_task_dataset(data_dir / t, "train")) for t in TASK_NAMES}
    work = args.work / f"seed{args.seed}"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    rank = spec.finetune.ranks[0]
    lora = spec.finetune.lora_settings(rank)
    train = spec.finetune.train_settings()
    from dataclasses import replace
    train = replace(train, seed=args.seed)
    report: dict = {"settings": {"lora": lora.__dict__ | {"target_modules": list(
        lora.target_modules)}, "train": train.__dict__}, "seconds": {}}

    adapters: dict[str, Path] = {}
    for skill in SKILL_NAMES:
        started = time.perf_counter()
        adapters[skill] = work / skill
        if args.reuse and (adapters[skill] / "adapter_config.json").is_file():
            continue
        result = train_lora(model_dir, train_rows[skill], adapters[skill], lora, train)
        report["seconds"][f"train_{skill}"] = round(time.perf_counter() - started, 1)
        print(f"{skill} LoRA: {result.steps} steps, loss {result.train_loss:.3f}, "
              f"{result.seconds:.0f} s")

    table = {"base": _scores(model_dir, None, val)}
    for skill, path in adapters.items():
        table[skill] = _scores(model_dir, path, val)
    pair = [adapters[s] for s in SKILL_NAMES]
    table["sum"] = _scores(model_dir, merge_adapters(pair, "cat", work / "sum",
                                                     weights=[1.0, 1.0]), val)
    skill_rows = [train_rows[s] for s in SKILL_NAMES]
    cat_dir = _cat(model_dir, pair, skill_rows, work / "cat_learned", spec, "softmax", args.seed)
    table["cat_learned"] = _scores(model_dir, cat_dir, val)
    free = _cat(model_dir, pair, skill_rows, work / "cat_learned_free", spec, "none", args.seed)
    table["cat_learned_free"] = _scores(model_dir, free, val)
    for norm in ("softmax", "none"):
        oracle = _cat(model_dir, pair, [train_rows[TARGET]], work / f"oracle_{norm}", spec,
                      norm, args.seed, args.oracle_steps, args.oracle_lr)
        table[f"oracle_{norm}"] = _scores(model_dir, oracle, val, (TARGET,))
    random_code = _random_like(adapters["code"], work / "random_code", args.seed)
    control = _cat(model_dir, [adapters["math"], random_code], skill_rows,
                   work / "cat_random_control", spec, "softmax", args.seed)
    table["cat_math+random"] = _scores(model_dir, control, val, (TARGET,))
    report["scores"] = table

    scales = [float(s) for s in args.scales.split(",")]
    curves = {}
    for skill, path in adapters.items():
        curves[skill] = {}
        for scale in scales:
            scaled = path if scale == 1 else _scaled(path, scale, work / f"{skill}_x{scale}")
            curves[skill][scale] = _scores(model_dir, scaled, val, (skill,))[skill]["accuracy"]
    report["scale_curves"] = curves

    gold = val[TARGET][: min(args.limit, 100)]
    losses = {"base": _token_losses(model_dir, None, gold)}
    for name in (*SKILL_NAMES, "sum", "cat_learned"):
        losses[name] = _token_losses(model_dir, adapters.get(name, work / name), gold)
    report["target_token_loss"] = losses
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)

    print(f"\n{'model':<18}" + "".join(f"{t:>24}" for t in TASK_NAMES))
    for name, row in table.items():
        cells = [f"{row[t]['accuracy']:.3f}" + "".join(
            f" {k[0]}={v:.2f}" for k, v in row[t].items() if k not in ("accuracy", "sample"))
            if t in row else "-" for t in TASK_NAMES]
        print(f"{name:<18}" + "".join(f"{c:>24}" for c in cells))
    print("\nscale curves (own skill accuracy at s): " + json.dumps(curves))
    print("target gold-answer NLL per token (content / frame):")
    for name, row in losses.items():
        print(f"  {name:<12} content {row['content']:.3f}  frame {row['frame']:.3f}")
    for name, row in table.items():
        if TARGET in row:
            print(f"  sample {name}: {row[TARGET]['sample']!r}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    if not all(math.isfinite(v) for row in losses.values() for v in row.values()):
        raise SystemExit("a token loss is not finite")
    return report


if __name__ == "__main__":
    main()
