"""Generated skills and target: answers correct by construction, splits disjoint, sizes and
difficulty as set, the HF round trip, and the loader's column check."""

import ast
import json
import random

import pytest

from soups.data.datasets import (
    DataSettings,
    build_task_datasets,
    generate_rows,
    load_task_dataset,
)
from soups.data.generated import TARGET_INSTRUCTION
from soups.data.generated.pretrain import pretraining_example
from soups.data.generated.problems import word_problem
from soups.evaluation.scoring import extract_program, final_number

pytestmark = pytest.mark.unit
SMALL = DataSettings(seed=3, sizes={
    "math": {"train": 300, "validation": 50, "test": 50},
    "code": {"train": 300, "validation": 50, "test": 50},
    "math_code": {"train": 20, "validation": 50, "test": 50},
})


@pytest.fixture(scope="module")
def rows():
    return generate_rows(SMALL)


def _run(answer: str, function: str, args):
    namespace: dict = {}
    program = extract_program(answer, function)  # after the worked line, as the scorer does
    exec(compile(program, "<program>", "exec"), namespace)  # trusted: our own generator
    return namespace[function](*args)


def test_sizes(rows):
    for task, splits in SMALL.sizes.items():
        for split, n in splits.items():
            assert len(rows[task][split]) == n


def test_splits_disjoint_across_every_task(rows):
    owner = {}
    for task, splits in rows.items():
        for split, items in splits.items():
            for row in items:
                assert row["key"] not in owner, (row["key"], owner.get(row["key"]), task, split)
                owner[row["key"]] = (task, split)


def test_math_worked_solution_ends_with_true_answer(rows):
    for row in rows["math"]["train"]:
        expected = json.loads(row["expected"])[0]
        assert final_number(row["completion"]) == expected
        # every worked step is true arithmetic
        for step in row["completion"].split(". ")[:-1]:
            left, right = step.rstrip(".").split(" = ")
            assert eval(left.replace("/", "//")) == int(right)  # noqa: S307 (our own text)


@pytest.mark.parametrize("task", ["code", "math_code"])
def test_programs_return_expected(rows, task):
    for row in rows[task]["train"] + rows[task]["test"]:
        ast.parse(extract_program(row["completion"], row["function"]))
        calls, expected = json.loads(row["calls"]), json.loads(row["expected"])
        assert len(calls) == len(expected) >= 1
        got = [_run(row["completion"], row["function"], c) for c in calls]
        assert got == expected


def test_target_prompt_is_problem_plus_program_instruction(rows):
    row = rows["math_code"]["test"][0]
    assert row["key"] in row["prompt"] and TARGET_INSTRUCTION in row["prompt"]
    assert "\ndef solution():\n" in row["completion"]


def _worked_line_is_true(line: str) -> bool:
    left, right = line.rstrip(".").split(" = ")
    return eval(left.replace("/", "//")) == int(right)  # noqa: S307 (our own text)


def test_answers_share_the_worked_line():
    """What makes the skills compose (docs/embedded.md): the math answer, the code answer
    and the target answer of the same computation all start with the same worked line, and
    the program after it computes exactly that line."""
    rng = random.Random(5)
    for _ in range(300):
        problem = word_problem(rng, max_value=20, two_step_share=0.0)
        math_answer, target_answer = problem.worked_solution(), problem.worked_program()
        line = problem.worked_lines()
        assert math_answer == f"{line} The answer is {problem.answer}."
        assert target_answer.split("\n")[0] == line and _worked_line_is_true(line)
        program = target_answer.split("\n", 1)[1]
        assert program == problem.program()
        assert line.split(" = ")[0].replace("/", "//") in program  # the line's expression
    code = generate_rows(SMALL)["code"]["train"]
    solutions = [r for r in code if r["function"] == "solution"]
    assert len(solutions) > 100
    for row in solutions:
        first, program = row["completion"].split("\n", 1)
        assert _worked_line_is_true(first.split(". ")[-1])
        assert program.startswith("def solution():")


def test_answers_are_non_negative_integers():
    rng = random.Random(0)
    for _ in range(2000):
        problem = word_problem(rng, max_value=30, two_step_share=0.5)
        assert isinstance(problem.answer, int) and problem.answer >= 0
        assert _run(problem.program(), "solution", ()) == problem.answer


def test_difficulty_knobs():
    rng = random.Random(1)
    one_step = [word_problem(rng, 20, two_step_share=0.0) for _ in range(300)]
    assert all(len(p.steps) == 1 for p in one_step)
    two_step = [word_problem(rng, 20, two_step_share=1.0) for _ in range(300)]
    assert all(len(p.steps) == 2 for p in two_step)


def test_pretraining_corpus_has_no_skill_or_target():
    rng = random.Random(0)
    for _ in range(5000):
        question, answer = pretraining_example(rng)
        assert "Write a Python function" not in question
        assert "def solution" not in answer and "The answer is" not in answer
        # no word problem: no sentence with a person or an item and a question to compute
        assert not ("How many" in question and "buys" in question)


def test_generation_is_deterministic():
    assert generate_rows(SMALL) == generate_rows(SMALL)
    other = generate_rows(DataSettings(seed=4, sizes=SMALL.sizes))
    assert other["math"]["train"] != generate_rows(SMALL)["math"]["train"]


def test_impossible_sizes_raise_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="max_value must be at least 5, got 2"):
        DataSettings(max_value=2)
    # A problem space smaller than the sizes asked for: an error, not an endless loop.
    import soups.data.datasets

    monkeypatch.setitem(soups.data.datasets.EXAMPLE_BUILDERS, "math",
                        lambda rng, settings: {"key": str(rng.randint(0, 9))})
    with pytest.raises(ValueError, match="cannot draw 20 distinct math/train"):
        generate_rows(DataSettings(sizes={"math": {"train": 20}}))
    with pytest.raises(ValueError, match="'algebra'"):
        generate_rows(DataSettings(sizes={"algebra": {"train": 1}}))


def test_build_saves_and_reuses(tmp_path):
    out = build_task_datasets(tmp_path, SMALL)
    math_train = load_task_dataset(out / "math", "train")
    assert len(math_train) == 300 and math_train[0] == generate_rows(SMALL)["math"]["train"][0]
    stamp = (out / "settings.json").stat().st_mtime_ns
    assert build_task_datasets(tmp_path, SMALL) == out
    assert (out / "settings.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="'dev'"):
        load_task_dataset(out / "math", "dev")


def test_loader_refuses_a_dataset_without_the_task_columns(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    with pytest.raises(ValueError, match="missing column 'prompt'.*templates"):
        load_task_dataset(alpaca, "train")
