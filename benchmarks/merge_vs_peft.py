"""Our merge engine against PEFT `add_weighted_adapter`, side by side in one run.

Adapters have Llama-2-7B module shapes (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096;
down: 4096 x 11008), r = 16, random factors, two and four adapters. Every (side, method, k)
runs in its own fresh process, so peak memory (max RSS) is that case's alone:

- ours: `merge_adapters` from adapter folders to a written adapter folder (no base model);
- PEFT: a Llama base built on CPU with the same module shapes (PEFT needs it), the adapters
  attached, `add_weighted_adapter`; its time is the merge call alone (model building and
  adapter loading excluded, which favours PEFT), its memory the whole process.

The error column is max over modules of ||dW_ours - dW_peft||_F / ||dW_peft||_F on the
products s B A (DARE draws random masks differently in each library: not comparable).
A 7B-shaped PEFT base does not fit this 24 GB machine in float32 with 32 layers and PEFT's
dense SVDs take over a minute per layer on 2 cores, so the layer counts are options
(--layers for factor-space methods, --svd-layers for the svd family).

    python -m benchmarks.merge_vs_peft [--layers 4] [--svd-layers 1] [--out results.json]
    python -m benchmarks.merge_vs_peft --quick    # seconds: small modules, two methods
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, RANK = 4096, 11008, 16  # Llama-2-7B
QUICK = {"hidden": 64, "intermediate": 128, "layers": 1, "svd_layers": 1, "adapters": [2],
         "methods": ["ties", "svd"]}


def shapes(hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> dict:
    """Module -> (out_features, in_features), as in a Llama layer."""
    return {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
FACTOR_METHODS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat"]
SVD_METHODS = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
DENSITY = 0.5
BASE_NAME = "llama-2-7b-shaped"


def write_adapters(root: Path, layers: int, count: int, hidden: int = HIDDEN,
                   intermediate: int = INTERMEDIATE) -> list[str]:
    from soups.adapters import LoraModule, save_adapter

    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        modules = {
            f"model.layers.{layer}.{name}": LoraModule(
                A=torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f),
                B=torch.randn(out_f, RANK, generator=g) * 0.01, scaling=2.0)
            for layer in range(layers)
            for name, (out_f, in_f) in shapes(hidden, intermediate).items()}
        paths.append(str(save_adapter(root / f"adapter{i}", modules,
                                      {"base_model_name_or_path": BASE_NAME})))
    return paths


def _params(method: str) -> dict:
    return {"density": DENSITY} if any(t in method for t in ("ties", "dare", "prune")) else {}


def _weights(count: int) -> list[float]:
    """The same explicit weights on both sides (the methods' defaults differ: cat sums)."""
    return [1.0 / count] * count


def _ours(adapters: list[str], method: str, out: str) -> float:
    from soups.compose.merge import merge_adapters

    start = time.perf_counter()
    merge_adapters(adapters, method, out, weights=_weights(len(adapters)), **_params(method))
    return time.perf_counter() - start


def _peft(adapters: list[str], method: str, out: str, layers: int, hidden: int = HIDDEN,
          intermediate: int = INTERMEDIATE) -> float:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         vocab_size=256)
    base = LlamaForCausalLM(config)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="in0")
    names = ["in0"]
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"in{i}")
        names.append(f"in{i}")
    start = time.perf_counter()
    model.add_weighted_adapter(names, _weights(len(adapters)), "merged", combination_type=method,
                               **_params(method))
    seconds = time.perf_counter() - start
    model.save_pretrained(out, selected_adapters=["merged"])
    return seconds


def _case(side: str, adapters: list[str], method: str, out: str, layers: int, size: tuple,
          queue) -> None:
    # Warm up torch's thread pool and allocator on both sides before timing.
    torch.linalg.qr(torch.randn(512, 512) @ torch.randn(512, 512))
    seconds = _ours(adapters, method, out) if side == "ours" else _peft(adapters, method, out,
                                                                         layers, *size)
    queue.put((seconds, peak_rss_mb()))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would carry the parent's peak over into a spawned child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(side: str, adapters: list[str], method: str, out: str, layers: int,
             size: tuple = (HIDDEN, INTERMEDIATE)):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_case, args=(side, adapters, method, out, layers, size,
                                                  queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def max_relative_error(ours: str, peft: str) -> float:
    from soups.adapters import LoraAdapter

    mine = LoraAdapter.open(ours)
    theirs = LoraAdapter.open(Path(peft) / "merged" if (Path(peft) / "merged").is_dir() else peft)
    worst = 0.0
    for name in mine.module_names:
        expected = theirs.module(name).delta().double()
        error = (mine.module(name).delta().double() - expected).norm() / expected.norm()
        worst = max(worst, float(error))
    return worst


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--svd-layers", type=int, default=1)
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=FACTOR_METHODS + SVD_METHODS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--quick", action="store_true", help="seconds: 64-wide modules, one "
                        "layer, two adapters, ties and svd (the tests run it)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    size = (args.hidden, args.intermediate)
    rows = []
    print(f"{'method':<20}{'k':>3}{'layers':>7}{'ours s':>9}{'peft s':>9}{'speedup':>9}"
          f"{'ours MB':>9}{'peft MB':>9}{'mem ratio':>10}{'rel err':>10}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.adapters:
            for method in args.methods:
                layers = args.svd_layers if "svd" in method else args.layers
                root = Path(tmp) / f"k{k}_l{layers}"
                if not root.exists():
                    write_adapters(root, layers, k, *size)
                adapters = sorted(str(p) for p in root.glob("adapter*"))
                ours_dir, peft_dir = Path(tmp) / "ours", Path(tmp) / "peft"
                ours_s, ours_mb = run_case("ours", adapters, method, str(ours_dir), layers,
                                           size)
                peft_s, peft_mb = run_case("peft", adapters, method, str(peft_dir), layers,
                                           size)
                error = (float("nan") if "dare" in method
                         else max_relative_error(str(ours_dir), str(peft_dir)))
                row = dict(method=method, adapters=k, layers=layers, ours_s=ours_s,
                           peft_s=peft_s, speedup=peft_s / ours_s, ours_mb=ours_mb,
                           peft_mb=peft_mb, memory_ratio=peft_mb / ours_mb,
                           max_relative_error=error)
                rows.append(row)
                print(f"{method:<20}{k:>3}{layers:>7}{ours_s:>9.2f}{peft_s:>9.2f}"
                      f"{row['speedup']:>8.1f}x{ours_mb:>9.0f}{peft_mb:>9.0f}"
                      f"{row['memory_ratio']:>9.1f}x{error:>10.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
