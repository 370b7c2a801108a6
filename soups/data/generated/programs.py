"""Short Python programs from plain instructions (skill `code`, like CodeAlpaca).

Two kinds, both scored by executing the answer in the sandbox:
- `solution()` programs computing an arithmetic expression stated in words (the program
  format the target task needs, but from an explicit instruction, not a word problem);
- functions with arguments, tested on held-out argument tuples the instruction never shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from soups.data.generated.problems import OPS, Problem, Step
from soups.data.generated.words import NAMES, PLACES

VARIABLES = (
    "price", "count", "width", "height", "days", "points", "score", "cost", "weight", "speed",
    "pages", "rows", "seats", "boxes", "items", "first", "second", "total", "amount", "size",
    "x", "y", "z", "n", "m", "k", "hours", "steps",
)
PHRASES = {
    "+": ("{x} plus {y}", "the sum of {x} and {y}", "{x} added to {y}"),
    "-": ("{x} minus {y}", "the difference of {x} and {y}", "{y} subtracted from {x}"),
    "*": ("{x} times {y}", "the product of {x} and {y}", "{x} multiplied by {y}"),
    "//": ("{x} divided by {y}", "the quotient of {x} and {y}"),
}
FUNCTION_NAMES = {
    "+": ("add", "total_of", "combine", "sum_two"),
    "-": ("subtract", "difference", "remaining", "take_away"),
    "*": ("multiply", "product", "times", "scale"),
    "//": ("divide", "share", "per_part", "split_evenly"),
}


@dataclass(frozen=True)
class CodeExercise:
    instruction: str
    program: str
    function: str
    calls: tuple[tuple[int, ...], ...]
    expected: tuple[int, ...]


def _operands(rng: random.Random, op: str, hi: int) -> tuple[int, int]:
    if op == "//":
        b = rng.randint(2, 12)
        return b * rng.randint(1, 12), b
    if op == "*":
        return rng.randint(2, 12), rng.randint(2, 12)
    if op == "-":
        b = rng.randint(1, hi)
        return b + rng.randint(0, hi), b
    return rng.randint(1, hi), rng.randint(1, hi)


def _phrase(rng: random.Random, op: str, x: str, y: str) -> str:
    return rng.choice(PHRASES[op]).format(x=x, y=y)


# Sentences a code instruction may follow (no numbers, no question): real instructions come
# with context, and a code skill that reads past it is not thrown by the word problem that
# precedes the target's instruction.
CONTEXTS = (
    "{n} is learning Python.", "{n} writes small programs for {place}.",
    "{n} and {m} are practising functions.", "This exercise is for {n}.",
    "{n} needs a helper function.", "A short task from {n}:",
)


def with_context(rng: random.Random, instruction: str, share: float = 0.5) -> str:
    """`instruction`, after a context sentence `share` of the time."""
    if rng.random() >= share:
        return instruction
    n, m = rng.sample(NAMES, 2)
    context = rng.choice(CONTEXTS).format(n=n, m=m, place=rng.choice(PLACES))
    return f"{context}\n{instruction}"


def _solution_exercise(rng: random.Random, hi: int, two_step_share: float) -> CodeExercise:
    if rng.random() < two_step_share:
        op1, op2 = rng.choice(tuple(OPS)), rng.choice(("+", "-"))
        b, c = _operands(rng, op1, hi)
        # a - (b op1 c) must stay non-negative: draw a above the inner value.
        a = OPS[op1](b, c) + rng.randint(0, hi) if op2 == "-" else rng.randint(1, hi)
        problem = Problem(text="", quantities=(("a", a), ("b", b), ("c", c)),
                          steps=(Step("inner", "b", op1, "c"), Step("result", "a", op2, "inner")))
        # The inner phrase is always the unambiguous "the sum/difference/... of b and c".
        inner = PHRASES[op1][1].format(x=b, y=c)
        phrase = _phrase(rng, op2, str(a), inner)
    else:
        op = rng.choice(tuple(OPS))
        x, y = _operands(rng, op, hi)
        problem = Problem(text="", quantities=(("x", x), ("y", y)),
                          steps=(Step("result", "x", op, "y"),))
        phrase = _phrase(rng, op, str(x), str(y))
    instruction = rng.choice((
        f"Write a Python function solution() that returns {phrase}.",
        f"Write a Python function solution() that computes {phrase} and returns it.",
        f"Write a Python function solution() that returns the value of {phrase}.",
    ))
    return CodeExercise(instruction, problem.worked_program(), "solution", ((),),
                        (problem.answer,))


def _function_exercise(rng: random.Random, hi: int) -> CodeExercise:
    op = rng.choice(tuple(OPS))
    name = rng.choice(FUNCTION_NAMES[op])
    x_name, y_name = rng.sample(VARIABLES, 2)
    instruction = (f"Write a Python function {name}({x_name}, {y_name}) that returns "
                   f"{_phrase(rng, op, x_name, y_name)}.")
    program = (f"def {name}({x_name}, {y_name}):\n    result = {x_name} {op} {y_name}\n"
               f"    return result")
    calls = tuple(_operands(rng, op, hi) for _ in range(3))
    expected = tuple(OPS[op](a, b) for a, b in calls)
    return CodeExercise(instruction, program, name, calls, expected)


def code_exercise(rng: random.Random, max_value: int = 20, two_step_share: float = 0.0,
                  function_share: float = 0.0) -> CodeExercise:
    """One random exercise; `function_share` of them are functions with arguments."""
    if rng.random() < function_share:
        return _function_exercise(rng, max_value)
    return _solution_exercise(rng, max_value, two_step_share)
