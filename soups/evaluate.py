"""Evaluation: batched greedy generation with the KV cache, then per-task scoring.

Scorers (the `scorer` column of a task row):
- `final_number`: the last number of the answer must equal the reference (exact match);
  partial credit `answered` = the answer states "The answer is N".
- `program`: the answer is a Python program, executed in the sandbox (`soups.sandbox`) on
  the row's calls; partial credit `parsed` (it parses and defines the function) and `ran`
  (every call returned), then `accuracy` (every call returned the reference value).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
ANSWER_PHRASE = re.compile(r"answer is\s*(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)
STOP_MARKERS = ("\n### Question", "\n### Answer")


@dataclass
class TaskScores:
    task: str
    n: int
    accuracy: float
    partial: dict[str, float]
    seconds: float
    records: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {f"{self.task}/accuracy": self.accuracy}
        out.update({f"{self.task}/{k}": v for k, v in self.partial.items()})
        return out


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96,
             batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts` in batches (left-padded, KV cache), in input order.
    Prompts are sorted by length first so a batch wastes little on padding."""
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


def final_number(text: str):
    """The stated answer ("The answer is N") or else the last number in `text`."""
    match = ANSWER_PHRASE.search(text)
    raw = match.group(1) if match else (NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    value = float(raw.replace(",", ""))
    return int(value) if value.is_integer() else value


def extract_program(text: str) -> str:
    """The program in an answer: a fenced block when there is one, else the whole answer."""
    fenced = re.search(r"```(?:python)?\n(.*?)```", text, re.DOTALL)
    return fenced.group(1) if fenced else text


def _equal(got, want) -> bool:
    if isinstance(got, bool) or isinstance(want, bool):
        return got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return abs(got - want) <= 1e-6 * max(1.0, abs(want))
    return got == want


def score_final_number(rows: Sequence[dict], answers: Sequence[str]) -> tuple[list[dict], dict]:
    records = []
    for row, answer in zip(rows, answers, strict=True):
        want = json.loads(row["expected"])[0]
        got = final_number(answer)
        records.append({"answer": answer, "predicted": got, "expected": want,
                        "answered": bool(ANSWER_PHRASE.search(answer)),
                        "correct": got is not None and _equal(got, want)})
    return records, {"answered": _mean(r["answered"] for r in records)}


def score_programs(rows: Sequence[dict], answers: Sequence[str], timeout_s: float = 2.0,
                   workers: int = 4) -> tuple[list[dict], dict]:
    from soups.sandbox import run_function

    def run(pair):
        row, answer = pair
        calls = [tuple(c) for c in json.loads(row["calls"])] or [()]
        return run_function(extract_program(answer), function=row["function"] or "solution",
                            calls=calls, timeout_s=timeout_s)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run, zip(rows, answers, strict=True)))
    records = []
    for row, answer, result in zip(rows, answers, results, strict=True):
        want = json.loads(row["expected"])
        correct = (result.ran and len(result.outputs) == len(want)
                   and all(_equal(g, w) for g, w in zip(result.outputs, want, strict=True)))
        records.append({"answer": answer, "parsed": result.parsed, "ran": result.ran,
                        "outputs": list(result.outputs), "expected": want,
                        "error": result.error, "correct": correct})
    partial = {"parsed": _mean(r["parsed"] for r in records),
               "ran": _mean(r["ran"] for r in records)}
    return records, partial


SCORERS = {"final_number": score_final_number, "program": score_programs}


def _mean(values) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else 0.0


def evaluate_rows(model, tokenizer, task: str, rows: Sequence[dict], max_new_tokens: int = 96,
                  batch_size: int = 32) -> TaskScores:
    """Generate answers for `rows` (one task, one scorer) and score them."""
    rows = list(rows)
    scorers = {row["scorer"] for row in rows}
    if len(scorers) > 1:
        raise ValueError(f"task {task}: rows mix scorers {sorted(scorers)}")
    scorer = scorers.pop() if scorers else "final_number"
    if scorer not in SCORERS:
        raise ValueError(f"task {task}: unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
    start = time.perf_counter()
    answers = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    records, partial = SCORERS[scorer](rows, answers)
    return TaskScores(task=task, n=len(rows), accuracy=_mean(r["correct"] for r in records),
                      partial=partial, seconds=time.perf_counter() - start, records=records)


def load_model(model_dir, adapter_dir=None, dtype=torch.float32):
    """Base model (and a PEFT adapter merged into it for fast generation) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer
