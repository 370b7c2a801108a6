"""Candidates per minute: LoRA candidates evaluated on a resident base model, one at a time
and side by side (soups.evaluation.resident), against today's per-candidate path.

Modes, each in its own fresh process so that peak memory (max RSS) is that mode's alone:
- merged: today's trial path, per candidate: `load_model` with the adapter merged, evaluate,
  drop the model;
- resident: `ResidentModel` loaded once, one candidate installed at a time (`candidates`);
- side4, side8: the resident model, 4 or 8 candidates per `evaluate_side_by_side` pass
  (mixed batches of batch_size * k prompts).

Every mode evaluates the same candidates (random rank-8 LoRAs on q, k, v, up and down) on
the same N prompts (greedy, final_number scorer). The answers of resident, side4 and side8
must be identical (asserted); merged is reported (it differs from unmerged LoRA by
rounding, so a near tie can flip a token).

Columns: `load s` the base model load (merged: the first candidate's load + merge),
`first s` seconds until the first candidate's scores exist, `total s` every candidate,
`cand/min` candidates per minute over the total, `eval cand/min` the same without the one
load (what a study's long-lived evaluator gets), `peak MB` the process's max RSS (and GPU
peak allocated on CUDA).

The default model is a random Llama with real module shapes (hidden 768, 12 layers, 12
heads, intermediate 2048, vocabulary 32000, untied head: 134M parameters) built in a temp
folder. Its tokenizer (soups.training.tokenizer.train_tokenizer) has fewer tokens than 32000: the
embedding and head keep 32000 rows, so the compute is the real one, and the head rows past
the tokenizer are zero, so their logit 0 never wins a greedy argmax against the random
logits of the real tokens (nothing undecodable is generated). `--embedded` uses the
project's embedded model instead (built first if it is not cached: minutes); `--model DIR`
any Llama-style model folder.

    python -m benchmarks.eval_candidates [--model DIR | --embedded] [--n 16]
        [--max-new-tokens 32] [--batch-size 16] [--candidates 8] [--modes merged,...]
    python -m benchmarks.eval_candidates --quick   # seconds: a 2-layer random model
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"merged": 1, "resident": 1, "side4": 4, "side8": 8}  # mode -> candidates per pass
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj",
           "mlp.down_proj")
RANK = 8
REAL_SHAPES = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000}
QUICK_SHAPES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 2048}
NAMES = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Raj"]


# Inputs (built by the parent process) ----------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """Question/answer texts for the benchmark tokenizer (its vocabulary, nothing else)."""
    return [f"### Question:\n{name} has {a} apples and buys {b} more. How many apples?\n"
            f"### Answer:\n{name} has {a} + {b} = {a + b} apples. The answer is {a + b}.\n"
            for name in NAMES for a in range(3, 60, 7) for b in range(2, 40, 9)]


def build_random_llama(out_dir: Path, shapes: dict = REAL_SHAPES) -> str:
    """A random Llama with REAL_SHAPES (see the module docstring) and a small tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soups.training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=2048, max_number=499)
    config = LlamaConfig(**shapes, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # tokens the tokenizer lacks: logit 0, below the real maximum
        model.lm_head.weight[len(tokenizer):] = 0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def write_adapters(model_dir: str, root: Path, count: int) -> list[str]:
    """`count` random rank-8 LoRAs on TARGETS of every layer of the model."""
    import torch
    from transformers import AutoConfig

    from soups.adapters import LoraModule, save_adapter

    config = AutoConfig.from_pretrained(model_dir)
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {"self_attn.q_proj": (hidden, hidden), "mlp.up_proj": (inner, hidden),
              "mlp.down_proj": (hidden, inner)}
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes |= {"self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden)}
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(100 + i)
        modules = {
            f"model.layers.{layer}.{name}": LoraModule(
                A=torch.randn(RANK, shapes[name][1], generator=generator)
                / math.sqrt(shapes[name][1]),
                B=torch.randn(shapes[name][0], RANK, generator=generator) * 0.05,
                scaling=2.0)
            for layer in range(config.num_hidden_layers) for name in TARGETS}
        paths.append(str(save_adapter(root / f"candidate{i}", modules,
                                      {"base_model_name_or_path": model_dir})))
    return paths


def benchmark_prompts(n: int) -> list[str]:
    return [f"### Question:\n{NAMES[i % len(NAMES)]} has {3 + 5 * i} apples and buys "
            f"{1 + (7 * i) % 20} more. " + "How many apples are there now? " * (i % 3)
            + "\n### Answer:\n" for i in range(n)]


# One mode (in a child process) ----------------------------------------------------------


def _rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p, "scorer": "final_number", "expected": "[0]"} for p in prompts]


def run_mode(mode: str, spec: dict) -> dict:
    """Time `mode` on the spec's model, candidates and prompts; answers per candidate."""
    from soups.evaluation.evaluate import GenerationSettings, evaluate_rows, load_model
    from soups.evaluation.resident import ResidentModel, evaluate_side_by_side

    settings = GenerationSettings(max_new_tokens=spec["max_new_tokens"],
                                  batch_size=spec["batch_size"])
    prompts, adapters = spec["prompts"], spec["adapters"]
    rows, k = _rows(prompts), MODES[mode]
    start, answers, first, load = time.perf_counter(), [], None, None
    if mode == "merged":
        for adapter in adapters:
            model, tokenizer = load_model(spec["model"], adapter, spec["device"], spec["dtype"])
            load = load if load is not None else time.perf_counter() - start
            scores = evaluate_rows(model, tokenizer, "bench", rows, generation=settings)
            answers.append([record["output"] for record in scores.records])
            first = first if first is not None else time.perf_counter() - start
            del model
    else:
        resident = ResidentModel(spec["model"], spec["device"], spec["dtype"])
        load = resident.load_seconds
        for group in range(0, len(adapters), k):
            side = evaluate_side_by_side(resident, adapters[group : group + k], "bench", rows,
                                         generation=settings)
            answers += [[record["output"] for record in scores.records] for scores in side]
            first = first if first is not None else time.perf_counter() - start
    total = time.perf_counter() - start
    return {"mode": mode, "load_s": load, "first_s": first, "total_s": total,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gpu_peak_mb": _gpu_peak_mb(), "answers": answers}


def _gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_child(mode: str, spec_file: Path) -> dict:
    """`run_mode` in a fresh `python -m benchmarks.eval_candidates --mode` process."""
    out = spec_file.with_name(f"result-{mode}.json")
    done = subprocess.run([sys.executable, "-m", "benchmarks.eval_candidates", "--mode", mode,
                           "--spec", str(spec_file), "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise SystemExit(f"mode {mode} failed (exit status {done.returncode})")
    return json.loads(out.read_text())


# Report ---------------------------------------------------------------------------------


def print_table(results: list[dict], count: int) -> None:
    print(f"{'mode':<10}{'load s':>8}{'first s':>9}{'total s':>9}{'cand/min':>10}"
          f"{'eval cand/min':>15}{'peak MB':>9}{'GPU MB':>8}")
    for r in results:
        gpu = f"{r['gpu_peak_mb']:8.0f}" if r["gpu_peak_mb"] is not None else f"{'-':>8}"
        eval_s = r["total_s"] - (r["load_s"] if r["mode"] != "merged" else 0)
        print(f"{r['mode']:<10}{r['load_s']:8.2f}{r['first_s']:9.2f}{r['total_s']:9.2f}"
              f"{60 * count / r['total_s']:10.1f}{60 * count / eval_s:15.1f}"
              f"{r['peak_mb']:9.0f}{gpu}")


def check_answers(results: list[dict]) -> None:
    """Resident modes must agree exactly; merged is reported, not asserted."""
    by_mode = {r["mode"]: r["answers"] for r in results}
    resident = [m for m in ("resident", "side4", "side8") if m in by_mode]
    for mode in resident[1:]:
        assert by_mode[mode] == by_mode[resident[0]], f"{mode} answers differ from "\
                                                       f"{resident[0]}"
    if resident:
        print(f"identical answers: {', '.join(resident)}")
        distinct = len({json.dumps(a) for a in by_mode[resident[0]]})
        print(f"distinct answer sets among the candidates: {distinct}")
    if "merged" in by_mode and resident:
        same, total = agreement(by_mode["merged"], by_mode[resident[0]])
        print(f"merged vs unmerged: {same}/{total} answers identical")


def agreement(answers: list[list[str]], others: list[list[str]]) -> tuple[int, int]:
    """(identical answers, answers) of two modes, candidate by candidate, row by row."""
    pairs = [(a, b) for ma, mb in zip(answers, others, strict=True)
             for a, b in zip(ma, mb, strict=True)]
    return sum(a == b for a, b in pairs), len(pairs)


def _model_dir(args, work: Path) -> str:
    if args.model:  # a folder, a hub id, a .gguf file or smollm2-135m-instruct
        from study.resolve import resolve_base

        return resolve_base(args.model, log=print)
    if args.embedded:
        from soups.home import cache_dir
        from soups.training.base_model import BaseModelSettings, build_base_model

        return str(build_base_model(cache_dir("base_models"), BaseModelSettings()))
    return build_random_llama(work / "model", QUICK_SHAPES if args.quick else REAL_SHAPES)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder, a .gguf file or "
                        "smollm2-135m-instruct (default: random 134M)")
    parser.add_argument("--embedded", action="store_true", help="the embedded base model")
    parser.add_argument("--n", type=int, default=16, help="prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="seconds: a 2-layer random "
                        "model, 4 candidates, 4 prompts, 4 tokens, merged/resident/side4")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        result = run_mode(args.mode, json.loads(args.spec.read_text()))
        args.out.write_text(json.dumps(result))
        return [result]
    if args.quick:
        args.n, args.max_new_tokens, args.batch_size, args.candidates = 4, 4, 4, 4
        args.modes = "merged,resident,side4"

    with tempfile.TemporaryDirectory(prefix="eval_candidates_") as tmp:
        work = Path(tmp)
        model_dir = _model_dir(args, work)
        spec = {"model": model_dir, "adapters": write_adapters(model_dir, work / "adapters",
                                                               args.candidates),
                "prompts": benchmark_prompts(args.n), "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype}
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        results = [run_child(mode, spec_file) for mode in args.modes.split(",")]
    print(f"model {model_dir}; {args.candidates} candidates (rank {RANK}), {args.n} prompts, "
          f"{args.max_new_tokens} new tokens max, batch {args.batch_size} (x k side by side)")
    print_table(results, args.candidates)
    check_answers(results)
    return results


if __name__ == "__main__":
    main()
