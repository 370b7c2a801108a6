"""General question -> answer text for pretraining the embedded base model.

The base needs the structure the skills build on (design.md, probe results): arithmetic
facts, reading numbers out of sentences, list manipulation, reading small Python programs,
plain sentences, all in the same prompt format as the skills. It never sees the skills
themselves: no word problem that needs arithmetic and no instruction to write a program, so a
study measures what the skill LoRAs and their merges add.
"""

from __future__ import annotations

import random

from soups.data.generated.problems import OPS, singular
from soups.data.generated.programs import VARIABLES
from soups.data.generated.words import ITEMS, NAMES, PLACES


def _arithmetic(rng: random.Random, hi: int) -> tuple[str, str]:
    op = rng.choice(tuple(OPS))
    if op == "//":
        b = rng.randint(2, 12)
        a = b * rng.randint(1, 12)
    elif op == "*":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
    elif op == "-":
        b = rng.randint(0, hi)
        a = b + rng.randint(0, hi)
    else:
        a, b = rng.randint(0, 2 * hi), rng.randint(0, 2 * hi)
    symbol = "/" if op == "//" else op
    question = rng.choice(("What is {a} {s} {b}?", "Compute {a} {s} {b}.", "{a} {s} {b} = ?"))
    return question.format(a=a, s=symbol, b=b), f"{a} {symbol} {b} = {OPS[op](a, b)}."


def _symbolic_program(rng: random.Random, hi: int) -> tuple[str, str]:
    """Symbolic arithmetic both as a worked line and as a program (never a word problem, and
    not the skills' instruction nor function name): the base half-knows both output formats
    before any LoRA, so a skill LoRA adapts a format rather than inventing it."""
    question, line = _arithmetic(rng, hi)
    a, symbol, b = line.split(" ")[:3]
    op = "//" if symbol == "/" else symbol
    prompt = rng.choice(("Show {e} as a Python program.", "Python code for {e}:",
                         "Turn {e} into code."))
    return (prompt.format(e=f"{a} {symbol} {b}"),
            f"{line}\ndef compute():\n    value = {a} {op} {b}\n    return value")


def _number_fact(rng: random.Random, hi: int) -> tuple[str, str]:
    a, b = rng.sample(range(0, 4 * hi), 2)
    return rng.choice((
        (f"What number comes after {a}?", f"{a + 1}"),
        (f"What number comes before {a + 1}?", f"{a}"),
        (f"Which is larger, {a} or {b}?", f"{max(a, b)}"),
        (f"Which is smaller, {a} or {b}?", f"{min(a, b)}"),
    ))


def _list_task(rng: random.Random, hi: int) -> tuple[str, str]:
    numbers = [rng.randint(0, 4 * hi) for _ in range(rng.randint(3, 6))]
    words = [rng.choice(ITEMS)[0] for _ in range(rng.randint(2, 5))]
    return rng.choice((
        (f"Sort these numbers: {', '.join(map(str, numbers))}.",
         ", ".join(map(str, sorted(numbers)))),
        (f"What is the largest number in {', '.join(map(str, numbers))}?", f"{max(numbers)}"),
        (f"What is the smallest number in {', '.join(map(str, numbers))}?", f"{min(numbers)}"),
        (f"Reverse the words: {' '.join(words)}.", " ".join(reversed(words))),
        (f"How many words are in: {' '.join(words)}?", f"{len(words)}"),
        (f"Repeat the numbers: {' '.join(map(str, numbers))}.", " ".join(map(str, numbers))),
    ))


def _extraction(rng: random.Random, hi: int) -> tuple[str, str]:
    name = rng.choice(NAMES)
    (item1, cont), (item2, _) = rng.sample(ITEMS, 2)
    a, b, c = rng.randint(2, 4 * hi), rng.randint(2, 4 * hi), rng.randint(2, 12)
    return rng.choice((
        (f"{name} has {a} {item1} and {b} {item2}. How many {item2} does {name} have?", f"{b}"),
        (f"{name} has {a} {item1} and {b} {item2}. How many {item1} does {name} have?", f"{a}"),
        (f"There are {c} {cont} on the shelf. How many {cont} are on the shelf?", f"{c}"),
        (f"{name} saw {a} {item1} at {rng.choice(PLACES)}. Which number is in the sentence?",
         f"{a}"),
        (f"Each of the {cont} holds {c} {item1}. How many {item1} does one of the "
         f"{cont} hold?", f"{c}"),
        (f"What is one of the {cont} called?", f"One of the {cont} is called a {singular(cont)}."),
    ))


def _code_reading(rng: random.Random, hi: int) -> tuple[str, str]:
    x_name, y_name = rng.sample(VARIABLES, 2)
    op = rng.choice(("+", "-", "*"))
    x, y = rng.randint(1, hi), rng.randint(1, 12 if op == "*" else hi)
    if op == "-" and y > x:
        x, y = y, x
    value = OPS[op](x, y)
    if rng.random() < 0.5:
        code = f"{x_name} = {x}\n{y_name} = {y}\nprint({x_name} {op} {y_name})"
    else:
        code = (f"def f():\n    {x_name} = {x}\n    {y_name} = {y}\n"
                f"    return {x_name} {op} {y_name}\n\nprint(f())")
    return f"What does this Python code print?\n{code}", f"{value}"


def _sentence(rng: random.Random, hi: int) -> tuple[str, str]:
    n, m = rng.sample(NAMES, 2)
    item, cont = rng.choice(ITEMS)
    place = rng.choice(PLACES)
    story = rng.choice((
        f"{n} went to {place} with {m}. They looked at the {item} and talked for a while.",
        f"{n} likes {item}. Every day {n} puts some {item} in the {singular(cont)}.",
        f"At {place}, {m} met {n}. {n} showed {m} a {singular(cont)} full of {item}.",
    ))
    return f"Tell a short story about {n}.", story


GENERATORS = (_arithmetic, _arithmetic, _symbolic_program, _number_fact, _list_task, _extraction,
              _code_reading, _sentence)


def pretraining_example(rng: random.Random, max_value: int = 20) -> tuple[str, str]:
    """One (question, answer) pair for the base model's pretraining corpus."""
    return rng.choice(GENERATORS)(rng, max_value)
