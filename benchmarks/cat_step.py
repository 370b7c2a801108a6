"""CAT training step: time and memory against (a) one plain PEFT LoRA of the same total rank
being trained and (b) PEFT with all k adapters active plus a learned softmax scalar per
(module, adapter), the official LoRA Soups code's approach (k separate LoRA passes).

Each model is run with k = 2 and k = 4 random skill LoRAs of rank r on q, k, v, up, down.
All sides run the same batch through the same frozen base (random weights: timing does not
depend on them), AdamW on their trainable tensors. Steps are interleaved across the sides
(one step of each, repeated) so that load from other processes hits every side alike; the
fastest step (least disturbed by other processes) and the median step are reported, the
ratios use the fastest. Memory: on CUDA the peak allocated; everywhere, the bytes saved for
backward (activations, excluding model weights and buffers) plus trainable state
(parameters, gradients, two AdamW moments).

    nice -n 10 .venv/bin/python -m benchmarks.cat_step [--steps 6] [--rank 16]
        [--models tiny,larger] [--ks 2,4]
    .venv/bin/python -m benchmarks.cat_step --models smollm2 --ks 2 --steps 3   # real model
    .venv/bin/python -m benchmarks.cat_step --quick   # seconds: a 2-layer model, k = 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from soups.adapters import LoraModule, save_adapter
from soups.compose.cat import CatModel, CatSettings
from soups.training.base_model import BaseModelSettings
from soups.training.train_settings import PAPER_TARGETS

# name: (hidden, layers, heads, intermediate, batch, length). `tiny` is the embedded base
# model's architecture; `larger` a CPU-sized model (~45M parameters in the blocks).
_E = BaseModelSettings()
MODELS = {
    "tiny": (_E.hidden_size, _E.num_layers, _E.num_heads, _E.intermediate_size, 6, 256),
    "larger": (768, 6, 12, 2048, 4, 128),
    # the real-model tier's base itself (docs/real_model.md), fetched and dequantized once
    "smollm2": (576, 30, 9, 1536, 4, 128),
    "quick": (32, 2, 4, 64, 2, 16),  # seconds: the tests run it
}
REAL = {"smollm2": "smollm2-135m-instruct"}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name in REAL:
        from transformers import AutoModelForCausalLM

        from study.resolve import resolve_base

        return AutoModelForCausalLM.from_pretrained(resolve_base(REAL[name], log=print),
                                                    dtype=dtype).to(device)
    hidden, layers, heads, intermediate, _, length = MODELS[name]
    config = LlamaConfig(vocab_size=_E.vocab_size, hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(length, 256), tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def write_adapters(model, root: Path, k: int, rank: int) -> list[str]:
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        modules = {n: LoraModule(A=torch.randn(rank, m.in_features, generator=g) * 0.02,
                                 B=torch.randn(m.out_features, rank, generator=g) * 0.02,
                                 scaling=2.0)
                   for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PAPER_TARGETS}
        paths.append(str(save_adapter(root / f"skill{i}", modules, {"task_type": "CAUSAL_LM"})))
    return paths


def plain_lora(base, total_rank: int):
    """(a) one PEFT LoRA of rank sum(r_i), A and B trained."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=total_rank, lora_alpha=2 * total_rank, lora_dropout=0.0,
                        target_modules=list(PAPER_TARGETS), task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def peft_k_adapters(base, paths: list[str]):
    """(b) all k adapters active in PEFT (k separate LoRA passes per module), frozen, with a
    trainable logit per (module, adapter) and softmax(logits)[i] scaling adapter i's output."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"skill{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(base, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names, inference_mode=True)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        layer.cat_logits = torch.nn.Parameter(torch.randn(len(names), device=device))

        def mixture(module, args):  # once per module and forward, as the official layer
            module.cat_mixture = torch.softmax(module.cat_logits, 0)

        layer.register_forward_pre_hook(mixture)
        for i, name in enumerate(names):
            layer.lora_B[name].register_forward_hook(
                lambda mod, inp, out, layer=layer, i=i: out * layer.cat_mixture[i].to(out.dtype))
    return model


class Side:
    """One model being trained: its step, and its memory measured once."""

    def __init__(self, label: str, model, batch: dict):
        self.label, self.model, self.batch = label, model, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.times: list[float] = []
        self.model.train()

    def step(self) -> None:
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)

    def memory(self, device: torch.device) -> dict:
        """Saved-for-backward bytes of one forward (excluding weights and buffers) and
        trainable state; on CUDA also the peak allocated during one step."""
        owned = {t.untyped_storage().data_ptr() for t in
                 [*self.model.parameters(), *self.model.buffers()]}
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in owned:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in self.params)
        out = {"saved_mb": sum(saved.values()) / 2**20, "trainable": trainable,
               "state_mb": 4 * trainable * self.params[0].element_size() / 2**20}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            self.step()
            torch.cuda.synchronize()
            out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return out


def run_model(name: str, ks: list[int], rank: int, steps: int, device: torch.device,
              dtype: torch.dtype) -> list[dict]:
    _, _, _, _, batch_size, length = MODELS[name]
    template = build_model(name, device, dtype)
    ids = torch.randint(3, _E.vocab_size, (batch_size, length),
                        generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(template, Path(tmp), max(ks), rank)
        for k in ks:
            sides = [
                Side("CAT (concatenated)", CatModel.attach(
                    copy.deepcopy(template), paths[:k], CatSettings()), batch),
                Side(f"(a) one LoRA r={k * rank}", plain_lora(copy.deepcopy(template), k * rank),
                     batch),
                Side("(b) PEFT k adapters + scalars", peft_k_adapters(copy.deepcopy(template),
                                                                      paths[:k]), batch),
            ]
            memory = [side.memory(device) for side in sides]
            for _ in range(2):  # warm-up
                for side in sides:
                    side.step()
            for _ in range(steps):
                for side in sides:
                    side.timed_step(device)
            for side, mem in zip(sides, memory, strict=True):
                rows.append({"model": name, "k": k, "side": side.label,
                             "ms": 1000 * min(side.times),
                             "median_ms": 1000 * statistics.median(side.times), **mem})
            del sides
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--rank", type=int, default=16, help="rank of each skill LoRA")
    parser.add_argument("--models", default="tiny,larger")
    parser.add_argument("--ks", default="2,4")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="seconds: the `quick` model, k = 2, rank 4, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.ks, args.rank, args.steps = "quick", "2", 4, 2
    results = []
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ks = [int(k) for k in args.ks.split(",")]
    print(f"device {device} ({dtype}), {torch.get_num_threads()} threads, rank {args.rank} "
          f"per LoRA, {args.steps} interleaved timed steps per side")
    for name in args.models.split(","):
        hidden, layers, _, intermediate, batch_size, length = MODELS[name]
        print(f"\n{name}: hidden {hidden}, {layers} layers, intermediate {intermediate}, "
              f"batch {batch_size} x {length} tokens")
        rows = run_model(name, ks, args.rank, args.steps, device, dtype)
        results += rows
        peak = "  peak MB" if device.type == "cuda" else ""
        print(f"{'k':>2} {'side':<30} {'best ms':>8} {'median':>8} {'vs (a)':>7} {'vs (b)':>7} "
              f"{'trainable':>10} {'saved MB':>9} {'state MB':>9}{peak}")
        for k in ks:
            group = [r for r in rows if r["k"] == k]
            a_ms, b_ms = group[1]["ms"], group[2]["ms"]
            for r in group:
                extra = f" {r['peak_mb']:8.1f}" if "peak_mb" in r else ""
                print(f"{k:>2} {r['side']:<30} {r['ms']:8.1f} {r['median_ms']:8.1f} "
                      f"{r['ms'] / a_ms:6.2f}x "
                      f"{r['ms'] / b_ms:6.2f}x {r['trainable']:>10,} {r['saved_mb']:9.1f} "
                      f"{r['state_mb']:9.2f}{extra}")
    return results


if __name__ == "__main__":
    main()
