"""Prompt templates, presets, few-shot demos and chat formats (soups/data/prompts.py), and the
offset-masked tokenization of `soups.training.text_batches` that trains on their text."""

from __future__ import annotations

import ast
import copy
import re

import pytest
from conftest import TINY_CORPUS, raises_naming

from soups.data.generated import format_prompt
from soups.data.prompts import (
    PRESETS,
    PromptFormat,
    Template,
    TemplateError,
    get_preset,
    preset_names,
    render_pairs,
    select_demos,
)
from soups.errors import SoupsError
from soups.training.text_batches import (
    IGNORE_INDEX,
    encode_dataset,
    encode_example,
    pad_token_id,
    prompt_ids,
)
from soups.training.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE of the project (about a second to train)."""
    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=400, max_number=50)
    tokenizer.name_or_path = "tiny-tok"
    return tokenizer


@pytest.fixture(scope="module")
def chat_tok(tok):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _error(call, *named) -> str:
    return raises_naming(TemplateError, call, *named)


# --- Template -------------------------------------------------------------------------------


def test_a_template_error_is_a_soups_error():
    assert issubclass(TemplateError, SoupsError) and issubclass(TemplateError, ValueError)


def test_a_bare_column_name_renders_that_column_as_str():
    assert Template("question", "math", "prompt").render({"question": "2 + 2?"}) == "2 + 2?"
    assert Template("target", "math", "completion").render({"target": 3.0}) == "3.0"
    assert Template("n", "math", "completion").render({"n": 7}) == "7"


def test_a_jinja_template_renders_and_keeps_its_final_newline():
    template = Template("Q: {{ question }}\nA: {{ n }}\n", "math", "prompt")
    assert template.render({"question": "how many?", "n": 3.0}) == "Q: how many?\nA: 3.0\n"


def test_values_are_not_html_escaped():
    template = Template("{{ code }}", "code", "completion")
    assert template.render({"code": "if a < b & c:"}) == "if a < b & c:"


def test_a_syntax_error_names_task_what_and_source():
    source = "Q: {{ question }"
    message = _error(lambda: Template(source, "math", "prompt"), "math", "prompt", repr(source))
    assert "does not compile" in message


def test_a_missing_column_names_it_and_lists_the_rows_columns():
    template = Template("Q: {{ question }} {{ hint }}", "gsm8k", "prompt")
    message = _error(lambda: template.render({"question": "x", "answer": "y"}),
                     "gsm8k", "prompt", "hint", "['answer', 'question']")
    assert "question that" not in message  # only the missing column is named as missing


def test_a_missing_bare_column_is_the_same_error():
    template = Template("answer", "gsm8k", "completion")
    _error(lambda: template.render({"question": "x"}), "gsm8k", "completion", "answer",
           "['question']")


def test_a_condition_on_a_missing_column_is_an_error_too():
    template = Template("{% if input %}{{ input }}{% endif %}", "code", "prompt")
    _error(lambda: template.render({"instruction": "x"}), "code", "prompt", "input")


def test_a_missing_attribute_of_a_column_is_a_template_error():
    template = Template("{{ meta.source }}", "math", "prompt")
    _error(lambda: template.render({"meta": {"id": 1}}), "math", "prompt", "does not render")


def test_the_sandbox_refuses_unsafe_access():
    template = Template("{{ ''.__class__.__mro__[1].__subclasses__() }}", "math", "prompt")
    _error(lambda: template.render({}), "math", "prompt")


# --- Presets --------------------------------------------------------------------------------


def test_the_presets_are_exactly_these():
    assert set(PRESETS) == {"soups_qa", "alpaca", "pal"}
    assert preset_names() == ("alpaca", "pal", "soups_qa")
    assert all(name == preset.name for name, preset in PRESETS.items())


@pytest.mark.parametrize("question", [
    "Tom has 25 apples. He gives 9 to Sam. How many apples are left?",
    "Write {a} and {{b}} and {% raw %} literally.\nSecond line\n",
    "a < b & c > d", "",
])
def test_soups_qa_is_the_embedded_format(question):
    prompt = Template(get_preset("soups_qa", "math").prompt, "math", "prompt")
    assert prompt.render({"question": question}) == format_prompt(question)


def test_soups_qa_demos_are_worked_in_the_embedded_style():
    demos = PRESETS["soups_qa"].demos
    assert len(demos) == 4
    symbols = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for demo in demos:
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", demo["answer"])
        assert steps, demo
        for left, op, right, result in steps:
            assert symbols[op](int(left), int(right)) == int(result), demo
        assert demo["answer"].endswith(f" The answer is {steps[-1][3]}."), demo


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSum the list.\n\n### Input:\n[1, 2]\n\n### Response:\n")
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_alpaca_with_and_without_input():
    prompt = Template(PRESETS["alpaca"].prompt, "code", "prompt")
    assert prompt.render({"instruction": "Sum the list.", "input": "[1, 2]"}) == (
        ALPACA_WITH_INPUT)
    assert prompt.render({"instruction": "Say hi.", "input": ""}) == ALPACA_WITHOUT_INPUT


def test_alpaca_demos_are_python_with_and_without_input():
    demos = PRESETS["alpaca"].demos
    assert len(demos) == 3
    assert {bool(demo["input"]) for demo in demos} == {True, False}
    for demo in demos:
        assert isinstance(ast.parse(demo["output"]).body[0], ast.FunctionDef), demo


def test_pal_prompt():
    prompt = Template(PRESETS["pal"].prompt, "math_code", "prompt")
    assert prompt.render({"question": "What is 2 + 3?"}) == (
        "Q: What is 2 + 3?\n\n# solution in Python:\n")


@pytest.mark.parametrize("demo", PRESETS["pal"].demos, ids=lambda demo: str(demo["answer"]))
def test_every_pal_demo_program_returns_its_answer(demo):
    program = demo["program"]
    assert program.startswith("def solution():\n") and program.endswith("    return result")
    scope: dict = {}
    exec(program, scope)  # our own text, not a model's
    assert scope["solution"]() == demo["answer"]


def test_there_are_eight_pal_demos():
    assert len(PRESETS["pal"].demos) == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_demo_renders_and_no_completion_holds_a_stop_string(name):
    preset = PRESETS[name]
    pairs = render_pairs(Template(preset.prompt, name, "prompt"),
                         Template(preset.completion, name, "completion"), preset.demos)
    assert len(pairs) == len(preset.demos)
    for demo_prompt, completion in pairs:
        assert demo_prompt and completion
        # A demo's completion holding a stop string would teach the model to stop early.
        assert not any(stop in completion for stop in preset.stop), completion


def test_render_pairs():
    pairs = render_pairs(Template("Q {{ q }}", "t", "prompt"), Template("a", "t", "completion"),
                         [{"q": 1, "a": 2}, {"q": 3, "a": 4}])
    assert pairs == (("Q 1", "2"), ("Q 3", "4"))


def test_an_unknown_preset_names_it_and_the_known_ones():
    _error(lambda: get_preset("vicuna", "gsm8k"), "vicuna", "gsm8k", "alpaca, pal, soups_qa")


# --- Few-shot demos ---------------------------------------------------------------------------

ROWS = [{"i": i} for i in range(5)]


def test_first_n_demos():
    assert select_demos(ROWS, 2, "first_n") == [{"i": 0}, {"i": 1}]
    assert select_demos(ROWS, 0, "first_n") == []
    assert select_demos(ROWS, 5, "first_n") == ROWS


def test_seeded_demos_are_drawn_without_replacement_by_the_seed():
    # Python's Mersenne Twister: random.Random(0).sample(range(5), 3) is [3, 4, 0] on every
    # platform and version since 3.2; random.Random(1) draws [1, 0, 4].
    assert select_demos(ROWS, 3, "seeded", seed=0) == [{"i": 3}, {"i": 4}, {"i": 0}]
    assert select_demos(ROWS, 3, "seeded", seed=1) == [{"i": 1}, {"i": 0}, {"i": 4}]
    assert select_demos(ROWS, 0, "seeded", seed=7) == []
    assert sorted(d["i"] for d in select_demos(ROWS, 5, "seeded", seed=3)) == [0, 1, 2, 3, 4]


def test_more_demos_than_rows_names_n_and_the_count():
    _error(lambda: select_demos(ROWS, 6, "first_n"), "6", "5")
    _error(lambda: select_demos(ROWS, -1, "seeded"), "-1")


def test_an_unknown_sampler_is_an_error():
    _error(lambda: select_demos(ROWS, 1, "random"), "random", "first_n, seeded")


# --- Prompt formats ---------------------------------------------------------------------------

DEMOS = (("Q: 1+1?\n", "2"), ("Q: 2+2?\n", "4"))


def test_a_plain_generation_prompt_puts_the_demos_first(tok):
    fmt = PromptFormat(demos=DEMOS)
    assert fmt.generation_prompt(tok, "Q: 3+3?\n") == "Q: 1+1?\n2\n\nQ: 2+2?\n4\n\nQ: 3+3?\n"
    assert PromptFormat(demos=DEMOS, demo_separator="\n---\n").generation_prompt(
        tok, "Q?") == "Q: 1+1?\n2\n---\nQ: 2+2?\n4\n---\nQ?"
    assert PromptFormat().generation_prompt(tok, "Q?") == "Q?"


def test_plain_training_text_is_the_pair_without_demos(tok):
    assert PromptFormat(demos=DEMOS).training_text(tok, "Q?", " A") == ("Q?", " A")


def test_chat_without_a_chat_template_names_the_tokenizer(tok):
    fmt = PromptFormat(chat=True)
    _error(lambda: fmt.generation_prompt(tok, "Q?"), "tiny-tok", "chat template")
    _error(lambda: fmt.training_text(tok, "Q?", "A"), "tiny-tok", "chat template")


def test_a_chat_generation_prompt_has_a_user_and_an_assistant_turn_per_demo(chat_tok):
    text = PromptFormat(chat=True, demos=DEMOS).generation_prompt(chat_tok, "Q: 3+3?")
    assert text == ("<|user|>\nQ: 1+1?\n</s>\n<|assistant|>\n2</s>\n"
                    "<|user|>\nQ: 2+2?\n</s>\n<|assistant|>\n4</s>\n"
                    "<|user|>\nQ: 3+3?</s>\n<|assistant|>\n")


def test_chat_training_text_splits_at_the_assistant_turn(chat_tok):
    head, rest = PromptFormat(chat=True, demos=DEMOS).training_text(chat_tok, "Q: 3+3?", "6")
    assert head == "<|user|>\nQ: 3+3?</s>\n<|assistant|>\n"
    assert rest == "6</s>\n"


def test_a_chat_template_that_does_not_extend_its_generation_prompt_is_refused(tok):
    marks_last = copy.deepcopy(tok)
    marks_last.chat_template = ("{% for m in messages %}{% if loop.last %}<|last|>{% endif %}"
                                "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    _error(lambda: PromptFormat(chat=True).training_text(marks_last, "Q?", "A"),
           "tiny-tok", "does not extend the generation prompt")


# --- Tokenization ----------------------------------------------------------------------------


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_completion_are_tokenized_as_one_text(tok):
    prompt, completion = "The ans", "wer is 4"
    joint = _ids(tok, prompt + completion)
    assert _ids(tok, prompt) + _ids(tok, completion) != joint  # " answer" spans the boundary
    ids, labels = encode_example(tok, prompt, completion, max_length=64)
    assert ids == [tok.bos_token_id, *joint, tok.eos_token_id]
    # Masked: BOS and the tokens ending at or before "The ans"[7]: "Th", "e". The straddling
    # token " answer" (characters 3 to 10) carries the loss.
    n_masked = labels.count(IGNORE_INDEX)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
    assert tok.decode(ids[1:n_masked]) == "The"
    assert tok.decode(ids[n_masked:n_masked + 1]) == " answer"
    assert labels[n_masked:] == ids[n_masked:]


def test_at_a_clean_boundary_the_prompt_ids_start_the_example(tok):
    prompt, completion = format_prompt("Tom has 25 apples."), "The answer is 25."
    ids, labels = encode_example(tok, prompt, completion, max_length=128)
    head = prompt_ids(tok, prompt)
    assert head[0] == tok.bos_token_id and ids[:len(head)] == head
    assert labels == [IGNORE_INDEX] * len(head) + ids[len(head):]
    assert ids[len(head):] == _ids(tok, completion) + [tok.eos_token_id]


def test_loss_on_all_labels_every_token(tok):
    ids, labels = encode_example(tok, "The ans", "wer is 4", max_length=64, loss_on="all")
    assert labels == ids


def test_examples_are_truncated_to_max_length(tok):
    full_ids, full_labels = encode_example(tok, "The ans", "wer is 4", max_length=64)
    ids, labels = encode_example(tok, "The ans", "wer is 4", max_length=4)
    assert ids == full_ids[:4] and labels == full_labels[:4]


def test_a_text_that_starts_with_bos_gets_no_second_one(tok):
    ids, labels = encode_example(tok, "<s>Tom has", " 25", max_length=64)
    assert ids == _ids(tok, "<s>Tom has 25") + [tok.eos_token_id]
    assert ids.count(tok.bos_token_id) == 1
    assert prompt_ids(tok, "<s>Tom has") == _ids(tok, "<s>Tom has")
    assert labels[:3] == [IGNORE_INDEX] * 3 and labels[3:] == ids[3:]  # <s>, Tom, " has"


@pytest.mark.parametrize("completion", ["25</s>", "25</s>\n"])
def test_a_completion_that_ends_with_eos_gets_no_second_one(tok, completion):
    ids, _ = encode_example(tok, "Tom has", completion, max_length=64)
    assert ids == [tok.bos_token_id, *_ids(tok, "Tom has" + completion)]
    assert ids.count(tok.eos_token_id) == 1


def test_a_tokenizer_without_bos_gets_none(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    ids, labels = encode_example(no_bos, "Tom has", " 25", max_length=64)
    assert ids == _ids(tok, "Tom has 25") + [tok.eos_token_id]
    assert prompt_ids(no_bos, "Tom has") == _ids(tok, "Tom has")


class WithoutOffsets:
    """A tokenizer without character offsets, as a slow (pure Python) one: transformers 5
    builds every tokenizer of this project fast, so the fallback is tested through this."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast
        self.bos_token, self.bos_token_id = fast.bos_token, fast.bos_token_id
        self.eos_token, self.eos_token_id = fast.eos_token, fast.eos_token_id

    def __call__(self, text, add_special_tokens=True, **kwargs):
        assert not kwargs, "a slow tokenizer has no offsets"
        return self.fast(text, add_special_tokens=add_special_tokens)


def test_without_offsets_the_parts_are_tokenized_apart(tok):
    prompt, completion = "The ans", "wer is 4"
    ids, labels = encode_example(WithoutOffsets(tok), prompt, completion, max_length=64)
    head = [tok.bos_token_id, *_ids(tok, prompt)]
    assert ids == head + _ids(tok, completion) + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(head) + ids[len(head):]


def test_a_chat_example_trains_on_the_assistant_turn_only(chat_tok):
    head, rest = PromptFormat(chat=True).training_text(chat_tok, "Q: 3+3?", "6")
    ids, labels = encode_example(chat_tok, head, rest, max_length=128)
    assert ids == [chat_tok.bos_token_id, *_ids(chat_tok, head + rest)]  # rest ends "</s>\n"
    n_masked = labels.count(IGNORE_INDEX)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked
    assert chat_tok.decode(ids[1:n_masked]) == head
    assert chat_tok.decode(ids[n_masked:]) == "6</s>\n"
    assert labels[n_masked:] == ids[n_masked:]
    assert prompt_ids(chat_tok, head) == ids[:n_masked]


def test_encode_dataset_encodes_every_row(tok):
    rows = [{"prompt": "The ans", "completion": "wer is 4"}, {"prompt": "Tom", "completion": ""}]
    assert encode_dataset(tok, rows, 64) == [encode_example(tok, r["prompt"], r["completion"], 64)
                                            for r in rows]


def test_pad_token_id_falls_back_to_eos(tok):
    assert pad_token_id(tok) == tok.pad_token_id == 0
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == tok.eos_token_id == 2
    no_pad.eos_token = None
    with pytest.raises(SoupsError, match="tiny-tok"):
        pad_token_id(no_pad)


def test_no_bos_before_a_plain_prompt_when_bos_opens_chat_turns(tok):
    """SmolLM2's BOS is `<|im_start|>`, which its chat template writes before each role: put
    before a plain prompt it announces a role that never comes, so it is left out there
    (and a chat prompt starts with it already)."""
    turns = copy.deepcopy(tok)
    turns.chat_template = ("{% for m in messages %}" + tok.bos_token + "{{ m['role'] }}\n"
                           "{{ m['content'] }}{% endfor %}")
    assert prompt_ids(turns, "Tom has") == _ids(tok, "Tom has")
    ids, _ = encode_example(turns, "Tom has", " 25", max_length=64)
    assert ids[0] != tok.bos_token_id and ids[-1] == tok.eos_token_id
    chat = tok.bos_token + "user\nTom has"
    assert prompt_ids(turns, chat).count(tok.bos_token_id) == 1
    elsewhere = copy.deepcopy(tok)  # a template that never writes BOS: BOS as before
    elsewhere.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prompt_ids(elsewhere, "Tom has")[0] == tok.bos_token_id
