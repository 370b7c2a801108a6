"""Scoring (soups.evaluation.scoring), against hand-computed values: number extraction in each mode,
tolerances at their boundary, programs cut out of answers and run in the real sandbox,
exact text match, settings that name their bad value."""

import json
import re

import pytest

from soups.evaluation.sandbox import SandboxUnavailable, check_sandbox
from soups.evaluation.scoring import (
    SCORERS,
    ScorerError,
    ScorerSettings,
    extract_number,
    extract_program,
    final_number,
    normalise_text,
    parse_number,
    score_exact_match,
    score_final_number,
    score_numbers,
    score_programs,
    values_equal,
)

pytestmark = pytest.mark.unit

NEXT_QUESTION = "\n\nQ: Sam has 3 pens. How many pens?\nA: def solution():\n    return 3"


@pytest.fixture(scope="module")
def sandbox():
    """The real bubblewrap sandbox; the tests that run programs skip where it is unusable."""
    try:
        check_sandbox("bwrap")
    except SandboxUnavailable as err:
        pytest.skip(f"bwrap unusable here: {err}")
    return "bwrap"


def _row(expected, scorer="final_number", function="", calls="[]", prompt="p"):
    return {"prompt": prompt, "scorer": scorer, "function": function, "calls": calls,
            "expected": json.dumps(expected)}


# ---- numbers ---------------------------------------------------------------------------

def test_final_number_parsing():
    assert final_number("25 - 9 = 16. The answer is 16.") == 16
    assert final_number("so 3 and then 1,250") == 1250
    assert final_number("The answer is 7. Later 9") == 7
    assert final_number("x = 2.5") == 2.5
    assert final_number("no digits") is None


def test_parse_number_keeps_integers_exact():
    assert parse_number("1,234") == 1234 and isinstance(parse_number("1,234"), int)
    assert parse_number("-3") == -3
    assert parse_number("2.50") == 2.5
    assert parse_number("123456789012345678901234567890") == 123456789012345678901234567890


@pytest.mark.parametrize(("text", "mode", "want"), [
    ("The answer is: 1,234. Then the answer is 5", "answer_is", (1234, "answer_is")),
    ("so the answer is -7.", "answer_is", (-7, "answer_is")),
    ("the answer is $2.5", "answer_is", (2.5, "answer_is")),
    ("no phrase 3", "answer_is", (None, None)),
    ("3 + 4 = 7\n#### 7\n#### 9", "hashes", (7, "hashes")),
    ("1, 2 and finally 16.", "last", (16, "last")),
    ("The answer is 4\n#### 5", "auto", (4, "answer_is")),
    ("5 + 1 = 6\n#### 6 then 8", "auto", (6, "hashes")),
    ("5 + 1 = 6", "auto", (6, "last")),
    ("nothing", "auto", (None, None)),
])
def test_extract_number_modes(text, mode, want):
    assert extract_number(text, mode) == want


def test_extract_number_regex():
    assert extract_number("x=3 RESULT[42] y=9", "regex", r"RESULT\[(\d+)\]") == (42, "regex")
    assert extract_number("RESULT[abc]", "regex", r"RESULT\[(\w+)\]") == (None, None)


def test_score_numbers_answered_and_text_references():
    rows = [_row([16]), _row([16]), _row([3]), _row(["#### 1,234"]), _row(["3.0"])]
    records, partial = score_final_number(rows, ["The answer is 16.", "16 then 15",
                                                 "The answer is 4.", "#### 1234", "3"])
    assert [r["correct"] for r in records] == [True, False, False, True, True]
    assert [r["extracted"] for r in records] == [16, 15, 4, 1234, 3]
    assert [r["reference"] for r in records] == [16, 16, 3, 1234, 3.0]
    # Every answer gave a number; "16 then 15" and "3" only by the last-number fallback.
    assert partial == {"parsed": 1.0, "answered": pytest.approx(3 / 5)}
    _, partial = score_final_number(rows[:2], ["no number here", "The answer is 16."])
    assert partial == {"parsed": 0.5, "answered": 0.5}
    assert {"prompt", "output", "extracted", "reference", "correct"} <= set(records[0])


def test_number_tolerances_at_their_boundary():
    def correct(got, want, **tol):
        settings = ScorerSettings(kind="number", **tol)
        return score_numbers([_row([want])], [f"The answer is {got}"], settings)[0][0]["correct"]

    assert correct("0.001", 0, abs_tol=1e-3, rel_tol=None)  # exactly abs_tol apart: equal
    assert not correct("0.0011", 0, abs_tol=1e-3, rel_tol=None)
    assert correct("2.501", 2.5, abs_tol=1e-3, rel_tol=None)
    assert not correct("2.5011", 2.5, abs_tol=1e-3, rel_tol=None)
    assert correct("-3.999", -4, abs_tol=1e-3, rel_tol=None)  # a float against an int
    assert not correct("5", 6, abs_tol=None, rel_tol=1.0)  # two integers: exact
    assert correct("100.00005", 100.0, rel_tol=1e-6)  # 5e-5 <= 1e-6 * 100
    assert not correct("100.0002", 100.0, rel_tol=1e-6)
    assert not correct("2.0000001", 2, abs_tol=None, rel_tol=None)  # no tolerance: exact
    assert correct("2.0", 2, abs_tol=None, rel_tol=None)


def test_an_integer_reference_is_met_by_a_float_only_within_abs_tol():
    """A relative tolerance would make 123456700.0 equal 123456789 (1e-6 of it is 123)."""
    assert not values_equal(123456700.0, 123456789)
    assert not correct("123456700.0", 123456789)  # the study's default scorer settings
    assert not values_equal(100.00005, 100)  # rel_tol does not apply to a count
    assert values_equal(16.0, 16) and correct("16.", 16) and correct("16.0", 16)
    assert values_equal(-3.9995, -4, abs_tol=1e-3) and not values_equal(-3.99, -4, abs_tol=1e-3)
    assert values_equal(10 ** 20 * 1.0, 10 ** 20)  # exactly integral, however large
    assert values_equal(3, 3.0000001)  # a float reference keeps its relative tolerance


def correct(got: str, want, **tol) -> bool:
    settings = ScorerSettings(kind="number", **tol)
    return score_numbers([_row([want])], [f"The answer is {got}"], settings)[0][0]["correct"]


def test_values_equal_default_tolerance_is_relative():
    assert values_equal(1.0000005, 1.0)
    assert not values_equal(1.00001, 1.0)
    assert values_equal([0.001, 2], [0, 2], abs_tol=1e-3, rel_tol=None)


# ---- programs --------------------------------------------------------------------------

def test_extract_program_fenced_and_unfenced():
    assert extract_program("```python\ndef f():\n    return 1\n```\nok") == \
        "def f():\n    return 1\n"
    assert extract_program("See:\n```\ndef a():\n    return 1\n```\n```python\nx\n```") == \
        "def a():\n    return 1\n"
    assert extract_program("def solution():\n    return 1") == "def solution():\n    return 1"


def test_extract_program_after_a_worked_line_or_prose():
    program = "def solution():\n    result = 4 * 3\n    return result"
    assert extract_program("4 * 3 = 12.\n" + program) == program  # the embedded format
    assert extract_program("Here is the program:\n" + program + "\nIt returns 12.") == program
    # a program that opens with its imports is kept whole
    with_import = "import math\n" + program
    assert extract_program("Sure.\n" + with_import) == with_import
    # prose that never opens code: the whole answer (it then fails to parse, as it should)
    assert extract_program("4 * 3 = 12. The answer is 12.") == "4 * 3 = 12. The answer is 12."


def test_extract_program_cuts_the_next_question():
    program = "def solution():\n    a = 2\n    return a + 3"
    assert extract_program(program + NEXT_QUESTION) == program
    assert extract_program(program + "\nThe answer is 5.") == program
    # no prefix defines the entry: the whole answer, for the sandbox to report
    assert extract_program("print(5)\nQ: next") == "print(5)\nQ: next"
    assert extract_program("def add(x):\n    return x\nQ: what next?", entry="add") == \
        "def add(x):\n    return x"


def test_score_programs_partial_credit(sandbox):
    rows = [_row([5], "program", "solution", "[[]]")] * 4 + \
        [_row([3, 7], "program", "add", "[[1, 2], [3, 4]]")]
    answers = [
        "def solution():\n    a = 2\n    b = 3\n    result = a + b\n    return result",  # right
        "def solution():\n    return 4",  # runs, wrong
        "def solution():\n    return 1 / 0",  # parses, crashes
        "def solution(:\n    return 5",  # does not parse
        "def add(x, y):\n    return x + y",  # right on both held-out calls
    ]
    records, partial = score_programs(rows, answers, sandbox=sandbox)
    assert [r["correct"] for r in records] == [True, False, False, False, True]
    assert [r["ran"] for r in records] == [True, True, False, False, True]
    assert [r["parsed"] for r in records] == [True, True, True, False, True]
    assert partial == {"parsed": 0.8, "ran": 0.6}
    assert records[0]["extracted"] == answers[0] and records[4]["reference"] == [3, 7]


def test_program_followed_by_the_next_question_scores(sandbox):
    answer = "def solution():\n    return 2.5 * 2" + NEXT_QUESTION
    records, _ = score_programs([_row([5], "program", "solution", "[[]]")], [answer],
                                sandbox=sandbox)
    assert records[0]["correct"] and records[0]["outputs"] == [5.0]
    assert records[0]["extracted"] == "def solution():\n    return 2.5 * 2"


def test_program_tolerance_and_entry(sandbox):
    """GSM-Hard's program-aided scoring: abs_tol 1e-3, at the boundary; the entry function
    from the settings where the row names none."""
    settings = ScorerSettings(kind="program", abs_tol=1e-3, rel_tol=None, entry="answer")
    rows = [_row([2.5], "program", "", "[[]]"), _row([2.5], "program", "", "[[]]"),
            _row([-4], "program", "", "[[]]")]
    answers = ["def answer():\n    return 2.501", "def answer():\n    return 2.5011",
               "def answer():\n    return -3.999"]
    records, _ = score_programs(rows, answers, settings, sandbox=sandbox)
    assert [r["correct"] for r in records] == [True, False, True]


def test_a_program_that_prints_is_wrong_and_says_why(sandbox):
    answer = "def solution():\n    print(5)"
    records, partial = score_programs([_row([5], "program", "solution", "[[]]")], [answer],
                                      sandbox=sandbox)
    assert records[0]["ran"] and not records[0]["correct"]
    assert records[0]["outputs"] == [None]
    assert "returned None" in records[0]["error"]


# ---- text ------------------------------------------------------------------------------

def test_exact_match():
    assert normalise_text("  Paris\n is  BIG ") == "paris is big"
    rows = [_row(["Paris is big"])] * 3
    answers = ["paris   is\nbig ", "Paris is big.", "PARIS IS BIG"]
    records, partial = score_exact_match(rows, answers)
    assert [r["correct"] for r in records] == [True, False, True]
    assert records[0]["extracted"] == "paris is big" and partial == {"parsed": 1.0}
    assert score_exact_match(rows[:2], ["  ", "Paris"])[1] == {"parsed": 0.5}
    sensitive = ScorerSettings(kind="exact_match", case_sensitive=True)
    records, _ = score_exact_match(rows, answers, sensitive)
    assert [r["correct"] for r in records] == [False, False, False]
    assert score_exact_match([_row(["Paris"])], [" Paris "], sensitive)[0][0]["correct"]


# ---- settings --------------------------------------------------------------------------

def test_registry_describes_every_kind():
    assert set(SCORERS) == {"number", "final_number", "program", "exact_match", "loss"}
    assert all(scorer.description and "\n" not in scorer.description
               for scorer in SCORERS.values())
    assert SCORERS["loss"].score is None


@pytest.mark.parametrize(("settings", "named"), [
    ({"kind": "bleu"}, "'bleu'"),
    ({"kind": "number", "extract": "first"}, "'first'"),
    ({"kind": "final_number", "extract": "last"}, "'last'"),
    ({"kind": "number", "extract": "regex"}, "needs a pattern"),
    ({"kind": "number", "extract": "regex", "pattern": "(a"}, "'(a'"),
    ({"kind": "number", "extract": "regex", "pattern": r"\d+"}, repr(r"\d+")),
    ({"abs_tol": -1.0}, "-1.0"),
    ({"kind": "program", "entry": "not a name"}, "'not a name'"),
    ({"timeout_s": 0}, "0"),
])
def test_bad_settings_name_the_value(settings, named):
    with pytest.raises(ScorerError, match=re.escape(named)):
        ScorerSettings(**settings)
    assert issubclass(ScorerError, ValueError)


def test_reference_that_is_not_a_number_names_it():
    with pytest.raises(ScorerError, match="'many'"):
        score_numbers([_row(["many"])], ["The answer is 3"])


def test_settings_params_are_flat():
    params = ScorerSettings(kind="program", abs_tol=1e-3).params("scorer.")
    assert params["scorer.kind"] == "program" and params["scorer.abs_tol"] == 1e-3
    assert all(not isinstance(v, (dict, list)) for v in params.values())


# ---- hostile answers: the evaluator never parses them ----------------------------------

def _exhaustive_extract(text: str, entry: str) -> str:
    """The unbounded search program_span replaces: every (start, end) pair, longest first."""
    import ast

    fenced = re.search(r"```(?:python|py)?[ \t]*\n(.*?)```", text, re.DOTALL)
    if fenced:
        return fenced.group(1)
    lines = text.splitlines(keepends=True)
    starts = [0] + [i for i, line in enumerate(lines) if i and line.startswith(
        ("def ", "async def ", "import ", "from ", "class ", "@"))]
    for start in starts:
        for end in range(len(lines), start, -1):
            program = "".join(lines[start:end])
            try:
                tree = ast.parse(program)
            except Exception:
                continue
            if any(getattr(node, "name", None) == entry for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
                return program.rstrip()
    return text


ANSWER_LINES = [
    "4 * 3 = 12.", "Here is the program:", "def solution():", "    result = 4 * 3",
    "    return result", "    return (1 +", "    2)", "Q: Sam has 3 pens. How many?",
    "A: def solution():", "import math", "from math import sqrt", "@functools.cache",
    "class A:", "    x = [1,", "'''", "x = (", ")", "def other():", "    pass", "",
    "The answer is 12.", "    if True:", "        return 5", "print(5)", "async def solution():",
    "def solution(:", "  bad indent", "#### 12", "```", "```python",
]


def test_the_bounded_search_finds_what_the_exhaustive_one_does():
    """On 3,000 random answers built from program, prose and broken lines, the bounded
    search inside the sandbox cuts out the same program as trying every pair of lines."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        text = "\n".join(rng.choice(ANSWER_LINES) for _ in range(rng.randint(1, 9)))
        assert extract_program(text) == _exhaustive_extract(text, "solution"), text


@pytest.mark.parametrize("line", ["@", "def ", "import ", "def solution(", "(", "'''"])
def test_an_adversarial_answer_is_scored_wrong_within_its_timeout(sandbox, line, monkeypatch):
    """3,000 short lines (6 KB and more) that each open code: the old search parsed every
    pair of lines in the evaluator and did not return in 45 s. Now the evaluator parses
    nothing (ast.parse is switched off in it here) and the sandbox's search is bounded."""
    import ast
    import time

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluator parsed an answer")

    monkeypatch.setattr(ast, "parse", refuse)
    answer = "def solution():\n" + (line + "\n") * 3000
    settings = ScorerSettings(kind="program", timeout_s=2.0)
    start = time.monotonic()
    records, _ = score_programs([_row([5], "program", "solution", "[[]]")] * 2,
                                [answer, "def solution():\n    return 5\n" + answer],
                                settings, sandbox=sandbox)
    assert time.monotonic() - start < settings.timeout_s + 3  # start-up slack, two at once
    assert [r["correct"] for r in records] == [False, True]
    assert records[1]["extracted"] == "def solution():\n    return 5"
