"""Prompt templates, presets, few-shot demonstrations and chat formatting.

A task's rows are turned into text by two templates, `prompt` and `completion`. A template
is either a bare column name (`question`: that column's value) or a Jinja2 template
(`Q: {{ question }}`), rendered in Jinja's immutable sandbox with `StrictUndefined`, so a
template that names a column the rows lack fails loudly instead of rendering "".

`PRESETS` are ready-made pairs of templates with their stop strings and demonstrations:
`soups_qa` (the embedded `### Question:` format of `soups.data.generated`), `alpaca` (the Alpaca
instruction format) and `pal` (program-aided math: questions answered by a `solution()`
program).

`PromptFormat` builds the text a model sees: for evaluation, optional few-shot demos and
the prompt, plain or through the tokenizer's chat template; for training, the (prompt part,
completion part) split of the trained text, which `soups.training.text_batches.encode_example`
tokenizes with the loss on the completion part.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import jinja2
import jinja2.meta
import jinja2.sandbox

from soups.errors import SoupsError

DemoSampler = Literal["first_n", "seeded"]
DEMO_SAMPLERS = ("first_n", "seeded")


class TemplateError(SoupsError):
    """A template that does not compile or does not fit a task's rows, an unknown preset,
    a few-shot request the demonstrations cannot meet, or a chat format the tokenizer
    cannot render."""


# One environment for every template: sandboxed (templates come from study files), strict
# (a misspelt column is an error, not ""), and keeping a template's final newline (prompts
# end with one: `### Answer:\n`). No autoescaping: the text is for a model, not HTML.
_ENVIRONMENT = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _is_column_name(source: str) -> bool:
    """A bare column name (`question`) rather than a Jinja template."""
    return source.isidentifier()


class Template:
    """One template of a task (`what`: "prompt", "completion", ...), compiled once.

    `source` is a bare column name (a Python identifier: the column's value as str) or a
    Jinja2 template over the row's columns."""

    def __init__(self, source: str, task: str, what: str):
        self.source, self.task, self.what = source, task, what
        self._column = source if _is_column_name(source) else None
        self._compiled = None if self._column else self._compile()
        self._names = set() if self._column else self._referenced_names()

    def _compile(self) -> jinja2.Template:
        try:
            return _ENVIRONMENT.from_string(self.source)
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(
                f"task {self.task}: {self.what} template {self.source!r} does not compile: "
                f"{err.message} (line {err.lineno})") from None

    def _referenced_names(self) -> set[str]:
        """The top-level names the template reads (to name the missing column on error)."""
        return jinja2.meta.find_undeclared_variables(_ENVIRONMENT.parse(self.source))

    def render(self, row: dict) -> str:
        """The template's text for one row (values rendered with str, as Jinja does)."""
        if self._column is not None:
            if self._column not in row:
                raise self._missing_columns_error([self._column], row)
            return str(row[self._column])
        try:
            return self._compiled.render(row)
        except jinja2.UndefinedError as err:
            missing = sorted(name for name in self._names if name not in row)
            if missing:
                raise self._missing_columns_error(missing, row) from None
            raise self._render_error(err) from None  # e.g. a missing attribute of a column
        except jinja2.TemplateError as err:  # the sandbox refused an operation, ...
            raise self._render_error(err) from None

    def _missing_columns_error(self, missing: list[str], row: dict) -> TemplateError:
        columns = ", ".join(missing)
        return TemplateError(
            f"task {self.task}: {self.what} template {self.source!r} uses column(s) "
            f"{columns} that the row does not have; the row's columns: {sorted(row)}")

    def _render_error(self, err: Exception) -> TemplateError:
        return TemplateError(
            f"task {self.task}: {self.what} template {self.source!r} does not render: {err}")

    def __repr__(self) -> str:
        return f"Template({self.source!r}, task={self.task!r}, what={self.what!r})"


def render_pairs(prompt: Template, completion: Template,
                 rows: Iterable[dict]) -> tuple[tuple[str, str], ...]:
    """(prompt, completion) texts of `rows`: the form `PromptFormat.demos` takes."""
    return tuple((prompt.render(row), completion.render(row)) for row in rows)


@dataclass(frozen=True)
class Preset:
    """A ready-made prompt format: templates over named columns, the strings that end a
    generated answer, and demonstration rows (with those columns) for few-shot prompts."""

    name: str
    prompt: str
    completion: str
    stop: tuple[str, ...]
    demos: tuple[dict, ...]
    description: str
    # What identifies a row for decontamination (the question, not the preset's wrapping
    # text), so tasks in different formats still compare on their content.
    key: str = "{{ question }}"


SOUPS_QA = Preset(
    name="soups_qa",
    prompt="### Question:\n{{ question }}\n### Answer:\n",
    completion="{{ answer }}",
    stop=("\n### Question", "\n### Answer"),
    demos=(
        {"question": "Mia has 12 pencils. She buys 7 more. How many pencils does Mia have now?",
         "answer": "12 + 7 = 19. The answer is 19."},
        {"question": "A baker makes 45 rolls and sells 18 of them. How many rolls are left?",
         "answer": "45 - 18 = 27. The answer is 27."},
        {"question": "Leo buys 6 boxes with 8 crayons in each. How many crayons does Leo "
                     "have?",
         "answer": "6 * 8 = 48. The answer is 48."},
        {"question": "Ava had 30 stickers. She gave 12 stickers to Ben and then shared the "
                     "rest equally among 3 friends. How many stickers did each friend get?",
         "answer": "30 - 12 = 18. 18 / 3 = 6. The answer is 6."},
    ),
    description="The embedded format of soups.data.generated: '### Question:' / '### Answer:', "
                "answers worked out step by step and ending 'The answer is N.'",
)

ALPACA = Preset(
    name="alpaca",
    prompt=(
        "Below is an instruction that describes a task"
        "{% if input is defined and input %}, paired with an input that provides further "
        "context{% endif %}. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{{ instruction }}\n\n"
        "{% if input is defined and input %}### Input:\n{{ input }}\n\n{% endif %}"
        "### Response:\n"
    ),
    completion="{{ output }}",
    stop=("\n### Instruction", "\n\nBelow is an instruction"),
    demos=(
        {"instruction": "Write a Python function that returns the square of a number.",
         "input": "",
         "output": "def square(x):\n    return x * x"},
        {"instruction": "Write a Python function that returns the largest value in a list.",
         "input": "[3, 9, 4]",
         "output": "def largest(values):\n    return max(values)"},
        {"instruction": "Write a Python function that reverses a string.",
         "input": "",
         "output": "def reverse(text):\n    return text[::-1]"},
    ),
    description="The Alpaca instruction format (instruction, optional input, response); "
                "the rows need the columns instruction and output, and may have input.",
    key="{{ instruction }}{% if input is defined and input %}\n{{ input }}{% endif %}",
)

PAL = Preset(
    name="pal",
    prompt="Q: {{ question }}\n\n# solution in Python:\n",
    completion="{{ program }}",
    stop=("\nQ:", "\n\n\n"),
    demos=(
        {"question": "Olivia has 23 dollars. She buys 5 bagels for 3 dollars each. How much "
                     "money does she have left?",
         "program": "def solution():\n    money_initial = 23\n    bagels = 5\n"
                    "    bagel_cost = 3\n    money_spent = bagels * bagel_cost\n"
                    "    result = money_initial - money_spent\n    return result",
         "answer": 8},
        {"question": "Michael had 58 golf balls. On Tuesday he lost 23 golf balls. On "
                     "Wednesday he lost 2 more. How many golf balls did he have at the end "
                     "of Wednesday?",
         "program": "def solution():\n    golf_balls_initial = 58\n"
                    "    lost_tuesday = 23\n    lost_wednesday = 2\n"
                    "    result = golf_balls_initial - lost_tuesday - lost_wednesday\n"
                    "    return result",
         "answer": 33},
        {"question": "There were 9 computers in the server room. Five more computers were "
                     "installed each day, from Monday to Thursday. How many computers are "
                     "now in the server room?",
         "program": "def solution():\n    computers_initial = 9\n    per_day = 5\n"
                    "    days = 4\n    computers_added = per_day * days\n"
                    "    result = computers_initial + computers_added\n    return result",
         "answer": 29},
        {"question": "A farmer has 84 eggs and packs them into cartons of 12. How many "
                     "cartons does he fill?",
         "program": "def solution():\n    eggs = 84\n    per_carton = 12\n"
                    "    result = eggs // per_carton\n    return result",
         "answer": 7},
        {"question": "Sara reads 15 pages every day. How many pages does she read in 2 "
                     "weeks?",
         "program": "def solution():\n    pages_per_day = 15\n    days = 2 * 7\n"
                    "    result = pages_per_day * days\n    return result",
         "answer": 210},
        {"question": "A class has 32 students. A quarter of them walk to school and the rest "
                     "take the bus. How many students take the bus?",
         "program": "def solution():\n    students = 32\n    walkers = students // 4\n"
                    "    result = students - walkers\n    return result",
         "answer": 24},
        {"question": "Tom buys 3 shirts at 12 dollars each and a hat for 9 dollars. He pays "
                     "with a 50 dollar bill. How much change does he get?",
         "program": "def solution():\n    shirts = 3\n    shirt_cost = 12\n    hat_cost = 9\n"
                    "    paid = 50\n    total_cost = shirts * shirt_cost + hat_cost\n"
                    "    result = paid - total_cost\n    return result",
         "answer": 5},
        {"question": "A tank holds 120 litres of water. 35 litres are used in the morning "
                     "and twice as much in the evening. How many litres are left?",
         "program": "def solution():\n    tank = 120\n    morning = 35\n"
                    "    evening = 2 * morning\n    result = tank - morning - evening\n"
                    "    return result",
         "answer": 15},
    ),
    description="Program-aided math: a word problem answered by a `def solution():` "
                "program that returns the answer; the rows need question and program.",
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (SOUPS_QA, ALPACA, PAL)}


def preset_names() -> tuple[str, ...]:
    """The known preset names, sorted."""
    return tuple(sorted(PRESETS))


def get_preset(name: str, task: str) -> Preset:
    """The preset `name`; TemplateError naming `task` and the known presets otherwise."""
    if name not in PRESETS:
        raise TemplateError(f"task {task}: unknown prompt preset {name!r}; known presets: "
                            f"{', '.join(preset_names())}")
    return PRESETS[name]


def select_demos(rows: Sequence[dict], n: int, sampler: DemoSampler,
                 seed: int = 0) -> list[dict]:
    """`n` demonstration rows: the first n (`first_n`), or n drawn without replacement by
    `random.Random(seed)` (`seeded`: the same seed draws the same demos in every trial)."""
    if sampler not in DEMO_SAMPLERS:
        raise TemplateError(f"unknown demo sampler {sampler!r}; known: "
                            f"{', '.join(DEMO_SAMPLERS)}")
    if n < 0 or n > len(rows):
        raise TemplateError(f"{n} few-shot demos requested, but there are {len(rows)} "
                            f"demonstration rows (n must be 0 to {len(rows)})")
    if sampler == "first_n":
        return list(rows[:n])
    return random.Random(seed).sample(list(rows), n)


@dataclass(frozen=True)
class PromptFormat:
    """How prompts reach the model: plain text or the tokenizer's chat template, with
    few-shot demos ((prompt, completion) texts) before evaluation prompts."""

    chat: bool = False
    demos: tuple[tuple[str, str], ...] = ()
    demo_separator: str = "\n\n"

    def generation_prompt(self, tokenizer, prompt: str) -> str:
        """The text a model continues to answer `prompt`: the demos then the prompt, as
        plain text or as chat turns (one user and one assistant turn per demo)."""
        if not self.chat:
            shots = "".join(demo_prompt + demo_completion + self.demo_separator
                            for demo_prompt, demo_completion in self.demos)
            return shots + prompt
        messages = []
        for demo_prompt, demo_completion in self.demos:
            messages += [_turn("user", demo_prompt), _turn("assistant", demo_completion)]
        messages.append(_turn("user", prompt))
        return _render_chat(tokenizer, messages, add_generation_prompt=True)

    def training_text(self, tokenizer, prompt: str, completion: str) -> tuple[str, str]:
        """(prompt part, completion part) of one training example; their concatenation is
        the text trained on. Demos are left out: they are for evaluation prompts only.

        With chat, the prompt part is the generation prompt of the user turn, so the loss
        lands on the assistant turn (and its end-of-turn marker) only."""
        if not self.chat:
            return prompt, completion
        full = _render_chat(tokenizer, [_turn("user", prompt), _turn("assistant", completion)])
        head = _render_chat(tokenizer, [_turn("user", prompt)], add_generation_prompt=True)
        if not full.startswith(head):
            raise TemplateError(
                f"the chat template of tokenizer {_tokenizer_name(tokenizer)!r} does not "
                f"extend the generation prompt: the conversation with the answer does not "
                f"start with the prompt rendered for generation ({head!r}), so the loss "
                f"cannot be put on the answer alone")
        return head, full[len(head):]


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(
            f"chat prompts need a chat template, but tokenizer "
            f"{_tokenizer_name(tokenizer)!r} has none; use plain prompts (chat: false) or a "
            f"tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
