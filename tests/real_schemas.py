"""Small datasets in the schemas of the real ones a study names (MetaMathQA, CodeAlpaca,
GSM-Hard, GSM8K, alpaca-cleaned, SQuAD v2, a raw-text manual), written from the embedded
generators so their answers are right. The tests point a study's `source` keys at them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from soups.data.generated.problems import word_problem
from soups.data.generated.programs import code_exercise


def _problems(n: int, seed: int):
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        problem = word_problem(rng, 40, 0.3)
        if problem.text not in seen:
            seen.add(problem.text)
            out.append(problem)
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metamathqa(path: Path, n: int = 60, seed: int = 1, also: list[str] = ()) -> Path:
    """`query`, `response` ending in "The answer is: N", `type`; `also`: extra queries
    (to plant rows of another task)."""
    rows = [{"query": p.text, "response": p.worked_solution().replace(
                "The answer is ", "The answer is: ").rstrip("."),
             "type": "GSM_AnsAug", "original_question": p.text} for p in _problems(n, seed)]
    rows += [{"query": q, "response": "The answer is: 0", "type": "GSM_Rephrased",
              "original_question": q} for q in also]
    return _jsonl(path, rows)


def codealpaca(path: Path, n: int = 60, seed: int = 2) -> Path:
    """One JSON array of `instruction`, `input` (mostly empty), `output`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        exercise = code_exercise(rng, 40, 0.3)
        rows.append({"instruction": exercise.instruction,
                     "input": "" if i % 4 else "Use plain Python.", "output": exercise.program})
    path.write_text(json.dumps(rows))
    return path


def gsm_hard(path: Path, n: int = 40, seed: int = 3) -> Path:
    """`input`, `code` (a `solution()` program), `target` as a float."""
    return _jsonl(path, [{"input": p.text, "code": p.program(), "target": float(p.answer)}
                         for p in _problems(n, seed)])


def gsm_hard_questions(path: Path) -> list[str]:
    return [json.loads(line)["input"] for line in path.read_text().splitlines()]


def gsm8k(path: Path, n: int = 20, seed: int = 4) -> Path:
    """A parquet file of `question`, `answer` ending in `#### N`."""
    import pandas as pd

    problems = _problems(n, seed)
    pd.DataFrame({"question": [p.text for p in problems],
                  "answer": [f"{p.worked_solution()}\n#### {p.answer}" for p in problems]}
                 ).to_parquet(path)
    return path


def alpaca_cleaned(path: Path, n: int = 20) -> Path:
    rows = [{"instruction": f"Name the number after {i}.", "input": "" if i % 2 else "Digits.",
             "output": f"The number after {i} is {i + 1}."} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def squad_v2(path: Path) -> Path:
    """`id`, `title`, `context`, `question`, `answers` ({text, answer_start}; empty lists for
    an unanswerable question)."""
    context = "The pump holds 4 litres. Its filter is changed every 30 days."
    rows = [
        {"id": "q1", "title": "Pump", "context": context, "question": "How much does it hold?",
         "answers": {"text": ["4 litres"], "answer_start": [15]}},
        {"id": "q2", "title": "Pump", "context": context,
         "question": "How often is the filter changed?",
         "answers": {"text": ["every 30 days"], "answer_start": [47]}},
        {"id": "q3", "title": "Pump", "context": context, "question": "Who made it?",
         "answers": {"text": [], "answer_start": []}},
    ]
    return _jsonl(path, rows)


MANUAL = """# The P-4 pump

The P-4 pump holds 4 litres of water. Its filter is changed every 30 days.
To start the pump, press the green button for 2 seconds. The red light means the tank is empty.

## Cleaning

Rinse the filter under warm water. Never use soap on the filter.
"""


def manual(path: Path, copies: int = 20) -> Path:
    path.write_text(MANUAL * copies)
    return path
