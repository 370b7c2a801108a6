"""Scoring answers against references: pure functions, no model (evaluation generates, this
scores). A task's scorer is a `ScorerSettings`: its `kind` (a key of `SCORERS`) and the
settings that kind reads. Kinds:
- `number`: a number extracted from the answer (`extract`: `answer_is` "The answer is N" or
  "The answer is: N", the first such phrase, where a model usually stops; `hashes` GSM8K's
  "#### N", the first; `last` the last number of the text; `auto` answer_is, else hashes,
  else last; `regex` the first match of `pattern`'s one group) must equal the reference
  within the tolerance; partial credit `parsed` = a number was found at all, `answered` = it
  was found by a stated form (answer_is / hashes / regex; `last` for extract `last`), not by
  the last-number fallback.
- `final_number`: the alias of `number` with extract `auto` (the study's default).
- `program`: the answer is a Python program (its first fenced block, else the longest
  run of its lines that parses and defines the entry function), cut out of the answer and
  executed inside the sandbox (`soups.evaluation.sandbox`: the evaluator never parses the answer) on
  the row's calls; partial credit `parsed` (it parses and defines the function) and `ran`
  (every call returned), then `accuracy` (every call returned the reference value within
  the tolerance).
- `exact_match`: the whole answer equals the reference text, whitespace collapsed and,
  unless `case_sensitive`, casefolded; `parsed` = the answer is not empty.

Every generating scorer reports `parsed` (PARSED: the answer gave the scorer something to
judge), so a score of 0 reads apart from "never produced an answer" in every table.
- `loss`: nothing is generated or scored here: the evaluation reports the completions' mean
  loss and perplexity (`soups.evaluation.evaluate.completion_loss`) instead of an accuracy.

Numbers: "1,234", "-3", "2.5" and "16." (a trailing period) are read; integers stay exact
ints, decimals are floats. Two integers are equal only when equal. An integer reference is
met by a float only within `abs_tol` (when set), else exactly: `16.0` meets 16, `123456700.0`
does not meet 123456789 (a relative tolerance would let it). Otherwise `got` equals `want`
when |got - want| <= abs_tol (when set) or <= rel_tol * max(1, |want|) (when set), exactly
when both are None, computed on the floats' exact binary values. Comparison is total: huge
integers, inf, NaN, strings or nested values never raise.

A scorer takes (rows, answers, settings, sandbox) and returns (records, partial scores):
one JSON-able record per row with at least `prompt`, `output` (the model's text),
`extracted` (the number, program or normalised text scored), `reference` and `correct`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

from soups.errors import SoupsError
from soups.evaluation.sandbox import BWRAP, ProgramJob, run_many
from soups.evaluation.sandbox.harness import program_span
from soups.names import PARSED

NUMBER_TEXT = r"-?\d+(?:,\d{3})*(?:\.\d+)?"  # "1,234", "-3", "2.5"; not the period of "16."
NUMBER = re.compile(NUMBER_TEXT)
ANSWER_PHRASE = re.compile(rf"answer is\s*:?\s*\$?\s*({NUMBER_TEXT})", re.IGNORECASE)
HASHES = re.compile(rf"####\s*\$?\s*({NUMBER_TEXT})")
EXTRACT_MODES = ("auto", "answer_is", "hashes", "last", "regex")
RELATIVE_TOLERANCE = 1e-6  # the default: floats equal within 1e-6 of max(1, |reference|)
MAX_COMPARE_DEPTH = 32


class ScorerError(SoupsError):
    """A scorer setting or a reference that cannot be scored (the message names it)."""


@dataclass(frozen=True)
class ScorerSettings:
    kind: str = "final_number"  # a key of SCORERS
    extract: str = "auto"  # number: one of EXTRACT_MODES
    pattern: str | None = None  # number, extract regex: a regular expression with one group
    abs_tol: float | None = None  # number, program: |got - want| <= abs_tol is equal
    rel_tol: float | None = RELATIVE_TOLERANCE  # ... or <= rel_tol * max(1, |want|)
    entry: str = "solution"  # program: the function called, where the row names none
    case_sensitive: bool = False  # exact_match
    timeout_s: float = 2.0  # program: seconds per program in the sandbox

    def __post_init__(self):
        if self.kind not in SCORERS:
            raise ScorerError(f"unknown scorer {self.kind!r}; scorers: {sorted(SCORERS)}")
        if self.extract not in EXTRACT_MODES:
            raise ScorerError(f"unknown extract mode {self.extract!r}; modes: "
                              f"{', '.join(EXTRACT_MODES)}")
        if self.kind == "final_number" and self.extract != "auto":
            raise ScorerError(f"scorer final_number always extracts 'auto', not "
                              f"{self.extract!r}: use kind 'number' with extract "
                              f"{self.extract!r}")
        if self.extract == "regex":
            _check_pattern(self.pattern)
        for name in ("abs_tol", "rel_tol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ScorerError(f"{name} must be a number >= 0 or None, not {value!r}")
        if not self.entry.isidentifier():
            raise ScorerError(f"entry must be a Python function name, not {self.entry!r}")
        if not self.timeout_s > 0:
            raise ScorerError(f"timeout_s must be > 0, not {self.timeout_s!r}")

    def params(self, prefix: str = "") -> dict:
        """The settings as a flat dict (MLflow run parameters), keys `prefix + name`."""
        return {prefix + k: v for k, v in asdict(self).items()}


def _check_pattern(pattern: str | None) -> None:
    if pattern is None:
        raise ScorerError("extract 'regex' needs a pattern (a regular expression with one "
                          "group around the number)")
    try:
        groups = re.compile(pattern).groups
    except re.error as err:
        raise ScorerError(f"pattern {pattern!r} is not a regular expression: {err}") from None
    if groups != 1:
        raise ScorerError(f"pattern {pattern!r} must have exactly one group, not {groups}")


# Numbers --------------------------------------------------------------------------------


def parse_number(raw: str) -> int | float:
    """A number as written ("1,234", "-3", "2.5"): an exact int without a decimal point."""
    raw = raw.replace(",", "").strip()
    return float(raw) if "." in raw or "e" in raw.lower() else int(raw)


def extract_number(text: str, extract: str = "auto", pattern: str | None = None
                   ) -> tuple[int | float | None, str | None]:
    """(the number `text` states, the mode that found it), or (None, None)."""
    modes = ("answer_is", "hashes", "last") if extract == "auto" else (extract,)
    for mode in modes:
        raw = _find_number(text, mode, pattern)
        if raw is not None:
            try:
                return parse_number(raw), mode
            except ValueError:  # a regex group that is not a number
                return None, None
    return None, None


def _find_number(text: str, mode: str, pattern: str | None) -> str | None:
    if mode == "answer_is":
        match = ANSWER_PHRASE.search(text)
    elif mode == "hashes":
        match = HASHES.search(text)
    elif mode == "regex":
        match = re.search(pattern, text)
    else:
        found = NUMBER.findall(text)
        return found[-1] if found else None
    return match.group(1) if match else None


def final_number(text: str):
    """The number `text` states (extract `auto`), or None."""
    return extract_number(text)[0]


def _reference_number(want, row: dict) -> int | float:
    """A row's numeric reference: a JSON number, or text parsed as an answer ("#### 18")."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return want
    value = extract_number(want)[0] if isinstance(want, str) else None
    if value is None:
        raise ScorerError(f"row {row.get('key', '?')!r}: reference {want!r} is not a number")
    return value


def _numbers_equal(got: int | float, want: int | float, abs_tol: float | None,
                   rel_tol: float | None) -> bool:
    if isinstance(got, int) and isinstance(want, int):
        return got == want
    if not (math.isfinite(got) and math.isfinite(want)):
        return got == want  # inf equals the same inf; NaN equals nothing
    # Fractions are exact for any int and float: no overflow, no rounding of huge ints.
    diff = abs(Fraction(got) - Fraction(want))
    if isinstance(want, int):  # a count is met by a float only within abs_tol, else exactly
        return diff <= Fraction(abs_tol) if abs_tol is not None else diff == 0
    if abs_tol is None and rel_tol is None:
        return diff == 0
    return ((abs_tol is not None and diff <= Fraction(abs_tol))
            or (rel_tol is not None and diff <= Fraction(rel_tol) * max(1, abs(Fraction(want)))))


def values_equal(got, want, depth: int = 0, abs_tol: float | None = None,
                 rel_tol: float | None = RELATIVE_TOLERANCE) -> bool:
    """`got` (a program's output, hostile) equals the reference `want`, numbers within the
    tolerance. Never raises."""
    if depth > MAX_COMPARE_DEPTH:
        return False
    try:
        if isinstance(got, bool) or isinstance(want, bool):
            return type(got) is type(want) and got == want
        if isinstance(got, (int, float)) and isinstance(want, (int, float)):
            return _numbers_equal(got, want, abs_tol, rel_tol)
        if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
            return len(got) == len(want) and all(
                values_equal(g, w, depth + 1, abs_tol, rel_tol)
                for g, w in zip(got, want, strict=True))
        if isinstance(got, dict) and isinstance(want, dict):
            return got.keys() == want.keys() and all(
                values_equal(got[k], want[k], depth + 1, abs_tol, rel_tol) for k in want)
        return type(got) is type(want) and got == want
    except Exception:  # a value no comparison can make sense of is not the reference
        return False


def mean(values) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else 0.0


def _base_record(row: dict, answer: str, extracted, reference, correct: bool) -> dict:
    return {"prompt": row.get("prompt", ""), "output": answer, "extracted": extracted,
            "reference": reference, "correct": bool(correct)}


def score_numbers(rows: Sequence[dict], answers: Sequence[str],
                  settings: ScorerSettings | None = None, sandbox: str = BWRAP
                  ) -> tuple[list[dict], dict]:
    """Stated numbers against the references (nothing is executed: `sandbox` is unused)."""
    settings = settings or ScorerSettings(kind="number")
    stated = {"answer_is", "hashes", "regex", "last" if settings.extract == "last" else ""}
    records = []
    for row, answer in zip(rows, answers, strict=True):
        want = _reference_number(json.loads(row["expected"])[0], row)
        got, mode = extract_number(answer, settings.extract, settings.pattern)
        correct = got is not None and values_equal(got, want, abs_tol=settings.abs_tol,
                                                   rel_tol=settings.rel_tol)
        records.append({**_base_record(row, answer, got, want, correct), "found_by": mode,
                        "answered": mode in stated, PARSED: got is not None})
    return records, {PARSED: mean(r[PARSED] for r in records),
                     "answered": mean(r["answered"] for r in records)}


def score_final_number(rows: Sequence[dict], answers: Sequence[str],
                       settings: ScorerSettings | None = None, sandbox: str = BWRAP
                       ) -> tuple[list[dict], dict]:
    """`score_numbers` with extract `auto` (the `final_number` alias)."""
    return score_numbers(rows, answers, settings or ScorerSettings(), sandbox)


# Programs -------------------------------------------------------------------------------


def extract_program(text: str, entry: str = "solution") -> str:
    """The program in an answer (`soups.evaluation.sandbox.harness.program_span`, the same bounded
    search the sandbox runs on every scored answer): its first fenced block; else the longest run
    of lines that parses and defines `entry`, from the first line or a line that opens code
    after prose; the whole answer when none does. For trusted text (a task's own
    references): the scorer never calls it on a model's answer in the evaluator."""
    start, end = program_span(text, entry)
    return text[start:end]


def _program_error(result, outputs_ok: bool) -> str | None:
    """Why a program is wrong when it ran: most often it printed instead of returning."""
    if result.error is not None:
        return result.error
    if result.ran and not outputs_ok and any(o is None for o in result.outputs):
        return "returned None (printed instead of returning?)"
    return None


def score_programs(rows: Sequence[dict], answers: Sequence[str],
                   settings: ScorerSettings | None = None, sandbox: str = BWRAP,
                   workers: int = 4) -> tuple[list[dict], dict]:
    """Each answer's program run on its row's calls in `sandbox` (the row's `function`, else
    `settings.entry`); one record per row, whatever the programs do."""
    settings = settings or ScorerSettings(kind="program")
    entries = [row.get("function") or settings.entry for row in rows]
    # The whole answer goes in; the sandbox cuts the program out and says where it was.
    jobs = [ProgramJob(answer, entry, tuple(tuple(c) for c in json.loads(row.get("calls")
                                                                          or "[]")) or ((),),
                       extract=True)
            for row, answer, entry in zip(rows, answers, entries, strict=True)]
    results = run_many(jobs, timeout_s=settings.timeout_s, sandbox=sandbox, workers=workers)
    records = []
    for row, answer, result in zip(rows, answers, results, strict=True):
        program = answer[slice(*result.span)] if result.span else answer
        want = json.loads(row["expected"])
        correct = (result.ran and len(result.outputs) == len(want)
                   and values_equal(list(result.outputs), want, abs_tol=settings.abs_tol,
                                    rel_tol=settings.rel_tol))
        records.append({**_base_record(row, answer, program, want, correct),
                        PARSED: result.parsed, "ran": result.ran,
                        "outputs": list(result.outputs),
                        "error": _program_error(result, correct)})
    partial = {PARSED: mean(r[PARSED] for r in records),
               "ran": mean(r["ran"] for r in records)}
    return records, partial


# Text -----------------------------------------------------------------------------------


def normalise_text(text: str, case_sensitive: bool = False) -> str:
    """`text` stripped, whitespace runs collapsed to one space, casefolded unless asked."""
    text = " ".join(str(text).split())
    return text if case_sensitive else text.casefold()


def score_exact_match(rows: Sequence[dict], answers: Sequence[str],
                      settings: ScorerSettings | None = None, sandbox: str = BWRAP
                      ) -> tuple[list[dict], dict]:
    """The whole answer against the reference text, both normalised (`normalise_text`)."""
    settings = settings or ScorerSettings(kind="exact_match")
    records = []
    for row, answer in zip(rows, answers, strict=True):
        want = json.loads(row["expected"])[0]
        got = normalise_text(answer, settings.case_sensitive)
        correct = got == normalise_text(want, settings.case_sensitive)
        records.append({**_base_record(row, answer, got, want, correct), PARSED: bool(got)})
    return records, {PARSED: mean(r[PARSED] for r in records)}


# Registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    description: str  # one line, for the docs
    # (rows, answers, settings, sandbox) -> (records, partial); None: nothing is generated
    score: Callable[..., tuple[list[dict], dict]] | None


LOSS = "loss"
SCORERS: dict[str, Scorer] = {
    "number": Scorer("a number extracted from the answer equals the reference within the "
                     "tolerance", score_numbers),
    "final_number": Scorer("`number` with extract auto: the stated answer, else the last "
                           "number", score_final_number),
    "program": Scorer("the answer's Python program, run in the sandbox on the row's calls, "
                      "returns the references", score_programs),
    "exact_match": Scorer("the answer equals the reference text (whitespace collapsed, "
                          "casefolded unless case_sensitive)", score_exact_match),
    LOSS: Scorer("no generation: mean loss and perplexity of the reference completions",
                 None),
}
