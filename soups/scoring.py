"""Scoring answers against references: pure functions, no model (evaluation generates, this
scores). Scorers (the `scorer` column of a task row):
- `final_number`: the last number of the answer must equal the reference (exact match);
  partial credit `answered` = the answer states "The answer is N".
- `program`: the answer is a Python program, executed in the sandbox (`soups.sandbox`) on
  the row's calls; partial credit `parsed` (it parses and defines the function) and `ran`
  (every call returned), then `accuracy` (every call returned the reference value).
Comparison is total: huge integers, inf, NaN, strings or nested values never raise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction

from soups.sandbox import BWRAP, ProgramJob, run_many

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
ANSWER_PHRASE = re.compile(r"answer is\s*(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)
RELATIVE_TOLERANCE = Fraction(1, 10**6)  # floats equal within 1e-6 of max(1, |reference|)
MAX_COMPARE_DEPTH = 32


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


def _numbers_equal(got: int | float, want: int | float) -> bool:
    if isinstance(got, int) and isinstance(want, int):
        return got == want
    if not (math.isfinite(got) and math.isfinite(want)):
        return got == want  # inf equals the same inf; NaN equals nothing
    # Fractions are exact for any int and float: no overflow, no rounding of huge ints.
    got, want = Fraction(got), Fraction(want)
    return abs(got - want) <= RELATIVE_TOLERANCE * max(1, abs(want))


def values_equal(got, want, depth: int = 0) -> bool:
    """`got` (a program's output, hostile) equals the reference `want`. Never raises."""
    if depth > MAX_COMPARE_DEPTH:
        return False
    try:
        if isinstance(got, bool) or isinstance(want, bool):
            return type(got) is type(want) and got == want
        if isinstance(got, (int, float)) and isinstance(want, (int, float)):
            return _numbers_equal(got, want)
        if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
            return len(got) == len(want) and all(
                values_equal(g, w, depth + 1) for g, w in zip(got, want, strict=True))
        if isinstance(got, dict) and isinstance(want, dict):
            return got.keys() == want.keys() and all(
                values_equal(got[k], want[k], depth + 1) for k in want)
        return type(got) is type(want) and got == want
    except Exception:  # a value no comparison can make sense of is not the reference
        return False


def mean(values) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else 0.0


def score_final_number(rows: Sequence[dict], answers: Sequence[str], sandbox: str = BWRAP
                       ) -> tuple[list[dict], dict]:
    """Stated numbers against the references (nothing is executed: `sandbox` is unused)."""
    records = []
    for row, answer in zip(rows, answers, strict=True):
        want = json.loads(row["expected"])[0]
        got = final_number(answer)
        records.append({"answer": answer, "predicted": got, "expected": want,
                        "answered": bool(ANSWER_PHRASE.search(answer)),
                        "correct": got is not None and values_equal(got, want)})
    return records, {"answered": mean(r["answered"] for r in records)}


def score_programs(rows: Sequence[dict], answers: Sequence[str], sandbox: str = BWRAP,
                   timeout_s: float = 2.0, workers: int = 4) -> tuple[list[dict], dict]:
    """Each answer's program run on its row's calls in `sandbox`; one record per row,
    whatever the programs do."""
    jobs = [ProgramJob(extract_program(answer), row["function"] or "solution",
                       tuple(tuple(c) for c in json.loads(row["calls"])) or ((),))
            for row, answer in zip(rows, answers, strict=True)]
    results = run_many(jobs, timeout_s=timeout_s, sandbox=sandbox, workers=workers)
    records = []
    for answer, row, result in zip(answers, rows, results, strict=True):
        want = json.loads(row["expected"])
        correct = (result.ran and len(result.outputs) == len(want)
                   and all(values_equal(g, w) for g, w in zip(result.outputs, want,
                                                              strict=True)))
        records.append({"answer": answer, "parsed": result.parsed, "ran": result.ran,
                        "outputs": list(result.outputs), "expected": want,
                        "error": result.error, "correct": correct})
    partial = {"parsed": mean(r["parsed"] for r in records),
               "ran": mean(r["ran"] for r in records)}
    return records, partial


SCORERS = {"final_number": score_final_number, "program": score_programs}
