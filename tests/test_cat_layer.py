"""CAT layer, weight initialisation, settings and skill mix against dense reference values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soups.adapters import LoraModule
from soups.compose.cat.layer import CatLinear, CatWeights, delta_norm
from soups.compose.cat.mix import skill_mix
from soups.compose.cat.model import group_key, initial_logits
from soups.compose.cat.settings import CatSettings

pytestmark = pytest.mark.unit

IN, OUT = 12, 10


def _lora(rank: int, scaling: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(rank, IN, generator=g, dtype=torch.float64),
                      B=torch.randn(OUT, rank, generator=g, dtype=torch.float64),
                      scaling=scaling)


def _base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=True, dtype=torch.float64)


def _dense(base: nn.Linear, loras, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W0 x + b + sum_i a_i s_i B_i A_i x with the dense dW_i."""
    delta = sum(a[j] * m.scaling * (m.B @ m.A) for j, m in enumerate(loras))
    return x @ (base.weight + delta).T + base.bias


@pytest.mark.parametrize("normalisation", ["softmax", "none"])
def test_forward_equals_dense_weighted_sum(normalisation):
    loras = [_lora(2, 0.5, 1), _lora(3, 2.0, 2), _lora(4, 1.5, 3)]
    weights = CatWeights(torch.tensor([[0.3, -1.2, 0.8], [2.0, 0.1, -0.4]]), normalisation)
    base = _base()
    layer = CatLinear(base, loras, group=1, weights=weights)
    x = torch.randn(5, 7, IN, dtype=torch.float64)
    logits = weights.logits[1].detach().double()
    a = torch.softmax(logits, 0) if normalisation == "softmax" else logits
    torch.testing.assert_close(layer(x), _dense(base, loras, a, x), rtol=1e-6, atol=1e-6)


def test_module_without_some_loras_mixes_the_present_ones():
    loras = [_lora(2, 0.5, 1), None, _lora(4, 1.5, 3)]
    weights = CatWeights(torch.tensor([[0.3, 5.0, 0.8]]), "softmax")
    base = _base()
    layer = CatLinear(base, loras, group=0, weights=weights)
    x = torch.randn(6, IN, dtype=torch.float64)
    a = torch.softmax(torch.tensor([0.3, 0.8], dtype=torch.float64), 0)
    torch.testing.assert_close(layer(x), _dense(base, [loras[0], loras[2]], a, x),
                               rtol=1e-6, atol=1e-6)
    assert layer.present.tolist() == [0, 2]


def test_weight_gradient_equals_dense_autograd():
    loras = [_lora(2, 0.5, 1), _lora(3, 2.0, 2)]
    start = torch.tensor([[0.4, -0.7]])
    weights = CatWeights(start, "softmax")
    base = _base()
    layer = CatLinear(base, loras, group=0, weights=weights)
    x = torch.randn(9, IN, dtype=torch.float64)
    probe = torch.randn(9, OUT, dtype=torch.float64)
    (layer(x) * probe).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None and layer.lora_A.grad is None
    reference = start.double().clone().requires_grad_(True)
    (_dense(base, loras, torch.softmax(reference[0], 0), x) * probe).sum().backward()
    torch.testing.assert_close(weights.logits.grad.double(), reference.grad, rtol=1e-5,
                               atol=1e-6)


def test_layer_rejects_factors_that_do_not_fit():
    bad = LoraModule(A=torch.randn(2, IN + 1), B=torch.randn(OUT, 2), scaling=1.0)
    with pytest.raises(ValueError, match="q_proj, LoRA 0"):
        CatLinear(_base(), [bad], 0, CatWeights(torch.zeros(1, 1), "none"), "q_proj")


def test_delta_norm_equals_dense_frobenius_norm():
    m = _lora(3, -2.5, 7)
    assert delta_norm(m) == pytest.approx(float(torch.linalg.norm(m.scaling * m.B @ m.A)),
                                          rel=1e-12)


def _norms(k: int = 3, groups: int = 2) -> torch.Tensor:
    return torch.rand(groups, k, dtype=torch.float64) + 0.1


def test_initial_mixtures():
    names, groups = ["a", "b", "c"], ["g0", "g1"]
    norms = _norms()

    def mixture(**kw):
        s = CatSettings(**kw)
        logits = initial_logits(s, norms, names, groups)
        return torch.softmax(logits, 1) if s.normalisation == "softmax" else logits

    torch.testing.assert_close(mixture(init="uniform"), torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(mixture(init="uniform", normalisation="none"),
                               torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(mixture(init="ones", normalisation="none"), torch.ones(2, 3))
    values = (0.2, 0.5, 0.3)
    for normalisation in ("softmax", "none"):
        got = mixture(init="values", init_values=values, normalisation=normalisation)
        torch.testing.assert_close(got, torch.tensor([values, values], dtype=torch.float64))
        # norm: a_i ||dW_i|| is the same for every LoRA of a group, and a sums to 1.
        a = mixture(init="norm", normalisation=normalisation)
        scaled = a * norms
        torch.testing.assert_close(scaled, scaled[:, :1].expand(2, 3))
        torch.testing.assert_close(a.sum(1), torch.ones(2, dtype=torch.float64))
    first, again = mixture(init="randn", seed=3), mixture(init="randn", seed=3)
    assert torch.equal(first, again) and not torch.equal(first, mixture(init="randn", seed=4))


def test_norm_init_ignores_loras_absent_from_a_group():
    norms = torch.tensor([[2.0, 0.0, 4.0]], dtype=torch.float64)
    logits = initial_logits(CatSettings(init="norm"), norms, ["a", "b", "c"], ["g"])
    a = torch.softmax(logits[0, [0, 2]], 0)
    torch.testing.assert_close(a, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_values_count_must_match_the_loras():
    with pytest.raises(ValueError, match="2 numbers for 3 LoRAs"):
        initial_logits(CatSettings(init="values", init_values=(0.5, 0.5)), _norms(),
                       ["a", "b", "c"], ["g0", "g1"])


@pytest.mark.parametrize("kwargs, message", [
    ({"granularity": "row"}, "granularity"),
    ({"normalisation": "sigmoid"}, "normalisation"),
    ({"init": "zeros"}, "init"),
    ({"init": "ones"}, "needs normalisation 'none'"),
    ({"init": "values"}, "go together"),
    ({"init": "values", "init_values": (0.5, 0.6)}, "summing to 1"),
    ({"init": "values", "init_values": (1.5, -0.5)}, "positive"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CatSettings(**kwargs)


def test_group_keys():
    name = "model.layers.3.self_attn.q_proj"
    assert group_key(name, "module") == name
    assert group_key(name, "layer") == "model.layers.3"
    assert group_key("model.layers.3.mlp.up_proj", "layer") == "model.layers.3"
    assert group_key(name, "global") == "global"
    with pytest.raises(ValueError, match="lm_head has no layer index"):
        group_key("lm_head", "layer")


def _rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "completion": "x", "other": i} for i in range(n)]


def test_skill_mix_sizes_disjoint_and_seeded():
    skills = [_rows("a", 200), _rows("b", 100)]
    train, held = skill_mix(skills, fraction=0.05, held_out=11, seed=1)
    assert sorted(r["prompt"][0] for r in train) == ["a"] * 10 + ["b"] * 5
    assert sorted(r["prompt"][0] for r in held) == ["a"] * 6 + ["b"] * 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert set(train[0]) == {"prompt", "completion"}
    assert skill_mix(skills, fraction=0.05, held_out=11, seed=1) == (train, held)
    assert skill_mix(skills, fraction=0.05, held_out=11, seed=2) != (train, held)
    by_count, _ = skill_mix(skills, fraction=None, count=7, held_out=2)
    assert sorted(r["prompt"][0] for r in by_count) == ["a"] * 4 + ["b"] * 3


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 0.5, "count": 10}, "exactly one"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": None, "count": 1}, "at least the number of skills"),
    ({"held_out": -1}, "held_out"),
    ({"fraction": 1.0}, "skill 0 has 20 rows"),
])
def test_skill_mix_rejects_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skill_mix([_rows("a", 20), _rows("b", 20)], **kwargs)
