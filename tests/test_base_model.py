"""The embedded base model: save/load round trip through `from_pretrained`, cache reuse,
determinism for a seed, and the tokenizer's number tokens and exact round trip."""

import json

import pytest
import torch

from soups.training.base_model import BUILD_FILE, BaseModelSettings, build_base_model

pytestmark = pytest.mark.integration  # `built` pretrains a tiny model (6 AdamW steps)
QUICK = BaseModelSettings(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          vocab_size=1400, max_number=199, steps=6, batch_size=4,
                          block_size=32, corpus_examples=600, warmup_steps=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("cache"), QUICK, log=lambda _: None)


def test_round_trip_through_from_pretrained(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "llama"
    info = json.loads((built / BUILD_FILE).read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([tokenizer("### Question:\nWhat is 3 + 4?")["input_ids"]])
    again = AutoModelForCausalLM.from_pretrained(built)
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_same_seed_same_weights_and_cache_reuse(built, tmp_path):
    from safetensors.torch import load_file

    progress: list[str] = []
    rebuilt = build_base_model(tmp_path, QUICK, log=progress.append)
    assert any("pretrain step 6/6" in line and "left" in line for line in progress)  # ETA
    a, b = load_file(built / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (rebuilt / BUILD_FILE).stat().st_mtime_ns
    logs = []
    assert build_base_model(tmp_path, QUICK, log=logs.append) == rebuilt
    assert logs == [] and (rebuilt / BUILD_FILE).stat().st_mtime_ns == stamp
    other = BaseModelSettings(**{**QUICK.__dict__, "seed": 1})
    assert other.key() != QUICK.key()


def test_tokenizer_numbers_are_single_tokens_and_code_round_trips(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    for n in (0, 7, 42, 199):
        assert len(tokenizer(f" {n}", add_special_tokens=False)["input_ids"]) == 1
        assert len(tokenizer(f"{n}", add_special_tokens=False)["input_ids"]) == 1
    program = "def solution():\n    apples = 25\n    result = apples - 9\n    return result"
    ids = tokenizer(program, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == program

