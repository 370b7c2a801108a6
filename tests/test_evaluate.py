"""Evaluation: batched greedy generation equals one-at-a-time generation, answer parsing,
and scoring (a correct answer scores 1, a wrong one 0, partial credit as defined)."""

import json

import pytest
import torch
from conftest import assert_user_error

from soups.evaluate import evaluate_rows, generate, load_model
from soups.scoring import extract_program, final_number, score_final_number, score_programs

pytestmark = pytest.mark.unit


def test_final_number_parsing():
    assert final_number("25 - 9 = 16. The answer is 16.") == 16
    assert final_number("so 3 and then 1,250") == 1250
    assert final_number("The answer is 7. Later 9") == 7
    assert final_number("x = 2.5") == 2.5
    assert final_number("no digits") is None


def test_extract_program():
    assert extract_program("```python\ndef f():\n    return 1\n```\nok") == \
        "def f():\n    return 1\n"
    assert extract_program("def f():\n    return 1") == "def f():\n    return 1"


def _row(expected, scorer="final_number", function="", calls="[]"):
    return {"prompt": "p", "scorer": scorer, "function": function, "calls": calls,
            "expected": json.dumps(expected)}


def test_score_final_number():
    rows = [_row([16]), _row([16]), _row([3])]
    records, partial = score_final_number(rows, ["The answer is 16.", "16 then 15",
                                                 "The answer is 4."])
    assert [r["correct"] for r in records] == [True, False, False]
    assert partial == {"answered": pytest.approx(2 / 3)}


def test_score_programs_partial_credit():
    rows = [_row([5], "program", "solution", "[[]]")] * 4 + \
        [_row([3, 7], "program", "add", "[[1, 2], [3, 4]]")]
    answers = [
        "def solution():\n    a = 2\n    b = 3\n    result = a + b\n    return result",  # right
        "def solution():\n    return 4",  # runs, wrong
        "def solution():\n    return 1 / 0",  # parses, crashes
        "def solution(:\n    return 5",  # does not parse
        "def add(x, y):\n    return x + y",  # right on both held-out calls
    ]
    records, partial = score_programs(rows, answers)
    assert [r["correct"] for r in records] == [True, False, False, False, True]
    assert [r["ran"] for r in records] == [True, True, False, False, True]
    assert [r["parsed"] for r in records] == [True, True, True, False, True]
    assert partial == {"parsed": 0.8, "ran": 0.6}


def test_batched_generation_equals_one_by_one(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    prompts = ["### Question:\nTom has 25 apples.\n### Answer:\n", "### Question:\nHi\n",
               "### Question:\nWrite a Python function solution() that returns 7 times 8.\n"
               "### Answer:\n"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0]
              for p in prompts]
    assert batched == single
    # and equals a manual greedy loop without the KV cache
    bos = [tokenizer.bos_token_id]
    ids = torch.tensor([bos + tokenizer(prompts[0], add_special_tokens=False)["input_ids"]])
    n_prompt = ids.shape[1]
    with torch.no_grad():
        for _ in range(12):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    manual = tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()
    assert batched[0] == manual.split("\n### Question")[0].split("\n### Answer")[0].strip()


def test_evaluate_rows_rejects_unknown_scorer(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="'bleu'"):
        evaluate_rows(model, tokenizer, "t", [_row([1], scorer="bleu")])


def test_evaluate_command_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
    """A model, datasets folder, task, split or adapter that is not there (or not what it
    should be) stops `soups evaluate` with exit status 2 and one line naming it."""
    from datasets import Dataset, DatasetDict

    from soups.adapters import LoraModule, save_adapter

    data = tmp_path / "data"
    rows = [{"key": "k", "prompt": "### Question:\nTom has 2 apples.\n### Answer:\n",
             "completion": "The answer is 2.", **_row([2])}]
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(data / "math"))
    module = "model.layers.0.self_attn.q_proj"
    lora = {module: LoraModule(A=torch.ones(2, 32), B=torch.zeros(32, 2), scaling=1.0)}
    good = save_adapter(tmp_path / "good", lora, {"base_model_name_or_path": tiny_model_dir})
    wide = save_adapter(tmp_path / "wide", {module: LoraModule(
        A=torch.ones(2, 48), B=torch.ones(48, 2), scaling=1.0)}, {})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not an adapter")

    def evaluate(*args, model=tiny_model_dir, data=data, task="math"):
        return ["evaluate", "--model", model, "--data", data, "--task", task, "--limit", "1",
                *args]

    for args, named in [
        (evaluate(model=tmp_path / "no_model"), [tmp_path / "no_model", "no such folder"]),
        (evaluate(model=data), [data, "config.json"]),
        (evaluate(data=tmp_path / "no_data"), [tmp_path / "no_data"]),
        (evaluate(task="chess"), ["'chess'", data, "tasks there: math"]),
        (evaluate("--split", "dev"), ["'dev'", data / "math"]),
        (evaluate("--adapter", tmp_path / "absent"), [tmp_path / "absent", "no such folder"]),
        (evaluate("--adapter", tmp_path / "plain"), [tmp_path / "plain", "adapter_config"]),
        (evaluate("--adapter", wide), [wide, module, "48 x 48", "32 x 32"]),
    ]:
        assert_user_error(args, *named)
    model, _ = load_model(tiny_model_dir, good)  # an adapter of the model passes the check
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
