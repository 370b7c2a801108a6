"""KnOTS and LoRA-LEGO against their definitions, comparing products s B A (never A and B):
KnOTS against a dense implementation of the paper (SVD of the concatenated dense updates,
the project's TIES / DARE-TIES on the task rows, rebuild), LoRA-LEGO against the rebuild of
reweighted centroids from its clusters and against `cat` where nothing is clustered; both
through the engine into PEFT folders that PEFT loads back with the same products."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge import _deltas, mixed_adapters  # noqa: F401 (the fixture `mixed`, shared)

from soups.adapters import LoraAdapter, LoraModule
from soups.compose.merge import MergeError, merge_adapters, method_parameters
from soups.compose.merge.engine import _module_generator
from soups.compose.merge.knots import aligned_rows
from soups.compose.merge.lora_lego import kmeans, orient, units
from soups.compose.merge.methods import REGISTRY

pytestmark = pytest.mark.unit  # merge math on small tensors and tiny adapter folders
KNOTS = REGISTRY.get("knots").fn
LEGO = REGISTRY.get("lora_lego").fn
EPS64 = torch.finfo(torch.float64).eps


def _module(rank, scaling, seed, out_features=20, in_features=12) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(rank, in_features, generator=g),
                      B=torch.randn(out_features, rank, generator=g), scaling=scaling)


def _delta64(module: LoraModule) -> torch.Tensor:
    """s B A in float64 from the float32 factors (exact: no float32 product round-off)."""
    return module.scaling * module.B.double() @ module.A.double()


def _assert_products(merged: LoraModule, expected: torch.Tensor, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(_delta64(merged), expected.double(), rtol=rtol, atol=atol)


MODULES = [_module(2, 0.5, 1), _module(3, 2.0, 2), _module(4, 1.0, 3)]
WEIGHTS = [0.7, -0.4, 1.3]


def _dense_knots(modules, weights, merge: str, **params) -> torch.Tensor:
    """The paper's KnOTS on dense matrices: SVD of [dW_1 ... dW_k] (out x k in), rows S V_i^T
    of the nonzero singular values (signs as KnOTS fixes them), merged by the project's
    registered method, rebuilt."""
    in_features = modules[0].A.shape[1]
    concatenated = torch.cat([_delta64(m) for m in modules], dim=1)
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    keep = int((s > s[0] * max(concatenated.shape) * EPS64).sum())
    for j in range(keep):  # KnOTS' sign convention: each u's largest-magnitude entry > 0
        if u[u[:, j].abs().argmax(), j] < 0:
            u[:, j], vh[j] = -u[:, j], -vh[j]
    rows = torch.stack([(s[:keep, None] * vh[:keep])[:, i * in_features:(i + 1) * in_features]
                        for i in range(len(modules))])
    merged = REGISTRY.get(merge).fn(rows.float(), torch.tensor(weights), **params)
    return u[:, :keep] @ merged.double()


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties", "dare_ties"])
def test_knots_of_one_adapter_is_the_adapter(merge):
    module = MODULES[1]
    merged = KNOTS([module], [1.0], generator=torch.Generator().manual_seed(0), merge=merge,
                   density=1.0)
    _assert_products(merged, _delta64(module))
    assert merged.rank == module.rank  # zero singular values dropped


def test_knots_task_arithmetic_is_the_exact_weighted_sum_at_full_rank():
    merged = KNOTS(MODULES, WEIGHTS, generator=None, merge="task_arithmetic")
    _assert_products(merged, sum(w * _delta64(m) for m, w in zip(MODULES, WEIGHTS, strict=True)))
    assert merged.rank == 2 + 3 + 4


def test_knots_factor_svd_equals_the_dense_svd_of_the_concatenation():
    """The aligned basis from the factors: U orthonormal, U S V_i^T = dW_i exactly, and the
    singular values are the dense concatenation's nonzero ones (a repeated adapter adds
    none: the rank of [dW_1 dW_2 dW_1] is r_1 + r_2)."""
    modules = [MODULES[0], MODULES[2], MODULES[0]]
    u, rows = aligned_rows(modules)
    assert u.shape == (20, 2 + 4) and rows.shape == (3, 2 + 4, 12)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    for module, row in zip(modules, rows, strict=True):
        torch.testing.assert_close(u @ row, _delta64(module))
    dense = torch.linalg.svdvals(torch.cat([_delta64(m) for m in modules], dim=1))
    torch.testing.assert_close(torch.cat(list(rows), dim=1).norm(dim=1), dense[:6])


@pytest.mark.parametrize("merge, sign", [("ties", "total"), ("ties", "frequency"),
                                         ("dare_ties", "total")])
@pytest.mark.parametrize("repeated", [False, True])
def test_knots_ties_and_dare_ties_equal_the_dense_definition(merge, sign, repeated):
    """The factor path and the dense path agree value for value (with the same signs of the
    singular vectors: frequency votes are not flip-equivariant); with a repeated adapter
    both drop the same zero singular values."""
    modules = MODULES + [MODULES[1]] if repeated else MODULES
    weights = WEIGHTS + [0.5] if repeated else WEIGHTS
    params = {"density": 0.6, "majority_sign_method": sign}
    extra = {"generator": torch.Generator().manual_seed(4)} if merge == "dare_ties" else {}
    merged = KNOTS(modules, weights, generator=torch.Generator().manual_seed(4), merge=merge,
                   **params)
    _assert_products(merged, _dense_knots(modules, weights, merge, **params, **extra))
    assert merged.rank <= sum(m.rank for m in MODULES)


def test_knots_rank_is_the_truncated_svd_of_its_merge():
    full = KNOTS(MODULES, WEIGHTS, generator=None, merge="ties", density=0.7)
    truncated = KNOTS(MODULES, WEIGHTS, generator=None, merge="ties", density=0.7, rank=3)
    u, s, vh = torch.linalg.svd(_delta64(full))
    assert truncated.rank == 3
    _assert_products(truncated, (u[:, :3] * s[:3]) @ vh[:3])


def test_lego_with_a_cluster_per_unit_is_cat_times_the_output_reweighting():
    """k = total rank: no unit is averaged, parameter reweighting is 1, and the merged update
    is the concatenation (`cat`, the weighted sum) times sqrt(r / k), r the largest rank."""
    cat = REGISTRY.get("cat").fn(MODULES, WEIGHTS)
    for k in (9, 12):  # a rank above the number of units keeps every unit
        merged = LEGO(MODULES, WEIGHTS, generator=torch.Generator().manual_seed(0), rank=k)
        assert merged.rank == 9
        _assert_products(merged, math.sqrt(4 / 9) * _delta64(cat))


def test_lego_of_one_adapter_at_its_rank_is_the_adapter():
    merged = LEGO(MODULES[2:], [1.0], generator=torch.Generator().manual_seed(0), rank=None)
    _assert_products(merged, _delta64(MODULES[2]))


def test_sign_fixing_puts_a_unit_and_its_negation_in_one_cluster():
    """(B, A) and (-B, -A) are one LoRA; after orientation their units are the same points,
    so each cluster holds a unit and its negation, the centroid is the unit, and merging the
    two at rank r gives the adapter back."""
    module = MODULES[2]
    negated = LoraModule(A=-module.A, B=-module.B, scaling=module.scaling)
    vectors = torch.cat([module.B.double().T, module.A.double()], dim=1)
    torch.testing.assert_close(orient(vectors), orient(-vectors), rtol=0, atol=0)
    pool = units([module, negated], [1.0, 1.0])
    labels = kmeans(pool, 4, torch.Generator().manual_seed(0))
    assert torch.equal(labels[:4], labels[4:]) and len(set(labels.tolist())) == 4
    merged = LEGO([module, negated], [1.0, 1.0], generator=torch.Generator().manual_seed(0),
                  rank=4)
    _assert_products(merged, _delta64(module))


def _reference_units(modules, weights) -> torch.Tensor:
    """Units from the definition: [sqrt|w s| b_j ; sign(w s) sqrt|w s| a_j], turned so the
    largest-magnitude entry is positive."""
    rows = []
    for m, w in zip(modules, weights, strict=True):
        c = math.sqrt(abs(w * m.scaling))
        for j in range(m.rank):
            row = torch.cat([c * m.B[:, j].double(), math.copysign(c, w * m.scaling)
                             * m.A[j].double()])
            rows.append(row if row[row.abs().argmax()] > 0 else -row)
    return torch.stack(rows)


def test_lego_below_the_total_rank_rebuilds_the_reweighted_centroids():
    """k < total: rank k; the labels are a Lloyd fixed point (every unit nearest its own
    cluster's mean); B A = sqrt(r / k) sum_c rho_c^2 b_c a_c^T, with centroid c = (b_c; a_c)
    the mean of its units and rho_c = (mean norm of its units) / |centroid c|."""
    pool = _reference_units(MODULES, WEIGHTS)
    torch.testing.assert_close(units(MODULES, WEIGHTS), pool, rtol=0, atol=0)
    labels = kmeans(pool, 3, torch.Generator().manual_seed(2))
    centroids = torch.stack([pool[labels == c].mean(dim=0) for c in range(3)])
    assert torch.equal(torch.cdist(pool, centroids).argmin(dim=1), labels)
    expected = torch.zeros(20, 12, dtype=torch.float64)
    for c in range(3):
        rho = pool[labels == c].norm(dim=1).mean() / centroids[c].norm()
        expected += rho**2 * torch.outer(centroids[c, :20], centroids[c, 20:])
    merged = LEGO(MODULES, WEIGHTS, generator=torch.Generator().manual_seed(2), rank=3)
    assert merged.rank == 3 and torch.linalg.matrix_rank(merged.delta()) == 3
    _assert_products(merged, math.sqrt(4 / 3) * expected)


def test_lego_merges_noisy_copies_back_into_the_adapter():
    """Three noisy copies of one LoRA at its rank: each cluster gathers one unit of each copy
    (the copies' j-th units), the centroids are the means, and the result is the LoRA."""
    base = MODULES[2]
    g = torch.Generator().manual_seed(7)
    copies = [LoraModule(A=base.A + 1e-3 * torch.randn(base.A.shape, generator=g),
                         B=base.B + 1e-3 * torch.randn(base.B.shape, generator=g),
                         scaling=base.scaling) for _ in range(3)]
    labels = kmeans(units(copies, [1.0] * 3), 4, torch.Generator().manual_seed(0))
    assert all(sorted(labels[c::4].tolist()) == [labels[c].item()] * 3 for c in range(4))
    merged = LEGO(copies, [1.0] * 3, generator=torch.Generator().manual_seed(0), rank=None)
    _assert_products(merged, _delta64(base), rtol=0, atol=1e-2)  # noise ~1e-3, |dW| ~ 6


def test_lego_is_deterministic_given_the_seed():
    many = [_module(4, 1.0, seed) for seed in range(10, 16)]
    runs = [LEGO(many, [1.0] * 6, generator=torch.Generator().manual_seed(seed), rank=5)
            for seed in (3, 3)]
    assert torch.equal(runs[0].A, runs[1].A) and torch.equal(runs[0].B, runs[1].B)


@pytest.mark.parametrize("method, params", [
    ("knots", {"merge": "task_arithmetic"}),
    ("knots", {"merge": "ties", "density": 0.6}),
    ("knots", {"merge": "dare_ties", "density": 0.5, "seed": 3, "rank": 4}),
    ("lora_lego", {}),
    ("lora_lego", {"rank": 3, "seed": 5}),
])
def test_engine_writes_a_peft_adapter_with_the_module_functions_products(
        tiny_model_dir, mixed, tmp_path, method, params):
    """Every module of any input is written, PEFT loads the folder and its delta weights are
    the products the method's function computes on the modules present (the engine's
    generator per module for the random parts)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [1.0, 0.5, -0.8]
    out = merge_adapters(mixed, method, tmp_path / "out", weights=weights, **params)
    adapters = [LoraAdapter.open(p) for p in mixed]
    names = sorted(set().union(*(a.module_names for a in adapters)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(out))
    loaded = {name.removeprefix("base_model.model."): layer.get_delta_weight("default")
              for name, layer in model.named_modules()
              if hasattr(layer, "lora_A") and "default" in layer.lora_A}
    assert sorted(loaded) == names
    kwargs = {k: v for k, v in params.items() if k != "seed"}
    for name in names:
        present = [(a.module(name), w) for a, w in zip(adapters, weights, strict=True)
                   if name in a.module_names]
        expected = REGISTRY.get(method).fn(
            [m for m, _ in present], [w for _, w in present],
            generator=_module_generator(params.get("seed", 0), name), **kwargs)
        torch.testing.assert_close(loaded[name], expected.delta(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"module {name}: {m}")
    if method == "knots" and params["merge"] == "task_arithmetic":  # and the exact sum
        for name, delta in _deltas(out).items():
            total = sum(w * m.delta().double() for m, w in
                        ((a.module(name), w) for a, w in zip(adapters, weights, strict=True)
                         if name in a.module_names))
            torch.testing.assert_close(delta, total, rtol=1e-5, atol=1e-6)


def test_declared_parameters():
    assert method_parameters("knots") == {"weights", "merge", "density",
                                          "majority_sign_method", "rank", "seed"}
    assert method_parameters("lora_lego") == {"weights", "rank", "seed"}


@pytest.mark.parametrize("method, params, message", [
    ("knots", {"merge": "ties", "desnity": 0.5}, "takes no parameter 'desnity'"),
    ("knots", {"merge": "ties", "density": 1.5}, "parameter density=1.5"),
    ("knots", {"merge": "dare_ties", "density": 0.0}, "parameter density=0.0"),
    ("knots", {"merge": "magnitude", "density": 0.5}, "parameter merge='magnitude'"),
    ("knots", {"merge": "ties"}, "merge='ties' needs parameter 'density'"),
    ("knots", {"density": 0.5, "rank": 0}, "parameter rank=0"),
    ("lora_lego", {"density": 0.5}, "takes no parameter 'density'"),
    ("lora_lego", {"rank": 0}, "parameter rank=0"),
    ("lora_lego", {"seed": -1}, "parameter seed=-1"),
])
def test_bad_parameters_are_named(mixed, tmp_path, method, params, message):
    with pytest.raises(MergeError, match=message):
        merge_adapters(mixed, method, tmp_path / "out", **params)
    assert not (tmp_path / "out").exists()


def test_search_spaces_name_the_methods_and_check_their_values():
    from search_spaces import SearchSpaceError, parse_space
    from study.resolve import method_parameters as declared

    space = parse_space({"methods": {
        "knots": {"merge": {"choice": ["ties", "dare_ties"]}, "density": {"uniform": [0.3, 1]}},
        "lora_lego": {"rank": {"choice": [4, 8]}, "seed": 1}}}, "x.yaml", declared)
    assert set(space.methods) == {"knots", "lora_lego"}
    for methods, message in [
        ({"knots": {"density": 3}}, "x.yaml: methods.knots.density: 3 is outside (0, 1]"),
        ({"knots": {"merge": {"choice": ["ties", "linear"]}}},
         "x.yaml: methods.knots.merge: choice value 'linear' is not valid"),
        ({"lora_lego": {"k": 4}}, "x.yaml: method 'lora_lego' takes no parameter 'k'"),
    ]:
        with pytest.raises(SearchSpaceError) as err:
            parse_space({"methods": methods}, "x.yaml", declared)
        assert str(err.value).startswith(message)


def test_cli_lists_and_runs_them(mixed, tmp_path):
    from typer.testing import CliRunner

    from study.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["merge", "--list"])
    assert listed.exit_code == 0
    for text in ("knots", "https://arxiv.org/abs/2410.19735", "--merge", "lora_lego",
                 "https://arxiv.org/abs/2409.16167"):
        assert text in listed.output
    out = tmp_path / "cli"
    done = runner.invoke(app, ["merge", "--method", "knots", "--out", str(out), *mixed,
                               "--merge", "dare_ties", "--density", "0.5", "--seed", "2"])
    assert done.exit_code == 0, done.output
    direct = merge_adapters(mixed, "knots", tmp_path / "direct", merge="dare_ties",
                            density=0.5, seed=2)
    ours, theirs = _deltas(out), _deltas(direct)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
