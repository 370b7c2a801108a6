"""Arithmetic word problems, generated with the structure behind them.

A `Problem` keeps its text, its named quantities and its computation steps, so the same
problem renders as a worked natural-language solution (skill `math`, like MetaMathQA) or as a
`solution()` program (target `math_code`, like program-aided GSM-Hard). All answers are
non-negative integers (divisions are exact) so that both renderings agree by construction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from soups.data.generated.words import ITEMS, NAMES

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "//": lambda a, b: a // b}
MATH_SYMBOL = {"+": "+", "-": "-", "*": "*", "//": "/"}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2}


@dataclass(frozen=True)
class Step:
    target: str  # variable the step defines
    left: str
    op: str  # one of OPS
    right: str


@dataclass(frozen=True)
class Problem:
    text: str
    quantities: tuple[tuple[str, int], ...]  # (variable name, value) in order of appearance
    steps: tuple[Step, ...]  # the last step defines `result`

    def values(self) -> dict[str, int]:
        env = dict(self.quantities)
        for step in self.steps:
            env[step.target] = OPS[step.op](env[step.left], env[step.right])
        return env

    @property
    def answer(self) -> int:
        return self.values()["result"]

    def worked_lines(self) -> str:
        """Each step as `a op b = c.`: the line every rendering of a problem starts with."""
        env, lines = dict(self.quantities), []
        for step in self.steps:
            env[step.target] = OPS[step.op](env[step.left], env[step.right])
            lines.append(f"{env[step.left]} {MATH_SYMBOL[step.op]} {env[step.right]} = "
                         f"{env[step.target]}.")
        return " ".join(lines)

    def worked_solution(self) -> str:
        """The worked lines, then `The answer is N.` (the math skill's answer)."""
        return self.worked_lines() + f" The answer is {self.answer}."

    def worked_program(self) -> str:
        """The worked lines, then the `solution()` program computing them (the code skill's
        and the target's answer). The shared first line is what makes the skills compose:
        in the target, the math skill writes the line from the word problem, and the code
        skill writes the program from a line, as it learned to (docs/embedded.md)."""
        return self.worked_lines() + "\n" + self.program()

    def expression(self) -> str:
        """The whole computation as one Python expression over the literal quantities,
        parenthesised only where precedence needs it (e.g. `34 - 6 + 43`, `12 + 4 * 6`)."""
        env = {name: (str(value), 3) for name, value in self.quantities}  # (text, precedence)
        for step in self.steps:
            (left, p_left), (right, p_right) = env[step.left], env[step.right]
            prec = PRECEDENCE[step.op]
            if p_left < prec:
                left = f"({left})"
            if p_right < prec or (p_right == prec and step.op in ("-", "//")):
                right = f"({right})"
            env[step.target] = (f"{left} {step.op} {right}", prec)
        return env["result"][0]

    def program(self) -> str:
        """A `solution()` program computing the answer from the problem's numbers.

        The quantities appear as literals, not named variables: the tiny embedded model copies
        numbers from its prompt reliably but not names, and the composition under study is
        extraction (math skill) + program format (code skill), not naming."""
        return f"def solution():\n    result = {self.expression()}\n    return result"


def singular(noun: str) -> str:
    if noun.endswith(("ches", "shes", "xes")):
        return noun[:-2]
    return noun[:-1] if noun.endswith("s") else noun


def _one_step(rng: random.Random, hi: int) -> Problem:
    n, m = rng.sample(NAMES, 2)
    item, cont = rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul", "div"))
    if kind == "add":
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        text = rng.choice((
            f"{n} has {a} {item}. {n} buys {b} more {item}. How many {item} does {n} have now?",
            f"{n} picked {a} {item} in the morning and {b} {item} in the afternoon. "
            f"How many {item} did {n} pick in total?",
            f"There are {a} {item} in the kitchen and {b} {item} in the garden. "
            f"How many {item} are there altogether?",
            f"{n} has {a} {item} and {m} has {b} {item}. How many {item} do they have together?",
        ))
        return Problem(text, ((item, a), ("more", b)), (Step("result", item, "+", "more"),))
    if kind == "sub":
        b = rng.randint(2, hi - 1)
        a = rng.randint(b + 1, hi + b)
        text, role = rng.choice((
            (f"{n} has {a} {item}. {n} gives {b} {item} to {m}. "
             f"How many {item} does {n} have left?", "given"),
            (f"{n} had {a} {item} and lost {b} of them. How many {item} does {n} have now?",
             "lost"),
            (f"A shop had {a} {item}. It sold {b} {item}. How many {item} are left in the shop?",
             "sold"),
            (f"{n} needs {a} {item} and already has {b}. How many more {item} does {n} need?",
             "have"),
        ))
        return Problem(text, ((item, a), (role, b)), (Step("result", item, "-", role),))
    per = "per_" + singular(cont)
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = rng.choice((
            f"{n} buys {a} {cont} of {item}. Each of the {cont} has {b} {item}. "
            f"How many {item} does {n} buy?",
            f"There are {a} {cont} with {b} {item} in each. How many {item} are there in all?",
            f"{n} fills {a} {cont} and puts {b} {item} in each. How many {item} does {n} use?",
        ))
        return Problem(text, ((cont, a), (per, b)), (Step("result", cont, "*", per),))
    per_part, parts = rng.randint(2, 12), rng.randint(2, 12)
    total = per_part * parts
    text, names = rng.choice((
        (f"{n} shares {total} {item} equally among {parts} friends. "
         f"How many {item} does each friend get?", (item, "friends")),
        (f"{n} puts {total} {item} into {parts} {cont} with the same number in each. "
         f"How many {item} are in each of the {cont}?", (item, cont)),
    ))
    return Problem(text, ((names[0], total), (names[1], parts)),
                   (Step("result", names[0], "//", names[1]),))


def _two_step(rng: random.Random, hi: int) -> Problem:
    n, m = rng.sample(NAMES, 2)
    item, cont = rng.choice(ITEMS)
    per = "per_" + singular(cont)
    kind = rng.choice(("add_mul", "sub_add", "mul_sub"))
    if kind == "add_mul":
        a, b, c = rng.randint(2, hi), rng.randint(2, 9), rng.randint(2, 9)
        text = (f"{n} has {a} {item}. {n} buys {b} {cont} with {c} {item} in each. "
                f"How many {item} does {n} have now?")
        return Problem(text, ((item, a), (cont, b), (per, c)),
                       (Step("bought", cont, "*", per), Step("result", item, "+", "bought")))
    if kind == "sub_add":
        b = rng.randint(2, hi - 1)
        a, c = rng.randint(b + 1, hi + b), rng.randint(2, hi)
        text = (f"{n} had {a} {item}. {n} gave {b} {item} to {m} and then found {c} more. "
                f"How many {item} does {n} have now?")
        return Problem(text, ((item, a), ("given", b), ("found", c)),
                       (Step("left", item, "-", "given"), Step("result", "left", "+", "found")))
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    text = (f"{n} buys {a} {cont} with {b} {item} in each and gives away {c} {item}. "
            f"How many {item} does {n} have left?")
    return Problem(text, ((cont, a), (per, b), ("given", c)),
                   (Step("total", cont, "*", per), Step("result", "total", "-", "given")))


def word_problem(rng: random.Random, max_value: int = 20, two_step_share: float = 0.0) -> Problem:
    """One random problem; `max_value` bounds the additive quantities, `two_step_share` is the
    probability of a two-step problem (difficulty knobs)."""
    if rng.random() < two_step_share:
        return _two_step(rng, max_value)
    return _one_step(rng, max_value)
