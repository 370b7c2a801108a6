"""The merge engine against values: PEFT 0.21 `add_weighted_adapter` (every method PEFT has,
compared on the merged dW = s B A of every module, never on A and B alone), direct dense
computations, and invariants (identity, cancellation, permutation, Eckart-Young)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error

from soups.adapters import AdapterError, LoraAdapter, LoraModule, read_provenance, save_adapter
from soups.compose.merge import MergeError, merge_adapters, method_parameters
from soups.compose.merge import sparsify as sparsify_module
from soups.compose.merge.lowrank import (
    LAPACK_MAX_SIDE,
    _lapack,
    _subspace_iteration,
    truncate_dense,
    truncate_lora,
)

pytestmark = pytest.mark.unit  # merge math on small tensors and tiny adapter folders; no training
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
SEEDED_PEFT = ["linear", "ties", "magnitude_prune", "cat", "svd", "ties_svd",
               "magnitude_prune_svd"]


def _shapes(model_dir) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS}


def _write(model_dir, path, rank, alpha, seed, only=None, rank_of=None):
    """A random LoRA (B nonzero) on TARGETS; `rank_of(module)` overrides the rank per module
    (written through rank_pattern)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out_f, in_f) in _shapes(model_dir).items():
        if only and name.rsplit(".", 1)[-1] not in only:
            continue
        r = rank_of(name) if rank_of else rank
        modules[name] = LoraModule(A=torch.randn(r, in_f, generator=g) / math.sqrt(in_f),
                                   B=torch.randn(out_f, r, generator=g) * 0.2, scaling=alpha / r)
    config = {"base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}
    return str(save_adapter(path, modules, config))


@pytest.fixture(scope="module")
def same_rank(tiny_model_dir, tmp_path_factory):
    """Three rank-4 LoRAs with different scalings: every PEFT method accepts them."""
    root = tmp_path_factory.mktemp("same_rank")
    return [_write(tiny_model_dir, root / "a", 4, 8.0, 1),
            _write(tiny_model_dir, root / "b", 4, 4.0, 2),
            _write(tiny_model_dir, root / "c", 4, 2.0, 3)]


@pytest.fixture(scope="module", name="mixed")  # named: tests/test_merge_knots_lego.py imports it
def mixed_adapters(tiny_model_dir, tmp_path_factory):
    """Different ranks (one adapter with a rank_pattern), one adapter on q and v only."""
    root = tmp_path_factory.mktemp("mixed")
    return [_write(tiny_model_dir, root / "a", 2, 4.0, 4),
            _write(tiny_model_dir, root / "b", 6, 3.0, 5,
                   rank_of=lambda n: 3 if n.endswith("up_proj") else 6),
            _write(tiny_model_dir, root / "c", 3, 6.0, 6, only=("q_proj", "v_proj"))]


def _deltas(adapter_dir) -> dict[str, torch.Tensor]:
    return {n: m.delta().double() for n, m in LoraAdapter.open(adapter_dir).modules()}


def _dense_sum(adapter_dirs, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(adapter_dirs, weights, strict=True):
        for name, delta in _deltas(path).items():
            total[name] = total.get(name, 0) + w * delta
    return total


def _peft_merge(model_dir, adapter_dirs, method, weights, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's merged dW per module: add_weighted_adapter, then the layer's get_delta_weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="in0")
    names = ["in0"]
    for i, path in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(path, adapter_name=f"in{i}")
        names.append(f"in{i}")
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kwargs)
    prefix = "base_model.model."
    return {name[len(prefix):]: module.get_delta_weight("merged").double()
            for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "merged" in module.lora_A}


def _assert_same_deltas(ours: dict, expected: dict, rtol=1e-5, atol=1e-6):
    assert sorted(ours) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"module {name}: {m}")


@pytest.mark.parametrize("method", SEEDED_PEFT)
def test_parity_with_peft(tiny_model_dir, same_rank, tmp_path, method):
    weights = [0.7, -0.4, 1.3]
    params = {"density": 0.6} if ("ties" in method or "prune" in method) else {}
    peft_kwargs = dict(params)
    if method.endswith("svd") or method == "svd":
        params["rank"] = peft_kwargs["svd_rank"] = 5
    out = merge_adapters(same_rank, method, tmp_path / "out", weights=weights, **params)
    expected = _peft_merge(tiny_model_dir, same_rank, method, weights, **peft_kwargs)
    _assert_same_deltas(_deltas(out), expected)


def test_parity_with_peft_on_mixed_ranks(tiny_model_dir, mixed, tmp_path):
    """cat and svd accept different ranks, rank patterns and missing modules, as PEFT does."""
    weights = [1.0, 0.5, 2.0]
    for method, kwargs in (("cat", {}), ("svd", {"svd_rank": 4})):
        out = merge_adapters(mixed, method, tmp_path / method, weights=weights,
                             **({"rank": 4} if kwargs else {}))
        _assert_same_deltas(_deltas(out), _peft_merge(tiny_model_dir, mixed, method, weights,
                                                      **kwargs))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_parity_with_peft_given_the_same_masks(method, monkeypatch):
    """PEFT draws DARE masks with torch.bernoulli from the global RNG; replaying our masks
    there makes the two computations comparable value by value."""
    from peft.utils import merge_utils

    from soups.compose.merge.methods import REGISTRY

    g = torch.Generator().manual_seed(0)
    tensors = torch.randn(3, 7, 5, generator=g)
    weights = torch.tensor([0.5, -1.2, 0.8])
    masks = []
    original = sparsify_module.dare_keep_mask

    def recording(shape, density, generator):
        masks.append(original(shape, density, generator))
        return masks[-1]

    monkeypatch.setattr(sparsify_module, "dare_keep_mask", recording)
    extra = {"majority_sign_method": "frequency"} if method == "dare_ties" else {}
    ours = REGISTRY.get(method).fn(tensors, weights, density=0.4,
                                   generator=torch.Generator().manual_seed(3), **extra)
    replay = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda probabilities: next(replay))
    expected = getattr(merge_utils, method)(list(tensors), weights, 0.4, **extra)
    torch.testing.assert_close(ours, expected)
    assert 0.2 < sum(float(m.mean()) for m in masks) / len(masks) < 0.6  # ~density kept


def test_task_arithmetic_and_cat_are_the_exact_weighted_sum(mixed, tmp_path):
    weights = [0.3, -1.5, 2.0]
    expected = _dense_sum(mixed, weights)
    for method in ("task_arithmetic", "cat"):
        out = merge_adapters(mixed, method, tmp_path / method, weights=weights)
        _assert_same_deltas(_deltas(out), expected, rtol=1e-5, atol=1e-6)
        ranks = {n: LoraAdapter.open(out).rank_of(n) for n in expected}
        assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 6 + 3
        assert ranks["model.layers.0.mlp.up_proj"] == 2 + 3  # rank_pattern honoured, no c


def test_svd_is_the_best_rank_r_approximation(mixed, tmp_path):
    """Eckart-Young: the factor-space SVD equals the truncated SVD of the dense sum."""
    weights = [1.0, 0.5, -0.7]
    out = merge_adapters(mixed, "svd", tmp_path / "svd", weights=weights, rank=3)
    merged = _deltas(out)
    for name, dense in _dense_sum(mixed, weights).items():
        u, s, vh = torch.linalg.svd(dense)
        torch.testing.assert_close(merged[name], (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-5,
                                   atol=1e-6)
    # With the full rank the truncation is exact.
    full = merge_adapters(mixed, "svd", tmp_path / "full", weights=weights, rank=11)
    _assert_same_deltas(_deltas(full), _dense_sum(mixed, weights))


def test_subspace_iteration_matches_lapack_on_large_modules():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(900, 24, generator=g) @ torch.randn(24, 700, generator=g)
    dense = signal + 1e-3 * torch.randn(900, 700, generator=g)
    assert 700 > LAPACK_MAX_SIDE  # this module takes the iteration path ...
    assert _subspace_iteration(dense, 16, 24 + 16) is not None  # ... and it converges
    iterated = truncate_dense(dense, 16, block=24).delta().double()
    u, s, vh = torch.linalg.svd(dense.double())
    exact = (u[:, :16] * s[:16]) @ vh[:16]
    # Against the float64 truncation, the float32 iteration is as accurate as float32 LAPACK
    # (its peer): entrywise errors are round-off of the ~1e3 singular values, not 0.
    lapack32 = _lapack(dense, 16).delta().double()
    assert (iterated - exact).abs().max() <= 2 * (lapack32 - exact).abs().max()
    assert (iterated - exact).norm() / exact.norm() < 2e-5
    low = LoraModule(A=torch.randn(5, 700, generator=g), B=torch.randn(900, 5, generator=g),
                     scaling=0.5)
    torch.testing.assert_close(truncate_lora(low, 5).delta(), low.delta(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "cat", "task_arithmetic", "svd", "ties",
                                    "magnitude_prune", "ties_svd", "dare_ties", "dare_linear_svd"])
def test_one_adapter_with_weight_one_is_itself(same_rank, tmp_path, method):
    params = {"density": 1.0} if method not in ("linear", "cat", "task_arithmetic", "svd") \
        else {}
    out = merge_adapters(same_rank[:1], method, tmp_path / "out", weights=[1.0], **params)
    _assert_same_deltas(_deltas(out), _deltas(same_rank[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "cat", "task_arithmetic", "svd"])
def test_opposite_weights_of_one_adapter_cancel(same_rank, tmp_path, method):
    out = merge_adapters([same_rank[0], same_rank[0]], method, tmp_path / "out",
                         weights=[1.0, -1.0])
    for delta in _deltas(out).values():
        assert delta.abs().max() < 1e-6


@pytest.mark.parametrize("method", ["linear", "ties", "cat", "svd", "ties_svd",
                                    "magnitude_prune_svd"])
def test_order_of_the_adapters_does_not_matter(same_rank, tmp_path, method):
    params = {"density": 0.5} if ("ties" in method or "prune" in method) else {}
    one = merge_adapters(same_rank, method, tmp_path / "one", weights=[1, 2, 3], **params)
    two = merge_adapters(same_rank[::-1], method, tmp_path / "two", weights=[3, 2, 1], **params)
    _assert_same_deltas(_deltas(one), _deltas(two), rtol=1e-5, atol=1e-6)


def test_random_merges_are_reproducible_by_seed(same_rank, tmp_path):
    runs = [merge_adapters(same_rank, "dare_ties", tmp_path / f"r{i}", density=0.5, seed=seed)
            for i, seed in enumerate((7, 7, 8))]
    first, again, other = (_deltas(r) for r in runs)
    _assert_same_deltas(first, again, rtol=0, atol=0)
    assert any((first[n] - other[n]).abs().max() > 1e-4 for n in first)


def test_default_weights_and_recorded_provenance(same_rank, tmp_path):
    out = merge_adapters(same_rank, "linear", tmp_path / "mean")
    _assert_same_deltas(_deltas(out), _peft_merge_free_mean(same_rank), rtol=1e-5, atol=1e-6)
    record = read_provenance(out)["merge"]
    assert "soups" not in json.loads((out / "adapter_config.json").read_text())
    assert record["method"] == "linear" and record["parameters"]["weights"] == [1 / 3] * 3
    assert record["adapters"] == [str(p) for p in same_rank]


def _peft_merge_free_mean(adapter_dirs):
    """Factor-space linear with weights 1/k: A = sum sqrt(s_i/k) A_i, B = sum sqrt(s_i/k) B_i."""
    adapters = [LoraAdapter.open(p) for p in adapter_dirs]
    out = {}
    for name in adapters[0].module_names:
        mods = [a.module(name) for a in adapters]
        roots = [math.sqrt(m.scaling / len(mods)) for m in mods]
        a = sum(r * m.A for r, m in zip(roots, mods, strict=True))
        b = sum(r * m.B for r, m in zip(roots, mods, strict=True))
        out[name] = (b @ a).double()
    return out


def test_merged_folder_loads_in_peft_with_the_dense_merged_logits(tiny_model_dir, mixed,
                                                                  tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_adapters(mixed, "cat", tmp_path / "cat", weights=[1.0, -0.5, 0.25])
    ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        modules = dict(dense.named_modules())
        for name, delta in _dense_sum(mixed, [1.0, -0.5, 0.25]).items():
            modules[name].weight += delta.float()
        torch.testing.assert_close(peft_logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_method_parameters_are_declared():
    assert method_parameters("ties") == {"weights", "density", "majority_sign_method"}
    assert method_parameters("dare_ties_svd") == {"weights", "density", "majority_sign_method",
                                                  "rank", "seed"}
    assert method_parameters("svd") == {"weights", "rank"}
    assert method_parameters("no_such_method") is None


@pytest.mark.parametrize("method, params, message", [
    ("lineer", {}, "unknown merge method 'lineer'"),
    ("ties", {"desnity": 0.5}, "takes no parameter 'desnity'"),
    ("ties", {}, "needs parameter 'density'"),
    ("ties", {"density": 1.5}, "density=1.5"),
    ("ties", {"density": 0.5, "majority_sign_method": "most"}, "majority_sign_method='most'"),
    ("linear", {"weights": [1.0, 2.0]}, "2 weights for 3 adapters"),
    ("linear", {"weights": [1.0, float("nan"), 1.0]}, "weights="),
    ("svd", {"rank": 0}, "rank=0"),
])
def test_bad_parameters_name_the_value(same_rank, tmp_path, method, params, message):
    with pytest.raises(MergeError, match=message.replace("[", r"\[")):
        merge_adapters(same_rank, method, tmp_path / "out", **params)
    assert not (tmp_path / "out").exists()


def test_incompatible_adapters_are_refused_by_name(tiny_model_dir, same_rank, mixed, tmp_path):
    with pytest.raises(MergeError,
                       match=r"needs equal ranks, module \S+ has \S+/a: r=2, \S+/b: r=6"):
        merge_adapters(mixed[:2], "ties", tmp_path / "o", density=0.5)
    with pytest.raises(MergeError, match=r"adapter \S+/c lacks module \S+.mlp.down_proj"):
        merge_adapters([same_rank[0], mixed[2]], "linear", tmp_path / "o")
    other = tmp_path / "other_base"
    _write(tiny_model_dir, other, 4, 8.0, 9)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="some/other-model"):
        merge_adapters([same_rank[0], other], "cat", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_nan_weights_and_unsupported_variants_are_refused(same_rank, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        (LoraAdapter.open(same_rank[1]).path / "adapter_config.json").read_text())
    tensors = load_file(LoraAdapter.open(same_rank[1]).path / "adapter_model.safetensors")
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    with pytest.raises(AdapterError, match=rf"{broken}, module {module}: NaN"):
        merge_adapters([same_rank[0], broken], "cat", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        merge_adapters([same_rank[0], broken], "cat", tmp_path / "out")


def test_cli_merges_and_lists(same_rank, tmp_path):
    from typer.testing import CliRunner

    from study.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["merge", "--list"])
    assert listed.exit_code == 0
    for name in ("ties_svd", "dare_ties", "cat_learned", "--majority-sign"):
        assert name in listed.output
    out = tmp_path / "cli"
    done = runner.invoke(app, ["merge", "--method", "ties", "--out", str(out), *same_rank,
                               "--weights", "1", "--weights", "0.5", "--weights", "2",
                               "--density", "0.7", "--majority-sign", "frequency"])
    assert done.exit_code == 0, done.output
    direct = merge_adapters(same_rank, "ties", tmp_path / "direct", weights=[1, 0.5, 2],
                            density=0.7, majority_sign_method="frequency")
    _assert_same_deltas(_deltas(out), _deltas(direct), rtol=0, atol=0)
    bad = runner.invoke(app, ["merge", "--method", "linear", "--out", str(tmp_path / "x"),
                              *same_rank, "--density", "0.5"])
    assert bad.exit_code == 2 and "takes no parameter 'density'" in bad.output


def test_cli_bad_inputs_are_one_line_errors(same_rank, tiny_model_dir, tmp_path):
    """A folder that is missing, not an adapter, or for layers of another shape stops
    `soups merge` with exit status 2 and one line naming it; nothing is written."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not an adapter")
    module = "model.layers.0.self_attn.q_proj"
    wide = save_adapter(tmp_path / "wide", {module: LoraModule(  # same base model name
        A=torch.ones(4, 48), B=torch.ones(48, 4), scaling=1.0)},
        {"base_model_name_or_path": str(tiny_model_dir), "task_type": "CAUSAL_LM"})
    out = tmp_path / "out"
    for method in ("linear", "cat"):
        merge = ["merge", "--method", method, "--out", out, same_rank[0]]
        assert_user_error([*merge, tmp_path / "absent"], tmp_path / "absent", "no such folder")
        assert_user_error([*merge, tmp_path / "plain"], tmp_path / "plain",
                          "adapter_config.json")
        assert_user_error([*merge, wide], wide, module, "48 x 48", "32 x 32")
    assert_user_error(["merge", "--method", "tie", "--out", out, *same_rank], "'tie'")
    assert not out.exists()


@pytest.mark.parametrize("dare, plain", [("dare_linear", "linear"), ("dare_ties", "ties"),
                                         ("dare_linear_svd", "svd")])
def test_dare_at_density_one_is_its_deterministic_peer(same_rank, tmp_path, dare, plain):
    weights = [0.5, 1.5, -0.25]
    params = {"density": 1.0} if plain == "ties" else {}
    one = merge_adapters(same_rank, dare, tmp_path / "dare", weights=weights, density=1.0,
                         seed=5)
    two = merge_adapters(same_rank, plain, tmp_path / "plain", weights=weights, **params)
    _assert_same_deltas(_deltas(one), _deltas(two), rtol=1e-5, atol=1e-6)
