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

from soups.data.generated.problems import word_problem
from soups.data.generated.programs import code_exercise, with_context

PROMPT_TEMPLATE = "### Question:\n{question}\n### Answer:\n"
TARGET_INSTRUCTION = "Write a Python function solution() that returns the answer."
TASK_NAMES = ("math", "code", "math_code")
SKILL_NAMES = ("math", "code")


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def question_of(prompt: str) -> str:
    """The question a generated prompt asks (`format_prompt` undone): the user's turn when
    the prompt goes through a chat template instead."""
    head, tail = PROMPT_TEMPLATE.split("{question}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return prompt


def _row(key, prompt, completion, scorer, function="", calls=(), expected=()) -> dict:
    return {
        "key": key, "prompt": prompt, "completion": completion, "scorer": scorer,
        "function": function, "calls": json.dumps([list(c) for c in calls]),
        "expected": json.dumps(list(expected)),
    }


# Requests a math question may end with, and whether its answer then stops after the worked
# line(s) (the last number is the answer) or goes on to "The answer is N." Real math data
# phrases its questions many ways; here the variety also teaches the math skill that the
# ending follows the request, so on the target (whose request it never saw) the code skill
# decides what follows the worked line. None of them asks for a program, nor opens with
# "Write" as the code instructions do.
MATH_REQUESTS = (
    ("", False), ("", False), ("Show your work.", False), ("Solve it step by step.", False),
    ("Give the final number.", False), ("Only the calculation, please.", True),
    ("Show just the calculation.", True),
)


def math_example(rng: random.Random, settings) -> dict:
    problem = word_problem(rng, settings.max_value, settings.two_step_share)
    request, line_only = rng.choice(MATH_REQUESTS)
    question = f"{problem.text}\n{request}" if request else problem.text
    answer = problem.worked_lines() if line_only else problem.worked_solution()
    return _row(problem.text, format_prompt(question), answer, "final_number",
                expected=(problem.answer,))


def math_code_example(rng: random.Random, settings) -> dict:
    problem = word_problem(rng, settings.max_value, settings.two_step_share)
    question = f"{problem.text}\n{TARGET_INSTRUCTION}"
    return _row(problem.text, format_prompt(question), problem.worked_program(), "program",
                function="solution", calls=((),), expected=(problem.answer,))


def code_example(rng: random.Random, settings) -> dict:
    exercise = code_exercise(rng, settings.max_value, settings.two_step_share,
                             settings.function_share)
    # The key is the instruction alone: splits stay disjoint whatever context it comes with.
    question = with_context(rng, exercise.instruction)
    return _row(exercise.instruction, format_prompt(question), exercise.program,
                "program", function=exercise.function, calls=exercise.calls,
                expected=exercise.expected)


# Each builder draws one row from `rng` under `soups.data.datasets.DataSettings` (the difficulty
# knobs).
EXAMPLE_BUILDERS = {"math": math_example, "code": code_example, "math_code": math_code_example}
