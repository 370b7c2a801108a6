"""CAT on real (tiny) causal LMs: the wrapped model against the dense merged model, the export
against the weighted sum and PEFT, training invariants, and a problem with a known answer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_sharp_llama, sample_sequences, write_random_lora

from soups.adapters import LoraAdapter, LoraModule, read_provenance, save_adapter
from soups.compose.cat import CatModel, CatSettings, StopTraining, export_cat, train_cat
from soups.compose.cat.export import WEIGHTS_JSON
from soups.training.train_settings import TrainSettings
from soups.training.training_loop import held_out_loss

# Mixed tiers: forward passes, one backward pass and exports on the tiny model are unit; the
# tests that run `train_cat` (an optimizer loop) are integration.

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
_write_adapter = write_random_lora  # defaults: every target of TARGETS


def _load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Three LoRAs of different ranks and scalings; the third carries only q and v."""
    root = tmp_path_factory.mktemp("cat_adapters")
    return [
        _write_adapter(tiny_model_dir, root / "one", rank=2, alpha=4.0, seed=1),
        _write_adapter(tiny_model_dir, root / "two", rank=4, alpha=4.0, seed=2),
        _write_adapter(tiny_model_dir, root / "three", rank=3, alpha=6.0, seed=3,
                       targets=("q_proj", "v_proj")),
    ]


def _ids(n=3, length=14, vocab=500, seed=0):
    return torch.randint(4, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _dense_weighted_sum(adapter_dirs, module, weights):
    """sum_i w_i s_i B_i A_i over the adapters carrying `module` (None = not carried)."""
    total = 0
    for path, w in zip(adapter_dirs, weights, strict=True):
        if w is not None:
            total = total + w * LoraAdapter.open(path).module(module).delta()
    return total


@pytest.mark.unit
def test_wrapped_model_equals_dense_merged_model(tiny_model_dir, adapters):
    cat = CatModel.attach(_load(tiny_model_dir), adapters, CatSettings(seed=5))
    assert len(cat.layers) == 10 and len(cat.group_names) == 10  # 2 layers x 5 targets
    mixtures = cat.mixtures()
    assert mixtures["model.layers.0.mlp.up_proj"][2] is None
    reference = _load(tiny_model_dir)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in mixtures:
                module.weight += _dense_weighted_sum(adapters, name, mixtures[name])
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(cat(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_softmax_mixtures_sum_to_one_over_present_loras(tiny_model_dir, adapters):
    cat = CatModel.attach(_load(tiny_model_dir), adapters, CatSettings(seed=1))
    for name, values in cat.mixtures().items():
        present = [v for v in values if v is not None]
        assert len(present) == (3 if name.endswith(("q_proj", "v_proj")) else 2)
        assert sum(present) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.unit
def test_layer_granularity_shares_weights_within_a_layer(tiny_model_dir, adapters):
    settings = CatSettings(granularity="layer", normalisation="none", seed=2)
    cat = CatModel.attach(_load(tiny_model_dir), adapters, settings)
    assert cat.group_names == ["model.layers.0", "model.layers.1"]
    assert cat.trainable_parameters() == 2 * 3
    mixtures = cat.mixtures()
    for layer in (0, 1):
        rows = {tuple(mixtures[f"model.layers.{layer}.{p}"]) for p in ("self_attn.q_proj",
                                                                       "self_attn.v_proj")}
        assert len(rows) == 1
    q_proj = "model.layers.{}.self_attn.q_proj"
    assert mixtures[q_proj.format(0)] != mixtures[q_proj.format(1)]


@pytest.mark.unit
def test_export_with_fixed_weights_equals_static_cat(tiny_model_dir, adapters, tmp_path):
    weights = (0.7, -0.3, 1.2)
    settings = CatSettings(granularity="global", normalisation="none", init="values",
                           init_values=weights)
    cat = CatModel.attach(_load(tiny_model_dir), adapters, settings)
    out = export_cat(cat, tmp_path / "export")
    exported = LoraAdapter.open(out)
    assert exported.module_names == sorted(cat.layers)
    for name in exported.module_names:
        module = exported.module(name)
        carried = [w if name in LoraAdapter.open(p).module_names else None
                   for p, w in zip(adapters, weights, strict=True)]
        assert module.scaling == 1.0
        assert module.rank == (9 if name.endswith(("q_proj", "v_proj")) else 6)
        torch.testing.assert_close(module.delta(), _dense_weighted_sum(adapters, name, carried),
                                   rtol=1e-5, atol=1e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and read_provenance(out)["method"] == "cat_learned"
    recorded = json.loads((out / WEIGHTS_JSON).read_text())["weights"]
    assert recorded["model.layers.1.mlp.down_proj"] == pytest.approx([0.7, -0.3, None])


@pytest.mark.unit
def test_export_round_trip_reproduces_wrapper_logits(tiny_model_dir, adapters, tmp_path):
    from peft import PeftModel

    cat = CatModel.attach(_load(tiny_model_dir), adapters, CatSettings(seed=7))
    out = export_cat(cat, tmp_path / "export")
    loaded = PeftModel.from_pretrained(_load(tiny_model_dir), str(out)).eval()
    ids = _ids(seed=3)
    with torch.no_grad():
        wrapper, peft = cat(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(peft, wrapper, rtol=1e-4, atol=1e-5)
    # The LoRAs matter at this scale, so equal logits are not the base model's logits.
    with torch.no_grad():
        assert (_load(tiny_model_dir)(input_ids=ids).logits - wrapper).abs().max() > 1e-3


@pytest.mark.unit
def test_gradients_reach_only_the_cat_weights(tiny_model_dir, adapters):
    cat = CatModel.attach(_load(tiny_model_dir), adapters, CatSettings())
    ids = _ids()
    cat(input_ids=ids, labels=ids).loss.backward()
    with_grad = [n for n, p in cat.named_parameters() if p.grad is not None]
    assert with_grad == ["weights.logits"]
    assert cat.trainable_parameters() == 10 * 3
    assert all(b.grad is None for b in cat.buffers())


def _encoded(ids: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    return [(row.tolist(), row.tolist()) for row in ids]


@pytest.mark.integration
def test_training_keeps_base_and_factors_bit_identical(tiny_model_dir, adapters):
    cat = CatModel.attach(_load(tiny_model_dir), adapters, CatSettings())
    before = {k: v.clone() for k, v in cat.model.state_dict().items()}
    factors = {n: (layer.lora_A.clone(), layer.lora_B.clone()) for n, layer in cat.layers.items()}
    start = cat.weights.logits.detach().clone()
    settings = TrainSettings(learning_rate=0.05, max_steps=4, micro_batch_size=4,
                             warmup_steps=1, loss_on="all")
    result = train_cat(cat, _encoded(_ids(16, seed=1)), _encoded(_ids(4, seed=2)), settings,
                       pad_id=0, log=None)
    assert result.steps == 4 and result.trainable_parameters == 30
    assert not torch.equal(cat.weights.logits, start) or result.best_step == 0
    after = cat.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, layer in cat.layers.items():
        assert torch.equal(layer.lora_A, factors[name][0])
        assert torch.equal(layer.lora_B, factors[name][1])


# A problem with a known answer: sequences sampled from base + LoRA 1 (a base with sharp
# output distributions, so the two LoRAs' behaviours differ clearly).
@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cat_sharp")
    base = build_sharp_llama(root / "base")
    loras = [_write_adapter(base, root / f"lora{i}", rank=4, alpha=8.0, seed=i,
                            b_scale=0.5) for i in (1, 2)]
    return {"base": root / "base", "loras": loras,
            "from_1": _sample(root / "base", loras, (1.0, 0.0), 96, seed=0),
            "from_2": _sample(root / "base", loras, (0.0, 1.0), 16, seed=1)}


def _sample(base_dir, loras, weights, n, seed):
    """Sequences sampled (temperature 1) from base + sum_i w_i LoRA_i."""
    settings = CatSettings(normalisation="none", init="values", init_values=weights)
    return sample_sequences(CatModel.attach(_load(base_dir), loras, settings), n, seed)


SHARP_TRAIN = TrainSettings(learning_rate=0.1, max_steps=30, micro_batch_size=16,
                            warmup_steps=1, eval_every=10, loss_on="all")


@pytest.mark.integration
@pytest.mark.parametrize("granularity", ["global", "module"])
def test_training_moves_weights_toward_the_known_mixture(sharp, granularity):
    settings = CatSettings(granularity=granularity, init="uniform")
    cat = CatModel.attach(_load(sharp["base"]), sharp["loras"], settings)
    data = sharp["from_1"]
    result = train_cat(cat, data[:80], data[80:], SHARP_TRAIN, pad_id=0, log=None)
    first = [values[0] for values in cat.mixtures().values()]
    assert sum(first) / len(first) > 0.9 and min(first) > 0.8  # started at 0.5 each
    assert result.best_eval_loss < result.initial_eval_loss - 0.5


@pytest.mark.integration
def test_best_weights_are_kept_when_training_hurts_held_out_loss(sharp):
    cat = CatModel.attach(_load(sharp["base"]), sharp["loras"], CatSettings(init="uniform"))
    seen = {}

    def remember(record):
        seen[record["step"]] = cat.weights.logits.detach().clone()

    # Trained toward LoRA 1, judged on LoRA 2's behaviour: the start is the best point.
    result = train_cat(cat, sharp["from_1"][:80], sharp["from_2"], SHARP_TRAIN, pad_id=0,
                       on_step=remember, log=None)
    losses = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert len(losses) == 3 and min(losses) > result.initial_eval_loss
    assert result.best_step == 0 and not torch.equal(seen[30], cat.weights.logits)
    assert torch.equal(cat.weights.logits, torch.zeros_like(cat.weights.logits))
    assert held_out_loss(cat, sharp["from_2"], 16, 0) == pytest.approx(result.best_eval_loss)


@pytest.mark.integration
def test_training_is_seeded_and_callbacks_stop_it(sharp):
    def run(on_step=None, seed=0):
        cat = CatModel.attach(_load(sharp["base"]), sharp["loras"], CatSettings(seed=seed))
        result = train_cat(cat, sharp["from_1"][:80], sharp["from_1"][80:], SHARP_TRAIN,
                           pad_id=0, on_step=on_step, log=None)
        return result, cat.weights.logits.detach().clone()

    (first, logits), (again, logits_again) = run(), run()
    assert torch.equal(logits, logits_again)
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in again.history]
    assert not torch.equal(run(seed=1)[1], logits)

    stopped, _ = run(on_step=lambda record: record["step"] == 3)
    assert stopped.steps == 3 and stopped.stopped_early
    assert "eval_loss" in stopped.history[-1]  # the stopping point is evaluated too

    def raise_stop(record):
        if record["step"] == 2:
            raise StopTraining

    assert run(on_step=raise_stop)[0].steps == 2

    def fail(record):
        raise RuntimeError("tracker down")

    with pytest.raises(RuntimeError, match="tracker down"):
        run(on_step=fail)


@pytest.mark.unit
def test_bf16_base_runs_and_stays_close_to_float32(tiny_model_dir, adapters):
    settings = CatSettings(seed=3)
    full = CatModel.attach(_load(tiny_model_dir), adapters, settings)
    half = CatModel.attach(_load(tiny_model_dir, torch.bfloat16), adapters, settings)
    assert half.weights.logits.dtype == torch.float32
    assert next(iter(half.layers.values())).lora_A.dtype == torch.bfloat16
    ids = _ids()
    with torch.no_grad():
        reference = full(input_ids=ids).logits
        got = half(input_ids=ids).logits.float()
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()
    half(input_ids=ids, labels=ids).loss.backward()
    assert half.weights.logits.grad.dtype == torch.float32
    assert torch.isfinite(half.weights.logits.grad).all()


@pytest.mark.unit
def test_clear_errors_for_bad_adapters(tiny_model_dir, adapters, tmp_path):
    stray = save_adapter(tmp_path / "stray", {"model.layers.9.self_attn.q_proj": LoraModule(
        A=torch.ones(2, 32), B=torch.ones(32, 2), scaling=1.0)}, {})
    with pytest.raises(ValueError, match="stray: module model.layers.9.self_attn.q_proj"):
        CatModel.attach(_load(tiny_model_dir), [adapters[0], stray])
    zero = _write_adapter(tiny_model_dir, tmp_path / "zero", rank=2, alpha=2.0, seed=0,
                          b_scale=0.0)
    with pytest.raises(ValueError, match="zero has dW norm 0"):
        CatModel.attach(_load(tiny_model_dir), [adapters[0], zero], CatSettings(init="norm"))


@pytest.mark.unit
def test_training_loop_refuses_no_examples_instead_of_waiting_forever():
    from soups.training.train_settings import TrainSettings
    from soups.training.training_loop import optimizer_steps

    with pytest.raises(ValueError, match="no examples"):
        next(optimizer_steps(None, [], [], TrainSettings(), pad_id=0))
