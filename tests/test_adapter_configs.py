"""Merged adapters load in PEFT exactly as written, for adapters PEFT itself built.

Each case trains nothing: PEFT wraps a tiny model of some architecture with a LoraConfig
variant (layer selections, regex targets, exclusions, rslora, Conv1D / fan_in_fan_out,
rank and alpha patterns), the LoRA factors are randomised and saved. The merged folder is
loaded back with `PeftModel.from_pretrained`: the LoRA modules PEFT creates must be exactly
the ones written, with no warning, and `merge_and_unload` must change the base weights by the
exact weighted sum of what each input changes them by (PEFT's own reading of each input, so
the reference does not depend on the code under test).
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from soups.adapters import CONFIG_FILE, AdapterError, LoraAdapter
from soups.compose.merge import merge_adapters

pytestmark = pytest.mark.unit


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2))


def _gpt2():  # Conv1D layers: PEFT sets fan_in_fan_out itself
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8,
                                               num_layers=2, num_heads=2))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    word_embed_proj_dim=16, max_position_embeddings=32))


ARCHITECTURES = {"llama": _llama, "gpt2": _gpt2, "t5": _t5, "opt": _opt}

# case -> (architecture, LoraConfig kwargs of adapter 1, of adapter 2)
CASES = {
    "layers_to_transform differ": (
        "llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers_pattern": (
        "opt", dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules=["q_proj", "k_proj"])),
    "exclude_modules": (
        "llama", dict(target_modules=["q_proj", "v_proj", "o_proj"],
                      exclude_modules=["model.layers.0.self_attn.o_proj"]),
        dict(target_modules=["o_proj"], exclude_modules=["model.layers.1.self_attn.o_proj"])),
    "regex targets (decoder only)": (
        "t5", dict(target_modules=r".*decoder.*\.(q|v)"),
        dict(target_modules=r".*decoder.*SelfAttention\.(q|v)")),
    "conv1d fan_in_fan_out": (
        "gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(target_modules=["c_attn"], fan_in_fan_out=True, r=2)),
    "rslora": (
        "llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=4, lora_alpha=8),
        dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=4, lora_alpha=3)),
    "rank and alpha patterns": (
        "llama", dict(target_modules=["q_proj", "v_proj"], r=4, rank_pattern={"v_proj": 2},
                      alpha_pattern={"q_proj": 16}),
        dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)),
}


def _peft_adapter(architecture: str, kwargs: dict, path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]()
    task = "SEQ_2_SEQ_LM" if architecture == "t5" else "CAUSAL_LM"
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "task_type": task, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(path)
    return str(path)


def _base_state(architecture: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in ARCHITECTURES[architecture]().state_dict().items()}


class _PeftLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def _load(architecture: str, adapter: str):
    """PEFT's model for `adapter` on the seeded base, the LoRA module names it created, and
    every warning PEFT gave while loading."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = ARCHITECTURES[architecture]()
    handler = _PeftLog()
    logging.getLogger("peft").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, adapter)
    finally:
        logging.getLogger("peft").removeHandler(handler)
    created = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}
    # library deprecations (transformers' own) are not about the adapter
    said = [str(w.message) for w in caught
            if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    said += handler.records
    return model, created, said


def _weight_change(architecture: str, adapter: str) -> dict[str, torch.Tensor]:
    """What PEFT's merge_and_unload of `adapter` adds to each base weight."""
    model, _, _ = _load(architecture, adapter)
    merged = model.merge_and_unload().state_dict()
    base = _base_state(architecture)
    return {k: merged[k] - base[k] for k in base}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    architecture, first, second = CASES[request.param]
    root = tmp_path_factory.mktemp("peft_adapters")
    adapters = [_peft_adapter(architecture, first, root / "one", seed=1),
                _peft_adapter(architecture, second, root / "two", seed=2)]
    return architecture, adapters


@pytest.mark.parametrize("method", ["task_arithmetic", "cat"])
def test_merged_adapter_loads_exactly_as_written(case, method, tmp_path):
    architecture, adapters = case
    weights = [0.7, -0.4]
    out = merge_adapters(adapters, method, tmp_path / "merged", weights=weights)
    written = set(LoraAdapter.open(out).module_names)
    expected = set().union(*(set(LoraAdapter.open(a).module_names) for a in adapters))
    assert written == expected
    model, created, said = _load(architecture, str(out))
    assert created == written  # nothing dropped, nothing created at random
    assert said == []  # no "missing adapter keys", no unknown config keys, no layout fix-up
    merged = model.merge_and_unload().state_dict()
    base = _base_state(architecture)
    changes = [_weight_change(architecture, a) for a in adapters]
    for key in base:
        want = weights[0] * changes[0][key] + weights[1] * changes[1][key]
        torch.testing.assert_close(merged[key] - base[key], want, rtol=1e-4, atol=1e-6)


def test_merged_config_is_plain_peft(case, tmp_path):
    from peft import LoraConfig

    _, adapters = case
    out = merge_adapters(adapters, "task_arithmetic", tmp_path / "merged")
    config = json.loads((out / CONFIG_FILE).read_text())
    LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # every key is PEFT's
    assert config["layers_to_transform"] is None and config["exclude_modules"] is None
    assert config["init_lora_weights"] is True and config["use_rslora"] is False
    assert config["target_modules"] == sorted(LoraAdapter.open(out).module_names)


def test_embedding_lora_is_refused_by_name(tmp_path):
    path = _peft_adapter("llama", dict(target_modules=["embed_tokens", "q_proj"]),
                         tmp_path / "emb", seed=1)
    with pytest.raises(AdapterError, match="embedding LoRA is not supported"):
        LoraAdapter.open(path)


def test_mixed_fan_in_fan_out_is_refused(tmp_path):
    from soups.compose.merge import MergeError

    conv = _peft_adapter("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True),
                         tmp_path / "conv", seed=1)
    config = json.loads((tmp_path / "conv" / CONFIG_FILE).read_text())
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / CONFIG_FILE).write_text(json.dumps({**config, "fan_in_fan_out": False}))
    (flat / "adapter_model.safetensors").write_bytes(
        (tmp_path / "conv" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(MergeError, match="fan_in_fan_out"):
        merge_adapters([conv, str(flat)], "cat", tmp_path / "out")
