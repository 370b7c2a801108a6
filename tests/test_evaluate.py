"""Evaluation (soups.evaluation.evaluate): the device and dtype, batched generation equal to
one-at-a-time and to a manual greedy loop, stop sequences, seeded sampling, the completion
loss by hand, evaluate_rows with its prompts, scorer and records, and the command's errors.
Scorers themselves: tests/test_scoring.py."""

import json
import math

import pytest
import torch
from conftest import assert_user_error

from soups.evaluation.evaluate import (
    EvaluationError,
    GenerationSettings,
    TaskScores,
    completion_loss,
    evaluate_rows,
    generate,
    load_model,
    records_jsonl,
    resolve_device,
)
from soups.evaluation.scoring import ScorerSettings
from soups.names import task_metric
from soups.training.text_batches import IGNORE_INDEX, encode_example

pytestmark = pytest.mark.unit

PROMPTS = ["### Question:\nTom has 25 apples.\n### Answer:\n", "### Question:\nHi\n",
           "### Question:\nWrite a Python function solution() that returns 7 times 8.\n"
           "### Answer:\n", "1 2 3"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) in float32 on the CPU, shared by the tests that only read it."""
    return load_model(tiny_model_dir, device="cpu")


def _row(expected, scorer="final_number", function="", calls="[]"):
    return {"prompt": "p", "scorer": scorer, "function": function, "calls": calls,
            "expected": json.dumps(expected)}


def _manual_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """New token ids of a greedy loop without the KV cache, to EOS or `steps` tokens."""
    ids = torch.tensor([[tokenizer.bos_token_id]
                        + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tokenizer.eos_token_id:
                break
    return new


def _spy_new_tokens(monkeypatch, model) -> list[int]:
    """Record how many tokens each `model.generate` call added (widths, in call order)."""
    widths, real = [], model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        widths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", spy)
    return widths


# ---- device and dtype ------------------------------------------------------------------

def test_auto_device_on_a_cpu_machine_is_float32_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device("cpu", "float16") == (torch.device("cpu"), torch.float16)


def test_auto_on_a_gpu_picks_bfloat16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_device() == (torch.device("cuda"), torch.float16)
    assert resolve_device("auto", "float32") == (torch.device("cuda"), torch.float32)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1", "bfloat16") == (torch.device("cuda:1"), torch.bfloat16)
    with pytest.raises(EvaluationError, match="'cuda:2'.*2 CUDA device"):
        resolve_device("cuda:2")


def test_unavailable_or_unknown_devices_and_dtypes_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(EvaluationError, match=f"'{device}'.*not available"):
            resolve_device(device)
    for device in ("tpu", "cuda:x", "cpu:0"):
        with pytest.raises(EvaluationError, match=f"unknown device '{device}'"):
            resolve_device(device)
    with pytest.raises(EvaluationError, match="unknown dtype 'fp8'"):
        resolve_device("cpu", "fp8")
    assert issubclass(EvaluationError, ValueError)


def test_bfloat16_on_the_cpu_loads_and_generates(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    texts = generate(model, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=4))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_cuda_on_this_machine_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EvaluationError, match="'cuda'"):
        load_model(tiny_model_dir, device="cuda")


def test_the_adapter_is_merged_in_float32_then_cast(tiny_model_dir, tmp_path):
    from soups.adapters import LoraModule, save_adapter

    gen = torch.Generator().manual_seed(0)
    module = "model.layers.0.self_attn.q_proj"
    lora = {module: LoraModule(A=torch.randn(2, 32, generator=gen),
                               B=torch.randn(32, 2, generator=gen), scaling=0.5)}
    adapter = save_adapter(tmp_path / "a", lora, {"base_model_name_or_path": tiny_model_dir})
    full, _ = load_model(tiny_model_dir, adapter, device="cpu", dtype="float32")
    half, _ = load_model(tiny_model_dir, adapter, device="cpu", dtype="bfloat16")
    base, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    name = f"{module}.weight"
    merged = dict(full.named_parameters())[name]
    delta = 0.5 * lora[module].B @ lora[module].A
    assert torch.allclose(merged, dict(base.named_parameters())[name] + delta, atol=1e-6)
    for (key, p16), (_, p32) in zip(half.named_parameters(), full.named_parameters(),
                                    strict=True):
        assert torch.equal(p16, p32.to(torch.bfloat16)), key


# ---- generation ------------------------------------------------------------------------

def test_batched_generation_equals_one_by_one_and_a_manual_loop(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    batched = generate(model, tokenizer, PROMPTS, settings)
    single = [generate(model, tokenizer, [p], GenerationSettings(max_new_tokens=12,
                                                                  batch_size=1))[0]
              for p in PROMPTS]
    assert batched == single
    for prompt, text in zip(PROMPTS, batched, strict=True):
        manual = tokenizer.decode(_manual_greedy(model, tokenizer, prompt, 12),
                                  skip_special_tokens=True)
        cut = manual.split("\n### Question")[0].split("\n### Answer")[0].strip()
        assert text == cut


def test_max_new_tokens_is_honoured(tiny, monkeypatch):
    model, tokenizer = tiny
    widths = _spy_new_tokens(monkeypatch, model)
    text = generate(model, tokenizer, [PROMPTS[3]], GenerationSettings(max_new_tokens=3,
                                                                       stop=()))
    assert widths == [3]
    assert text == [tokenizer.decode(_manual_greedy(model, tokenizer, PROMPTS[3], 3),
                                     skip_special_tokens=True).strip()]


def _sampled(model, tokenizer, seed=0, temperature=1.0, stop=(), max_new_tokens=24):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=stop, seed=seed,
                                  temperature=temperature, top_p=1.0, batch_size=2)
    return generate(model, tokenizer, PROMPTS[:2], settings)


def test_sampling_is_seeded_and_temperature_zero_is_greedy(tiny):
    model, tokenizer = tiny
    first = _sampled(model, tokenizer, seed=0, max_new_tokens=12)
    assert _sampled(model, tokenizer, seed=0, max_new_tokens=12) == first
    assert _sampled(model, tokenizer, seed=1, max_new_tokens=12) != first
    assert _sampled(model, tokenizer, seed=7, temperature=0.0, max_new_tokens=12) == generate(
        model, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=12, stop=(),
                                                          batch_size=2))


def test_a_stop_sequence_cuts_the_output_and_ends_the_batch(tiny, monkeypatch):
    """The stop: two letters or digits the unstopped (seeded, sampled) text holds; the
    stopped text is that text's prefix before their first occurrence, and generation ended
    early once both rows had met a stop sequence."""
    model, tokenizer = tiny
    full = _sampled(model, tokenizer)
    spot = next(i for i in range(4, len(full[0]) - 1) if full[0][i:i + 2].isalnum())
    stop = full[0][spot:spot + 2]
    second = next(full[1][i:i + 2] for i in range(2, len(full[1]) - 1)
                  if full[1][i:i + 2].isalnum())
    widths = _spy_new_tokens(monkeypatch, model)
    cut = _sampled(model, tokenizer, stop=(stop, second))
    want = [text[:min(i for i in (text.find(stop), text.find(second)) if i >= 0)].strip()
            for text in full]
    assert cut == want and len(cut[0]) < len(full[0])
    assert widths[0] < 24


# ---- loss ------------------------------------------------------------------------------

LOSS_ROWS = [{"prompt": "### Question:\nHi\n### Answer:\n", "completion": "The answer is 16.",
              "scorer": "loss", "expected": "[]"},
             {"prompt": "1 2", "completion": " 3", "scorer": "loss", "expected": "[]"}]


def _hand_nll(model, tokenizer, row) -> tuple[float, int]:
    """Summed NLL and count of a row's completion tokens, one row, by hand."""
    ids, labels = encode_example(tokenizer, row["prompt"], row["completion"], 256)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    terms = [-float(logp[t - 1, labels[t]]) for t in range(1, len(ids))
             if labels[t] != IGNORE_INDEX]
    return sum(terms), len(terms)


def test_completion_loss_by_hand(tiny):
    model, tokenizer = tiny
    hand = [_hand_nll(model, tokenizer, row) for row in LOSS_ROWS]
    assert [n for _, n in hand] == [len(tokenizer(r["completion"], add_special_tokens=False)
                                        ["input_ids"]) + 1 for r in LOSS_ROWS]  # + EOS
    for batch_size in (1, 2):  # padding changes nothing
        got = completion_loss(model, tokenizer, LOSS_ROWS, batch_size)
        assert got == pytest.approx([s / n for s, n in hand], rel=1e-5)


def test_a_loss_task_reports_loss_and_perplexity_not_accuracy(tiny):
    model, tokenizer = tiny
    hand = [_hand_nll(model, tokenizer, row) for row in LOSS_ROWS]
    loss = sum(s for s, _ in hand) / sum(n for _, n in hand)  # token-weighted
    scores = evaluate_rows(model, tokenizer, "t", LOSS_ROWS)
    assert scores.accuracy is None
    assert scores.metrics("validation") == pytest.approx({
        task_metric("validation", "t", "loss"): loss,
        task_metric("validation", "t", "perplexity"): math.exp(loss)}, rel=1e-5)
    assert [r["tokens"] for r in scores.records] == [n for _, n in hand]
    assert scores.records[0]["reference"] == "The answer is 16."
    assert scores.records[0]["correct"] is None


# ---- tasks -----------------------------------------------------------------------------

def test_evaluate_rows_with_prompts_and_a_scorer(tiny):
    """Prompts override the rows' `prompt` column; the given scorer scores; records carry
    the final prompt and the output."""
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6, stop=("\n",))
    outputs = generate(model, tokenizer, PROMPTS[2:], settings)
    rows = [_row([outputs[0]], scorer="final_number"), _row(["not this"], "final_number")]
    scores = evaluate_rows(model, tokenizer, "t", rows, PROMPTS[2:], settings,
                           ScorerSettings(kind="exact_match"))
    assert scores.accuracy == 0.5 and scores.n == 2 and scores.seconds > 0
    assert [r["prompt"] for r in scores.records] == PROMPTS[2:]
    assert [r["output"] for r in scores.records] == outputs
    assert [r["correct"] for r in scores.records] == [True, False]
    parsed = sum(bool(o.strip()) for o in outputs) / 2  # exact_match reads any non-empty answer
    assert scores.metrics("test") == {task_metric("test", "t"): 0.5,
                                      task_metric("test", "t", "parsed"): parsed}
    assert scores.metrics() == {"t/accuracy": 0.5, "t/parsed": parsed}


def test_evaluate_rows_defaults_to_the_rows_scorer(tiny):
    model, tokenizer = tiny
    rows = [{**_row([3]), "prompt": PROMPTS[3]}]  # greedy: " 3 3 3": the last number is 3
    scores = evaluate_rows(model, tokenizer, "t", rows,
                           generation=GenerationSettings(max_new_tokens=3, stop=()))
    assert scores.records[0]["prompt"] == PROMPTS[3]
    assert scores.records[0]["extracted"] == scores.records[0]["reference"] == 3
    assert scores.accuracy == 1.0 and scores.partial == {"parsed": 1.0, "answered": 0.0}


def test_evaluate_rows_rejects_unknown_mixed_or_miscounted_input(tiny):
    model, tokenizer = tiny
    with pytest.raises(EvaluationError, match="'bleu'"):
        evaluate_rows(model, tokenizer, "t", [_row([1], scorer="bleu")])
    with pytest.raises(EvaluationError, match="mix scorers"):
        evaluate_rows(model, tokenizer, "t", [_row([1]), _row([1], scorer="program")])
    with pytest.raises(EvaluationError, match="1 prompts for 2 rows"):
        evaluate_rows(model, tokenizer, "t", [_row([1]), _row([1])], prompts=["a"])


def test_metrics_leave_out_a_missing_accuracy():
    scores = TaskScores("t", 2, None, {"loss": 1.0}, 0.1)
    assert scores.metrics("validation") == {"validation/t/loss": 1.0}


@pytest.mark.parametrize(("settings", "named"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, not 0"),
    ({"batch_size": 2.5}, "not 2.5"),
    ({"temperature": -1.0}, "not -1.0"),
    ({"top_p": 0.0}, "not 0.0"),
    ({"stop": ("",)}, "('',)"),
])
def test_bad_generation_settings_name_the_value(settings, named):
    with pytest.raises(EvaluationError) as err:
        GenerationSettings(**settings)
    assert named in str(err.value)


def test_generation_params_are_flat():
    params = GenerationSettings(stop=["\n\n"]).params()
    assert params == {"max_new_tokens": 96, "stop": '["\\n\\n"]', "temperature": 0.0,
                      "top_p": 1.0, "seed": 0, "batch_size": 32}
    assert GenerationSettings(stop=["x"]).stop == ("x",)


def test_records_jsonl_is_strict_json_one_line_each(tmp_path):
    records = [{"prompt": "p\nq", "output": "o", "extracted": math.nan, "reference": [1.5],
                "correct": False, "outputs": [math.inf, (1, 2)], "path": tmp_path},
               {"prompt": "", "output": "", "extracted": None, "reference": 2,
                "correct": True}]
    text = records_jsonl(records)
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n")
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"not strict: {c}"))
    assert first["extracted"] == "nan" and first["outputs"] == ["inf", [1, 2]]
    assert first["path"] == str(tmp_path) and first["prompt"] == "p\nq"
    assert json.loads(lines[1])["correct"] is True


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


def test_a_prompt_longer_than_the_context_loses_its_start_not_its_question(tiny):
    from soups.evaluation.evaluate import _fit_context

    model, tokenizer = tiny
    context = model.config.max_position_embeddings
    short, long = [1, 5, 6], [1, *range(10, 10 + context)]
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer"):
        fitted = _fit_context(model, [short, long], 16)
    assert fitted[0] == short
    assert fitted[1] == [1, *long[len(long) - (context - 16) + 1:]]
    assert len(fitted[1]) == context - 16
    with pytest.raises(EvaluationError, match="leaves no room"):
        _fit_context(model, [long], context)
    demos = "Tom has 3 apples. The answer is 3.\n\n" * 60
    with pytest.warns(UserWarning, match="cut from the left"):
        (text,) = generate(model, tokenizer, [demos + PROMPTS[0]],
                           GenerationSettings(max_new_tokens=4, stop=()))
    assert isinstance(text, str)


def test_evaluate_command_shows_progress_and_keeps_what_it_scored(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """40 rows: a progress line after the first 32; with --out, the answers scored so far
    are on disk after each chunk, so a run interrupted in the second keeps the first."""
    from datasets import Dataset, DatasetDict
    from typer.testing import CliRunner

    import soups.evaluation.resident
    from study.cli import app

    rows = [{"key": f"k{i}", "prompt": f"### Question:\nTom has {i} apples.\n### Answer:\n",
             "completion": f"The answer is {i}.", **_row([i])} for i in range(40)]
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d" / "m"))
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", tiny_model_dir, "--data", str(tmp_path / "d"), "--task",
            "m", "--out", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "m: 32/40 rows" in done.output and "left)" in done.output
    report = json.loads(out.read_text())["m"]
    assert report["n"] == 40 and report["complete"] and len(report["records"]) == 40
    assert [r["prompt"] for r in report["records"]] == [r["prompt"] for r in rows]

    real = soups.evaluation.resident.evaluate_side_by_side
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(soups.evaluation.resident, "evaluate_side_by_side", interrupted)
    CliRunner().invoke(app, args)
    kept = json.loads(out.read_text())["m"]
    assert kept["n"] == 32 and not kept["complete"] and len(kept["records"]) == 32
