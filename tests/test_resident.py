"""soups.evaluation.resident: candidates installed on a resident base model and removed bit for bit,
one candidate equal to PEFT's unmerged model, the merged path compared, mixed batches equal
to one candidate at a time (generation and loss), and refused adapters."""

import json
import shutil

import pytest
import torch
from conftest import build_tiny_llama

from soups.adapters import AdapterError
from soups.evaluation.evaluate import GenerationSettings, evaluate_rows, generate, load_model
from soups.evaluation.resident import MixedLoraLinear, ResidentModel, evaluate_side_by_side
from soups.evaluation.scoring import ScorerSettings

pytestmark = pytest.mark.unit

PROMPTS = ["### Question:\nTom has 25 apples.\n### Answer:\n", "### Question:\nHi\n",
           "### Question:\nWrite a Python function solution() that returns 7 times 8.\n"
           "### Answer:\n", "1 2 3", "### Question:\nHow many apples are left?\n"]
GREEDY = GenerationSettings(max_new_tokens=10, batch_size=2, stop=())


def _row(expected):
    return {"prompt": "p", "scorer": "final_number", "function": "", "calls": "[]",
            "expected": json.dumps(expected)}


def make_adapter(model_dir, out_dir, seed: int, **lora) -> str:
    """A PEFT LoRA of the model in `model_dir` saved to `out_dir`, with random B (PEFT
    starts B at zero, which would make every adapter the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters with different ranks and targets; the second with rslora and a rank
    pattern (down_proj rank 2)."""
    root = tmp_path_factory.mktemp("resident_adapters")
    first = make_adapter(tiny_model_dir, root / "a", seed=1, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"])
    second = make_adapter(tiny_model_dir, root / "b", seed=2, r=8, lora_alpha=16,
                          use_rslora=True, rank_pattern={"down_proj": 2},
                          target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])
    return first, second


@pytest.fixture(scope="module")
def resident(tiny_model_dir):
    return ResidentModel(tiny_model_dir, device="cpu", dtype="float32")


def _modules(model) -> dict[str, int]:
    return {name: id(module) for name, module in model.named_modules()}


def _batch(tokenizer):
    encoded = tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- install and remove ----------------------------------------------------------------


def test_the_base_is_bit_identical_after_candidates_are_removed(resident, adapters):
    digest, modules = resident.weights_digest(), _modules(resident.model)
    with resident.candidates([*adapters, None]):
        wrapped = [m for m in resident.model.modules() if isinstance(m, MixedLoraLinear)]
        # q_proj (both), v_proj (first), k_proj, up_proj, down_proj (second), in 2 layers.
        assert len(wrapped) == 2 * 5
        assert _modules(resident.model) != modules
    assert resident.weights_digest() == digest
    assert _modules(resident.model) == modules


def test_the_base_is_restored_after_an_exception_inside_the_block(resident, adapters):
    digest, modules = resident.weights_digest(), _modules(resident.model)
    with pytest.raises(RuntimeError, match="boom"), resident.candidates(adapters):
        raise RuntimeError("boom")
    assert resident.weights_digest() == digest
    assert _modules(resident.model) == modules


def test_the_digest_sees_a_changed_weight(tiny_model_dir):
    resident = ResidentModel(tiny_model_dir, device="cpu", dtype="float32")
    digest = resident.weights_digest()
    with torch.no_grad():
        resident.model.model.norm.weight[0] += 1
    assert resident.weights_digest() != digest


def test_stacked_factors_are_zero_padded_with_the_peft_scalings(resident, adapters):
    with resident.candidates([adapters[0], None, adapters[1]]):
        q = resident.model.model.layers[0].self_attn.q_proj
        down = resident.model.model.layers[0].mlp.down_proj
        assert q.ranks == (4, 0, 8) and down.ranks == (0, 0, 2)
        assert q.A.shape == (3, 8, 32) and q.B.shape == (3, 32, 8)
        assert q.scalings == (8 / 4, 0.0, 16 / 8 ** 0.5)  # rslora: alpha / sqrt(r)
        assert down.scalings == (0.0, 0.0, 16 / 2 ** 0.5)
        assert not q.A[0, 4:].any() and not q.B[0, :, 4:].any() and not q.A[1].any()


# ---- one candidate against PEFT --------------------------------------------------------


@pytest.fixture(scope="module")
def peft_unmerged(tiny_model_dir, adapters):
    from peft import PeftModel

    base, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    return PeftModel.from_pretrained(base, adapters[1]).eval()


def test_one_candidate_gives_peft_unmerged_logits_bit_for_bit(resident, adapters,
                                                              peft_unmerged):
    ids, mask = _batch(resident.tokenizer)
    want = _logits(peft_unmerged, ids, mask)
    with resident.candidates([adapters[1]]):  # rows None: candidate 0 on every row
        alone = _logits(resident.model, ids, mask)
    with resident.candidates([adapters[0], adapters[1]]):  # padded to rank 8, then cut
        resident.set_rows([1, 1, 1])
        among_two = _logits(resident.model, ids, mask)
        resident.set_rows([1, 0, 1])
        mixed = _logits(resident.model, ids, mask)
    assert torch.equal(alone, want) and torch.equal(among_two, want)
    assert torch.equal(mixed[[0, 2]], want[[0, 2]])
    assert not torch.equal(mixed[1], want[1])  # row 1 used the other adapter


def test_in_bfloat16_the_factors_stay_float32_as_peft_keeps_them(tiny_model_dir, adapters):
    """PEFT upcasts half-precision adapter weights to float32 (autocast_adapter_dtype) and
    casts the sum back: the same order here gives its bfloat16 logits bit for bit."""
    from peft import PeftModel

    half = ResidentModel(tiny_model_dir, device="cpu", dtype="bfloat16")
    base, _ = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    peft = PeftModel.from_pretrained(base, adapters[0]).eval()
    ids, mask = _batch(half.tokenizer)
    want = _logits(peft, ids, mask)
    with half.candidates([adapters[1], adapters[0]]):
        q = half.model.model.layers[0].self_attn.q_proj
        assert q.A.dtype == torch.float32 and q.base.weight.dtype == torch.bfloat16
        half.set_rows([1, 0, 1])
        mixed = _logits(half.model, ids, mask)
    assert want.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(mixed[[0, 2]], want[[0, 2]])


def test_one_candidate_generates_what_peft_unmerged_generates(resident, adapters,
                                                              peft_unmerged):
    want = generate(peft_unmerged, resident.tokenizer, PROMPTS, GREEDY)
    with resident.candidates([adapters[1]]):
        got = generate(resident.model, resident.tokenizer, PROMPTS, GREEDY)
    base = generate(resident.model, resident.tokenizer, PROMPTS, GREEDY)
    assert got == want
    assert got != base  # the adapter matters


def test_merged_and_unmerged_differ_only_by_rounding(tiny_model_dir, resident, adapters):
    """Today's path merges W + s B A into the weight; unmerged adds s B (A x). The same
    function, rounded differently: logits agree to float32 rounding, and on these prompts
    the greedy answers are the same."""
    merged, _ = load_model(tiny_model_dir, adapters[1], device="cpu", dtype="float32")
    ids, mask = _batch(resident.tokenizer)
    with resident.candidates([adapters[1]]):
        unmerged = _logits(resident.model, ids, mask)
        answers = generate(resident.model, resident.tokenizer, PROMPTS, GREEDY)
    difference = (_logits(merged, ids, mask) - unmerged).abs().max().item()
    print(f"max |merged - unmerged| logit: {difference:.3g}")
    assert difference < 1e-4
    assert generate(merged, resident.tokenizer, PROMPTS, GREEDY) == answers


# ---- side by side ----------------------------------------------------------------------


def _alone(resident, adapter_dir, rows, settings, scorer):
    with resident.candidates([adapter_dir]):
        return evaluate_rows(resident.model, resident.tokenizer, "t", rows, prompts=PROMPTS,
                             generation=settings, scorer=scorer)


def _same(side, alone):
    assert (side.task, side.n, side.accuracy, side.partial, side.records) == (
        alone.task, alone.n, alone.accuracy, alone.partial, alone.records)


def test_side_by_side_answers_equal_one_candidate_at_a_time(resident, adapters):
    rows = [_row([16]), _row([3]), _row([56]), _row([4]), _row([9])]
    candidates = [adapters[0], None, adapters[1]]
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    digest = resident.weights_digest()
    side = evaluate_side_by_side(resident, candidates, "t", rows, prompts=PROMPTS,
                                 generation=settings)
    alone = [_alone(resident, c, rows, settings, None) for c in candidates]
    assert len(side) == 3
    for got, want in zip(side, alone, strict=True):
        _same(got, want)
    outputs = [[record["output"] for record in scores.records] for scores in side]
    assert outputs[0] != outputs[1] != outputs[2] != outputs[0]  # three different models
    assert resident.weights_digest() == digest


def test_side_by_side_loss_equals_one_candidate_at_a_time(resident, adapters):
    rows = [{"prompt": p, "completion": " 16.", "scorer": "loss", "expected": "[]"}
            for p in PROMPTS]
    candidates = [None, adapters[1], adapters[0]]
    settings = GenerationSettings(batch_size=2)
    side = evaluate_side_by_side(resident, candidates, "t", rows, prompts=PROMPTS,
                                 generation=settings, scorer=ScorerSettings(kind="loss"))
    alone = [_alone(resident, c, rows, settings, ScorerSettings(kind="loss")) for c in candidates]
    for got, want in zip(side, alone, strict=True):
        _same(got, want)
        assert got.accuracy is None and got.records[0]["tokens"] > 0
    losses = {scores.partial["loss"] for scores in side}
    assert len(losses) == 3  # three different models


def test_side_by_side_seconds_is_each_candidates_share(resident, adapters):
    side = evaluate_side_by_side(resident, [adapters[0], adapters[1]], "t", [_row([1])],
                                 prompts=PROMPTS[:1], generation=GREEDY)
    assert side[0].seconds == side[1].seconds > 0


# ---- refusals and misuse ---------------------------------------------------------------


def test_an_adapter_of_another_model_is_refused_by_name(resident, adapters, tmp_path):
    other_model = build_tiny_llama(tmp_path / "wider", hidden=48)
    other = make_adapter(other_model, tmp_path / "other_adapter", seed=3, r=4, lora_alpha=4,
                         target_modules=["q_proj"])
    digest, modules = resident.weights_digest(), _modules(resident.model)
    with pytest.raises(AdapterError, match="other_adapter.*48 x 48"):
        with resident.candidates([adapters[0], other]):
            pass
    assert resident.weights_digest() == digest
    assert _modules(resident.model) == modules


def test_an_unsupported_adapter_is_refused_by_name(resident, adapters, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    digest = resident.weights_digest()
    with pytest.raises(AdapterError, match="dora.*DoRA"), resident.candidates([None, dora]):
        pass
    assert resident.weights_digest() == digest


def test_an_adapter_listed_twice_is_read_once(resident, adapters, monkeypatch):
    import soups.evaluation.resident

    opened = []
    real_open = soups.evaluation.resident.LoraAdapter.open
    monkeypatch.setattr(soups.evaluation.resident.LoraAdapter, "open",
                        lambda path: opened.append(path) or real_open(path))
    with resident.candidates([adapters[0], adapters[0], None]):
        pass
    assert len(opened) == 1


def test_rows_must_be_set_and_valid_with_several_candidates(resident, adapters):
    from soups.evaluation.evaluate import EvaluationError

    ids, mask = _batch(resident.tokenizer)
    with resident.candidates(adapters):
        with pytest.raises(EvaluationError, match="set_rows before"):
            _logits(resident.model, ids, mask)
        with pytest.raises(EvaluationError, match="candidate index 2 "):
            resident.set_rows([0, 2, 1])
        resident.set_rows([0, 1])
        with pytest.raises(EvaluationError, match="2 rows, the batch has 3"):
            _logits(resident.model, ids, mask)
        with pytest.raises(EvaluationError, match="already installed"):
            with resident.candidates([None]):
                pass
    with pytest.raises(EvaluationError, match="outside"):
        resident.set_rows([0])
    with pytest.raises(EvaluationError, match="no candidates"), resident.candidates([]):
        pass


def test_check_restored_passes_on_a_clean_block(tiny_model_dir, adapters):
    resident = ResidentModel(tiny_model_dir, device="cpu", dtype="float32",
                             check_restored=True)
    with resident.candidates(adapters):
        resident.set_rows([0])
    assert resident.load_seconds > 0


# ---- the evaluate hooks ----------------------------------------------------------------


def test_generate_tells_each_batch_its_prompt_indices_and_answers_the_same(resident):
    batches = []
    got = generate(resident.model, resident.tokenizer, PROMPTS, GREEDY, batches.append)
    lengths = [len(resident.tokenizer(p)["input_ids"]) for p in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda i: lengths[i])
    assert batches == [order[0:2], order[2:4], order[4:5]]
    assert got == generate(resident.model, resident.tokenizer, PROMPTS, GREEDY)


def test_completion_loss_tells_each_batch_its_row_indices(resident):
    from soups.evaluation.evaluate import completion_loss

    rows = [{"prompt": p, "completion": " 16."} for p in PROMPTS]
    batches = []
    got = completion_loss(resident.model, resident.tokenizer, rows, 2, on_batch=batches.append)
    assert batches == [[0, 1], [2, 3], [4]]
    assert got == completion_loss(resident.model, resident.tokenizer, rows, 2)
