"""Evaluation: batched greedy generation with the KV cache, then per-task scoring
(`soups.scoring`: stated numbers, or programs executed in the sandbox)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from soups.lazy import lazy
from soups.names import ACCURACY, task_metric
from soups.sandbox import BWRAP
from soups.scoring import SCORERS, mean

torch = lazy("torch")  # imported on first use: the study spec reads the defaults below

STOP_MARKERS = ("\n### Question", "\n### Answer")
MAX_NEW_TOKENS = 96  # generation length per answer (the study's `evaluation` default)
BATCH_SIZE = 32  # prompts per generation batch


@dataclass
class TaskScores:
    task: str
    n: int
    accuracy: float
    partial: dict[str, float]
    seconds: float
    records: list[dict] = field(default_factory=list)

    def metrics(self, split: str | None = None) -> dict[str, float]:
        """Accuracy and partial scores by name: `task_metric(split, task, metric)` keys
        (`validation/math/accuracy`), or `<task>/<metric>` without a split."""
        scores = {ACCURACY: self.accuracy, **self.partial}
        return {task_metric(split, self.task, k) if split else f"{self.task}/{k}": v
                for k, v in scores.items()}


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = BATCH_SIZE) -> list[str]:
    """Greedy completions of `prompts` in batches (left-padded, KV cache), in input order.
    Prompts are sorted by length first so a batch wastes little on padding. (`generate`
    of transformers runs without autograd.)"""
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for r, i in enumerate(rows):
            text = tokenizer.decode(generated[r, width:], skip_special_tokens=True)
            outputs[i] = _cut(text)
    return outputs


def _cut(text: str) -> str:
    """Drop anything after the answer (a model that keeps writing a next question)."""
    for marker in STOP_MARKERS:
        text = text.split(marker)[0]
    return text.strip()


def evaluate_rows(model, tokenizer, task: str, rows: Sequence[dict],
                  max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE,
                  sandbox: str = BWRAP) -> TaskScores:
    """Generate answers for `rows` (one task, one scorer) and score them (programs run in
    `sandbox`, `soups.sandbox.SANDBOXES`)."""
    rows = list(rows)
    scorers = {row["scorer"] for row in rows}
    if len(scorers) > 1:
        raise ValueError(f"task {task}: rows mix scorers {sorted(scorers)}")
    scorer = scorers.pop() if scorers else "final_number"
    if scorer not in SCORERS:
        raise ValueError(f"task {task}: unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
    start = time.perf_counter()
    answers = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    records, partial = SCORERS[scorer](rows, answers, sandbox)
    return TaskScores(task=task, n=len(rows), accuracy=mean(r["correct"] for r in records),
                      partial=partial, seconds=time.perf_counter() - start, records=records)


def load_model(model_dir, adapter_dir=None, dtype=None):
    """Base model (and a PEFT adapter merged into it for fast generation) and tokenizer;
    `dtype` default float32. ModelError / AdapterError name a folder that is not a model, or
    not an adapter of it."""
    from soups.adapters import check_fits
    from soups.base_model import load_pretrained

    tokenizer, model = load_pretrained(model_dir, dtype or torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        check_fits(adapter_dir, model)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer
