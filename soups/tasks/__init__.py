"""The generated skills and target task of the embedded default (design.md).

- `math`: word problems with a worked solution; scored on the final number.
- `code`: instructions answered by short Python programs; scored by executing them.
- `math_code` (target): word problems answered by a `solution()` program; scored by
  executing it (program-aided, like GSM-Hard).

Every example is a row of string columns: `prompt`, `completion`, `scorer` (`final_number`
or `program`), `function`, `calls` and `expected` (JSON), and `key` (the problem or
instruction text, used to keep splits disjoint).
"""

from __future__ import annotations

import json
import random

from soups.tasks.problems import word_problem
from soups.tasks.programs import code_exercise

PROMPT_TEMPLATE = "### Question:\n{question}\n### Answer:\n"
TARGET_INSTRUCTION = "Write a Python function solution() that returns the answer."
TASK_NAMES = ("math", "code", "math_code")
SKILL_NAMES = ("math", "code")


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def _row(key, prompt, completion, scorer, function="", calls=(), expected=()) -> dict:
    return {
        "key": key, "prompt": prompt, "completion": completion, "scorer": scorer,
        "function": function, "calls": json.dumps([list(c) for c in calls]),
        "expected": json.dumps(list(expected)),
    }


def math_example(rng: random.Random, max_value: int, two_step_share: float) -> dict:
    problem = word_problem(rng, max_value, two_step_share)
    return _row(problem.text, format_prompt(problem.text), problem.worked_solution(),
                "final_number", expected=(problem.answer,))


def math_code_example(rng: random.Random, max_value: int, two_step_share: float) -> dict:
    problem = word_problem(rng, max_value, two_step_share)
    question = f"{problem.text}\n{TARGET_INSTRUCTION}"
    return _row(problem.text, format_prompt(question), problem.program(), "program",
                function="solution", calls=((),), expected=(problem.answer,))


def code_example(rng: random.Random, max_value: int, two_step_share: float) -> dict:
    exercise = code_exercise(rng, max_value, two_step_share)
    return _row(exercise.instruction, format_prompt(exercise.instruction), exercise.program,
                "program", function=exercise.function, calls=exercise.calls,
                expected=exercise.expected)


EXAMPLE_BUILDERS = {"math": math_example, "code": code_example, "math_code": math_code_example}
