"""A study's tasks from real dataset schemas: sources, carving, templates and presets,
few-shot prompts, chat templates, raw text, references, decontamination, and the refusals
(test rows searched on, undefined columns)."""

from __future__ import annotations

import json

import pytest
import real_schemas
from conftest import build_tiny_llama

from soups.tasks.task_data import TaskData
from soups.tasks.task_spec import TaskSpec
from study.resolve import data_report, resolve_tasks
from study.spec import StudySpec, parse_model

pytestmark = pytest.mark.unit

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    out = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def assert_user_error(err: BaseException, *named: str) -> None:
    """A bad input's error: a ValueError (SoupsError, or pydantic's in a spec) naming each
    of `named`."""
    assert isinstance(err, ValueError), repr(err)
    for part in named:
        assert part in str(err), str(err)


def _task(name="t", model_dir=None, **spec) -> TaskData:
    task = TaskSpec(**spec)
    return TaskData(name, task, task.source, model_dir=model_dir, max_length=64)


def _gsm_hard(tmp_path, **extra) -> TaskData:
    path = real_schemas.gsm_hard(tmp_path / "gsm_hard.jsonl", n=40)
    return _task("gsm_hard", source=str(path), preset="pal",
                 carve={"split": "train", "sizes": {"validation": 10, "test": "rest"},
                        "key": "input"},
                 columns={"question": "input", "program": "code"}, expected="target",
                 scorer={"kind": "program", "abs_tol": 1e-3}, **extra)


def test_gsm_hard_is_carved_rendered_in_pal_and_scored_on_its_float_target(tmp_path):
    from soups.data.prompts import PRESETS, Template

    data = _gsm_hard(tmp_path)
    validation, test = data.rows("validation"), data.rows("test")
    assert (len(validation), len(test), len(data.rows("train"))) == (10, 30, 0)
    assert not {r["key"] for r in validation} & {r["key"] for r in test}
    source = {json.loads(line)["input"]: json.loads(line)
              for line in (tmp_path / "gsm_hard.jsonl").read_text().splitlines()}
    for row in validation + test:
        original = source[row["key"]]
        assert row["prompt"] == Template(PRESETS["pal"].prompt, "t", "prompt").render(
            {"question": original["input"]})
        assert row["completion"] == original["code"]
        assert json.loads(row["expected"]) == [int(original["target"])]
        assert (row["function"], json.loads(row["calls"])) == ("solution", [[]])
    assert data.rows("validation") == validation  # deterministic


def test_fewshot_demos_come_before_each_evaluation_prompt_only(tmp_path):
    from soups.data.prompts import PRESETS

    data = _gsm_hard(tmp_path, fewshot={"source": "preset", "n": 8})
    rows = data.rows("validation", 2)
    prompts = data.eval_prompts(rows)
    demos = data.demos()
    assert len(demos) == 8 and len(PRESETS["pal"].demos) >= 8
    prefix = "".join(p + c + "\n\n" for p, c in demos)
    assert prompts == [prefix + r["prompt"] for r in rows]
    assert all(not r["prompt"].startswith(prefix) for r in rows)  # training rows: no demos


def test_fewshot_from_the_tasks_own_train_rows_sampled_with_a_seed(tmp_path):
    path = real_schemas.gsm8k(tmp_path / "gsm8k.parquet", n=20)
    spec = dict(source=str(path), preset="soups_qa",
                carve={"split": "train", "sizes": {"validation": 5, "test": 5, "train": "rest"}},
                columns={"answer": "answer"}, expected="answer",
                scorer={"kind": "number", "extract": "hashes"},
                fewshot={"source": "task", "n": 3, "sampler": "seeded", "seed": 7})
    data = _task("gsm8k", **spec)
    train = {(r["prompt"], r["completion"]) for r in data.rows("train")}
    demos = data.demos()
    assert len(demos) == 3 and set(demos) <= train
    assert demos == _task("gsm8k", **spec).demos()
    assert json.loads(data.rows("test")[0]["expected"])[0] == int(
        data.rows("test")[0]["completion"].rsplit("#### ", 1)[1])


def test_alpaca_preset_renders_codealpaca_with_and_without_input(tmp_path):
    path = real_schemas.codealpaca(tmp_path / "code.json", n=8)
    data = _task("code", source=str(path), preset="alpaca", scorer="loss",
                 splits={"train": "train"})
    rows = data.rows("train")
    raw = json.loads(path.read_text())
    with_input = [r for r, s in zip(rows, raw, strict=True) if s["input"]]
    without = [r for r, s in zip(rows, raw, strict=True) if not s["input"]]
    assert with_input and without
    assert all("### Input:" in r["prompt"] for r in with_input)
    assert all("### Input:" not in r["prompt"] for r in without)
    assert [r["completion"] for r in rows] == [s["output"] for s in raw]
    assert data.rows("validation") == []  # a one-split source, not carved: train only


def test_metamathqa_columns_map_onto_the_alpaca_preset(tmp_path):
    path = real_schemas.metamathqa(tmp_path / "mm.jsonl", n=6)
    data = _task("math", source=str(path), preset="alpaca",
                 columns={"instruction": "query", "output": "response"}, expected="response",
                 scorer={"kind": "number", "extract": "answer_is"}, splits={"train": "train"})
    row, source = data.rows("train")[0], json.loads(path.read_text().splitlines()[0])
    assert source["query"] in row["prompt"] and row["completion"] == source["response"]
    assert row["key"].startswith(source["query"])


def test_squad_v2_answers_through_a_template_with_exact_match(tmp_path):
    path = real_schemas.squad_v2(tmp_path / "squad.jsonl")
    data = _task("qa", source=str(path), splits={"train": "train"},
                 prompt="{{ context }}\nQ: {{ question }}\nA:",
                 completion="{{ answers.text[0] if answers.text else 'unanswerable' }}",
                 expected="{{ answers.text[0] if answers.text else 'unanswerable' }}",
                 scorer="exact_match")
    rows = data.rows("train")
    assert [json.loads(r["expected"]) for r in rows] == [["4 litres"], ["every 30 days"],
                                                         ["unanswerable"]]
    assert rows[0]["prompt"].endswith("Q: How much does it hold?\nA:")


def test_a_row_filter_keeps_matching_rows_before_carving(tmp_path):
    path = real_schemas.metamathqa(tmp_path / "mm.jsonl", n=10, also=["Q1?", "Q2?"])
    data = _task("math", source=str(path), preset="soups_qa", splits={"train": "train"},
                 columns={"question": "query", "answer": "response"},
                 filter="type == 'GSM_Rephrased'")
    assert [r["key"] for r in data.rows("train")] == ["Q1?", "Q2?"]


def test_raw_text_becomes_blocks_with_the_loss_on_every_token(tmp_path, model_dir):
    path = real_schemas.manual(tmp_path / "manual.txt", copies=5)
    data = _task("manual", model_dir=model_dir, source=str(path), scorer="loss")
    rows = data.rows("train")
    assert len(rows) > 1
    assert "".join(r["completion"] for r in rows) == path.read_text()
    assert all(r["prompt"] == "" for r in rows)


def test_chat_template_renders_training_and_evaluation_alike(tmp_path, model_dir):
    path = real_schemas.alpaca_cleaned(tmp_path / "alpaca.json", n=4)
    data = _task("chat", model_dir=model_dir, source=str(path), splits={"train": "train"},
                 prompt="instruction", completion="output", scorer="loss",
                 chat_template="tokenizer")
    row = data.rows("train")[0]
    raw = json.loads(path.read_text())[0]
    assert row["prompt"] == f"<|user|>\n{raw['instruction']}</s>\n<|assistant|>\n"
    assert row["completion"] == f"{raw['output']}</s>\n"
    assert data.eval_prompts([row]) == [row["prompt"]]


def test_an_undefined_column_names_task_template_and_column(tmp_path):
    path = real_schemas.gsm_hard(tmp_path / "g.jsonl", n=4)
    data = _task("gsm_hard", source=str(path), splits={"train": "train"},
                 prompt="{{ question }}", completion="code", scorer="loss")
    with pytest.raises(Exception) as caught:
        data.rows("train")
    assert_user_error(caught.value, "gsm_hard", "prompt", "question")


def _study(tmp_path, planted: int = 0) -> StudySpec:
    gsm = real_schemas.gsm_hard(tmp_path / "gsm_hard.jsonl", n=30)
    questions = real_schemas.gsm_hard_questions(gsm)
    math = real_schemas.metamathqa(tmp_path / "mm.jsonl", n=20, also=questions[:planted])
    code = real_schemas.codealpaca(tmp_path / "code.json", n=10)
    return parse_model(StudySpec, {
        "base_model": "unused",
        "skills": {
            "math": {"source": str(math), "preset": "soups_qa", "splits": {"train": "train"},
                     "columns": {"question": "query", "answer": "response"}},
            "code": {"source": str(code), "preset": "alpaca", "scorer": "loss",
                     "splits": {"train": "train"}}},
        "target": {"gsm_hard": {
            "source": str(gsm), "preset": "pal", "expected": "target", "scorer": "program",
            "columns": {"question": "input", "program": "code"},
            "carve": {"split": "train", "sizes": {"validation": 10, "test": "rest"}}}},
        "objective": {"task": "gsm_hard"}}, "test study")


def test_target_rows_planted_in_a_skill_are_removed_and_counted(tmp_path):
    tasks = resolve_tasks(_study(tmp_path, planted=5))
    report = data_report(tasks)
    assert report["math"]["decontaminated"] == 5
    assert report["math"]["rows"]["train"] == 20
    assert report["code"]["decontaminated"] == 0
    assert report["gsm_hard"]["rows"] == {"train": 0, "validation": 10, "test": 20}
    fingerprint = report["gsm_hard"]["fingerprint"]
    assert fingerprint["kind"] == "file" and len(fingerprint["sha256"]) == 64
    assert fingerprint["carved"] == {"validation": 10, "test": 20}


def test_searching_on_the_test_split_is_refused(tmp_path):
    path = real_schemas.gsm8k(tmp_path / "gsm8k.parquet", n=4)
    with pytest.raises(Exception) as caught:
        TaskSpec(source=str(path), splits={"train": "train", "validation": "test",
                                           "test": "test"})
    assert_user_error(caught.value, "validation and test are the same split", "'test'")


def test_a_target_without_validation_rows_is_refused(tmp_path):
    spec = _study(tmp_path)
    target = spec.target["gsm_hard"].model_copy(update={"carve": None})
    spec = spec.model_copy(update={"target": {"gsm_hard": target}})
    with pytest.raises(Exception) as caught:
        resolve_tasks(spec)
    assert_user_error(caught.value, "gsm_hard", "no validation rows")


@pytest.mark.parametrize(("spec", "message"), [
    ({"source": "generated", "preset": "pal"}, "'preset' applies to datasets only"),
    ({"source": "x.jsonl", "preset": "chatml"}, "unknown preset 'chatml'"),
    ({"source": "x.txt", "scorer": "program"}, "raw-text task is scored by its loss"),
    ({"source": None}, "set the task's source"),
    ({"source": "x.jsonl", "fewshot": {"source": "task", "split": "test", "n": 2}},
     "must come from its train split"),
    ({"source": "x.jsonl", "scorer": {"kind": "bleu"}}, "unknown scorer 'bleu'"),
])
def test_bad_task_settings_are_named(spec, message):
    with pytest.raises(Exception) as caught:
        TaskSpec(**spec)
    assert_user_error(caught.value, message)


def test_the_task_schema_reads_its_defaults_from_the_core_settings():
    from dataclasses import fields

    from soups.evaluation.evaluate import GenerationSettings
    from soups.evaluation.scoring import ScorerSettings

    assert set(TaskSpec.model_fields["scorer"].annotation.model_fields) == {
        f.name for f in fields(ScorerSettings)}
    assert TaskSpec().scorer.settings() == ScorerSettings()
    default = GenerationSettings()
    assert TaskSpec().generation_settings(default.max_new_tokens,
                                          default.batch_size) == default
    from soups.data.prompts import PRESETS

    pal = TaskSpec(preset="pal", source="x.jsonl").generation_settings(10, 4)
    assert (pal.stop, pal.max_new_tokens, pal.batch_size) == (PRESETS["pal"].stop, 10, 4)


def test_a_trial_evaluates_each_task_on_its_settings_and_writes_its_generations(
        tmp_path, model_dir):
    from study.spec import Evaluation
    from trainables.evaluator import evaluate_candidate
    from trainables.trial_context import TrialContext

    gsm8k = real_schemas.gsm8k(tmp_path / "gsm8k.parquet", n=12)
    code = real_schemas.codealpaca(tmp_path / "code.json", n=12)
    carve = {"split": "train", "sizes": {"validation": 4, "test": 4, "train": "rest"}}
    tasks = {
        "gsm8k": _task("gsm8k", model_dir, source=str(gsm8k), preset="soups_qa", carve=carve,
                       columns={"answer": "answer"}, expected="answer",
                       generation={"max_new_tokens": 5, "stop": ["\n"]},
                       scorer={"kind": "number", "extract": "hashes"}),
        "code": _task("code", model_dir, source=str(code), preset="alpaca", carve=carve,
                      scorer="loss"),
    }
    evaluation = Evaluation(device="cpu", dtype="float32").model_dump()
    ctx = TrialContext(study="s", experiment_id="0", tracking_uri="", parent_run_id="",
                       model_dir=model_dir, skills=("code",), target="gsm8k", tasks=tasks,
                       adapters={}, evaluation=evaluation, cat={})
    metrics = evaluate_candidate(ctx, None, "validation", ["gsm8k", "code"], None, tmp_path)
    assert 0.0 <= metrics["validation/gsm8k/accuracy"] <= 1.0
    assert metrics["validation/code/loss"] > 0 and "validation/code/accuracy" not in metrics
    records = [json.loads(line) for line in
               (tmp_path / "validation" / "gsm8k.jsonl").read_text().splitlines()]
    rows = tasks["gsm8k"].rows("validation")
    assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
    assert [r["reference"] for r in records] == [json.loads(r["expected"])[0] for r in rows]
    assert all("\n" not in r["output"] for r in records)  # cut at the task's stop sequence
    assert len((tmp_path / "validation" / "code.jsonl").read_text().splitlines()) == 4


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The generated tasks, small."""
    from soups.data.datasets import DataSettings, build_task_datasets

    sizes = {"math": {"train": 6, "validation": 4, "test": 4},
             "math_code": {"train": 2, "validation": 4, "test": 4}}
    return build_task_datasets(tmp_path_factory.mktemp("data"), DataSettings(sizes=sizes))


def test_a_generated_task_uses_an_instruct_bases_chat_template_by_default(generated,
                                                                           model_dir):
    """An instruct base (a tokenizer with a chat template) is trained and evaluated in its
    chat format by default, the question alone as the user's turn; the same rows in plain
    form without a template or with chat_template none."""
    from soups.data.generated import format_prompt, question_of

    chat = TaskData("math", TaskSpec(), str(generated / "math"), model_dir=model_dir)
    plain = TaskData("math", TaskSpec(chat_template="none"), str(generated / "math"),
                     model_dir=model_dir)
    assert chat.uses_chat() and not plain.uses_chat()
    for role in ("train", "validation"):
        for c, p in zip(chat.rows(role), plain.rows(role), strict=True):
            question = question_of(p["prompt"])
            assert p["prompt"] == format_prompt(question) and question in p["prompt"]
            assert c["prompt"] == f"<|user|>\n{question}</s>\n<|assistant|>\n"
            assert c["completion"] == f"{p['completion']}</s>\n" and c["key"] == p["key"]
    rows = chat.rows("validation")
    assert chat.eval_prompts(rows) == [r["prompt"] for r in rows]  # as trained
    assert plain.eval_prompts(plain.rows("validation")) == [
        r["prompt"] for r in plain.rows("validation")]
    embedded = TaskData("math", TaskSpec(), str(generated / "math"),
                        model_dir=build_tiny_llama(model_dir + "-plain"))  # no template
    assert not embedded.uses_chat()
    assert embedded.rows("train")[0]["prompt"] == plain.rows("train")[0]["prompt"]
