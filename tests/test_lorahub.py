"""LoraHub (soups/compose/lorahub/): both compositions against their definitions on hand-built
modules, the objective on the tiny model against a direct dense computation and against
PEFT loading the written adapter, the search on a toy with a known minimum (seeded, exactly
`budget` evaluations), settings validation, and `soups merge --method lorahub` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_user_error, raises_naming, write_random_lora
from typer.testing import CliRunner

from soups.adapters import LoraAdapter, LoraModule, read_provenance, save_adapter
from soups.compose.cat.mix import skill_mix
from soups.compose.lorahub import (
    LorahubError,
    LorahubSettings,
    compose_exact,
    compose_lorahub,
    lorahub_merge,
    search_weights,
)
from soups.compose.lorahub.compose import COMPOSITIONS, check_composable, compose_all
from soups.compose.lorahub.run import SUMMARY_JSON, read_factors
from soups.compose.lorahub.settings import COMPOSITION_NAMES
from soups.evaluation.evaluate import mean_completion_loss

# Forward passes of the tiny model and a few-evaluation search: no training, so unit.
pytestmark = pytest.mark.unit

TARGETS = ("q_proj", "v_proj")


def _module(a, b, scaling):
    return LoraModule(A=torch.tensor(a, dtype=torch.float64),
                      B=torch.tensor(b, dtype=torch.float64), scaling=scaling)


def _delta(m: LoraModule) -> torch.Tensor:
    return m.scaling * m.B @ m.A  # in the factors' float64 (LoraModule.delta is float32)


# Two rank-2 LoRAs of a 2 x 3 layer with small integer factors, and a rank-1 one.
ONE = _module([[1, 0, 2], [0, 1, -1]], [[1, 2], [0, -1]], 2.0)
TWO = _module([[0, 3, 1], [1, 1, 0]], [[2, 0], [1, 1]], 2.0)
THIRD = _module([[1, 1, 1]], [[3], [-2]], 0.5)


def test_lorahub_composition_is_the_product_of_the_summed_factors():
    w = [0.5, -1.25]
    composed = compose_lorahub([ONE, TWO], w)
    # LoraHub sums the state dicts: B A = s (w1 B1 + w2 B2)(w1 A1 + w2 A2), cross terms included.
    expected = 2.0 * (w[0] * ONE.B + w[1] * TWO.B) @ (w[0] * ONE.A + w[1] * TWO.A)
    assert composed.rank == 2 and composed.scaling == 1.0
    assert torch.allclose(composed.B @ composed.A, expected, rtol=0, atol=1e-12)
    # Worked by hand: sum B = [[-2, 1], [-1.25, -1.75]], sum A = [[0.5, -3.75, -0.25],
    # [-1.25, -0.75, -0.5]], times s = 2.
    assert torch.allclose(expected, torch.tensor([[-4.5, 13.5, 0.0], [3.125, 12.0, 2.375]],
                                                 dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(expected, w[0] * _delta(ONE) + w[1] * _delta(TWO))  # cross terms
    # Unequal scalings: sqrt(s_i) on each factor, so each own term is still w_i^2 s_i B_i A_i.
    half = LoraModule(A=TWO.A, B=TWO.B, scaling=0.5)
    mixed = compose_lorahub([ONE, half], w)
    roots = [math.sqrt(2.0), math.sqrt(0.5)]
    expected = ((w[0] * roots[0] * ONE.B + w[1] * roots[1] * TWO.B)
                @ (w[0] * roots[0] * ONE.A + w[1] * roots[1] * TWO.A))
    assert torch.allclose(mixed.B @ mixed.A, expected, atol=1e-12)


def test_exact_composition_is_the_weighted_sum_of_the_updates():
    w = [0.5, -1.25, 1.5]
    composed = compose_exact([ONE, TWO, THIRD], w)
    expected = sum(wi * _delta(m) for wi, m in zip(w, [ONE, TWO, THIRD], strict=True))
    assert composed.rank == 5 and composed.scaling == 1.0  # concatenation: sum of the ranks
    assert torch.allclose(composed.B @ composed.A, expected, rtol=0, atol=1e-12)


def test_compositions_of_one_adapter_and_of_zero_weights():
    for compose in (compose_exact, compose_lorahub):
        assert torch.allclose(_delta(compose([ONE], [1.0])), _delta(ONE), rtol=0, atol=1e-12)
        assert not _delta(compose([ONE, TWO], [0.0, 0.0])).any()
    assert sorted(COMPOSITIONS) == sorted(COMPOSITION_NAMES)


def _write(path, modules: dict[str, LoraModule]):
    copies = {n: LoraModule(A=m.A.clone(), B=m.B.clone(), scaling=m.scaling)  # no shared memory
              for n, m in modules.items()}
    return LoraAdapter.open(save_adapter(path, copies, {"base_model_name_or_path": "m"}))


def test_lorahub_composition_needs_equal_ranks_and_the_same_modules(tmp_path):
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    rank2 = _write(tmp_path / "rank2", {q: ONE, v: ONE})
    rank1 = _write(tmp_path / "rank1", {q: THIRD, v: ONE})
    only_q = _write(tmp_path / "only_q", {q: TWO})
    raises_naming(LorahubError, lambda: check_composable([rank2, rank1], "lorahub"),
                  q, "equal ranks", f"{tmp_path / 'rank2'}: r=2", f"{tmp_path / 'rank1'}: r=1")
    raises_naming(LorahubError, lambda: check_composable([rank2, only_q], "lorahub"),
                  only_q.path, v, "same modules")
    assert check_composable([rank2, rank1, only_q], "exact") == [q, v]
    factors = read_factors([rank2, rank1, only_q], [q, v])
    composed = compose_all(factors, [1.0, 2.0, 3.0], "exact")
    assert composed[q].rank == 5 and composed[v].rank == 4  # v: only two adapters carry it


@pytest.mark.parametrize("kwargs, named", [
    ({"budget": 0}, ["budget", "0"]),
    ({"examples": 0}, ["examples"]),
    ({"bounds": (1.0, 1.0)}, ["low must be below high", "low=1", "high=1"]),
    ({"bounds": (1.0, -1.0)}, ["low=1", "high=-1"]),
    ({"bounds": (0.5, 1.0)}, ["exclude the default start 0"]),
    ({"bounds": (-1.0, float("inf"))}, ["bounds", "inf"]),
    ({"composition": "sum"}, ["composition", "'sum'", "lorahub", "exact"]),
    ({"l1": -0.1}, ["l1", "-0.1"]),
    ({"init": (0.0, 2.0)}, ["init", "2 is outside", "[-1.5, 1.5]"]),
    ({"seed": -1}, ["seed"]),
])
def test_settings_name_the_bad_value(kwargs, named):
    raises_naming(LorahubError, lambda: LorahubSettings(**kwargs), *named)


def test_settings_defaults_are_lorahubs():
    settings = LorahubSettings()
    assert (settings.budget, settings.bounds, settings.l1) == (40, (-1.5, 1.5), 0.05)
    assert settings.composition == "lorahub" and settings.initial_weights(3) == [0.0] * 3
    raises_naming(LorahubError, lambda: LorahubSettings(init=(0.1, 0.2)).initial_weights(3),
                  "2 weights for 3 adapters")


# The search on a toy whose minimum is known --------------------------------------------

OPTIMUM = [0.7, -0.4, 1.1]


def _bowl(weights: list[float]) -> float:
    return sum((w - o) ** 2 for w, o in zip(weights, OPTIMUM, strict=True))


def test_search_finds_the_known_minimum_in_exactly_budget_evaluations():
    settings = LorahubSettings(budget=40, l1=0.0, seed=4)  # LoraHub's budget
    calls, records = [], []

    def loss_of(weights):
        calls.append(list(weights))
        return _bowl(weights)

    result = search_weights(loss_of, 3, settings, on_evaluation=records.append)
    assert len(calls) == len(records) == len(result.history) == result.evaluations == 40
    assert [r["step"] for r in records] == list(range(1, 41))
    assert calls[0] == [0.0, 0.0, 0.0]  # LoraHub's start
    assert [r["weights"] for r in records] == calls
    # Where exactly NGOpt lands in 40 evaluations moves with the installed cma / scipy
    # releases (1e-3 held until one of them changed): near the minimum is the claim.
    assert np.allclose(result.weights, OPTIMUM, atol=5e-3), result.weights
    assert _bowl(result.weights) < 1e-4
    assert result.objective == min(r["regularised_loss"] for r in records) == _bowl(result.weights)
    assert records[result.step - 1]["weights"] == result.weights
    assert all(-1.5 <= w <= 1.5 for r in records for w in r["weights"])
    bests = [r["best_regularised_loss"] for r in records]
    assert bests == sorted(bests, reverse=True) and bests[-1] == result.objective


def test_search_adds_the_l1_term_and_is_seeded():
    """objective = loss + l1 * mean |w| on every record; the same seed gives the same run
    whatever numpy's global state. (At LoraHub's budgets NGOpt picks COBYLA, which draws
    nothing at random, so other seeds give the same run too: the seed reaches the
    optimizers that sample.)"""

    def run(seed, global_seed):
        np.random.seed(global_seed)  # the search must not read numpy's global generator
        return search_weights(_bowl, 3, LorahubSettings(budget=15, l1=0.5, seed=seed))

    first = run(1, 0)
    for r in first.history:
        assert r["regularised_loss"] == pytest.approx(
            _bowl(r["weights"]) + 0.5 * sum(abs(w) for w in r["weights"]) / 3, abs=1e-12)
    assert run(1, 99).history == first.history
    assert first.weights == first.history[first.step - 1]["weights"]


def test_search_survives_non_finite_losses():
    """A composition whose loss overflows is the worst point to the optimizer, not a crash."""
    result = search_weights(lambda w: math.inf if w[0] > 0.2 else _bowl(w), 3,
                            LorahubSettings(budget=20, l1=0.0))
    assert result.evaluations == 20 and math.isfinite(result.objective)
    assert result.weights[0] <= 0.2


# The objective on the tiny model -------------------------------------------------------


def _rows(template: str, n: int) -> list[dict]:
    return [{"prompt": f"### Question:\n{template.format(i)}\n### Answer:\n",
             "completion": f"The answer is {i}."} for i in range(n)]


SKILLS = [_rows("Tom has {} apples.", 12), _rows("Write solution() returning {}.", 12)]


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    """Two rank-2 LoRAs on q and v (scaling 2 each) and a rank-3 one (scaling 1) on q only."""
    root = tmp_path_factory.mktemp("lorahub_adapters")
    return [write_random_lora(tiny_model_dir, root / "one", 2, 4.0, 1, TARGETS, b_scale=1.0),
            write_random_lora(tiny_model_dir, root / "two", 2, 4.0, 2, TARGETS, b_scale=1.0),
            write_random_lora(tiny_model_dir, root / "three", 3, 3.0, 3, ("q_proj",), 1.0)]


def _base(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_dir),
            AutoModelForCausalLM.from_pretrained(model_dir).eval())


def _dense_model(model_dir, adapter_dirs, weights, composition):
    """The base model with dW of each module added from the definition (no LoRA layer)."""
    tokenizer, model = _base(model_dir)
    adapters = [LoraAdapter.open(d) for d in adapter_dirs]
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name in sorted(set().union(*(a.module_names for a in adapters))):
            carried = [(a.module(name), w) for a, w in zip(adapters, weights, strict=True)
                       if name in a.module_names]
            if composition == "exact":
                delta = sum(w * m.delta() for m, w in carried)
            else:  # equal scalings s: s (sum w B)(sum w A)
                s = carried[0][0].scaling
                delta = s * sum(w * m.B for m, w in carried) @ sum(w * m.A for m, w in carried)
            layers[name].weight += delta
    return tokenizer, model


def test_the_loss_is_the_token_weighted_mean_of_completion_loss(tiny_model_dir):
    """LoraHub scores its examples in one batch: the mean over all completion tokens."""
    from soups.evaluation.evaluate import completion_loss
    from soups.training.text_batches import IGNORE_INDEX, encode_example

    tokenizer, model = _base(tiny_model_dir)
    rows = SKILLS[0][:3] + SKILLS[1][:2]
    per_row = completion_loss(model, tokenizer, rows, batch_size=2)
    counts = [sum(label != IGNORE_INDEX for label in encode_example(
        tokenizer, r["prompt"], r["completion"], 256)[1][1:]) for r in rows]
    expected = sum(x * n for x, n in zip(per_row, counts, strict=True)) / sum(counts)
    assert mean_completion_loss(model, tokenizer, rows, batch_size=3) == pytest.approx(
        expected, rel=1e-6)


def _peft_loss(model_dir, adapter_dir, rows):
    from peft import PeftModel

    tokenizer, base = _base(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return mean_completion_loss(model, tokenizer, rows)


@pytest.mark.parametrize("composition, chosen", [("lorahub", [0, 1]), ("exact", [0, 1, 2])])
def test_objective_is_the_loss_of_the_composed_model(tiny_model_dir, loras, tmp_path,
                                                     composition, chosen):
    """Each evaluation's loss is the loss of the dense model with the definition's dW added
    and of PEFT loading the adapter written for those weights; objective = loss + l1 mean|w|."""
    adapter_dirs = [loras[i] for i in chosen]
    settings = LorahubSettings(budget=4, examples=6, composition=composition, seed=5,
                               init=tuple(0.5 for _ in chosen))
    records = []
    result = lorahub_merge(adapter_dirs, tiny_model_dir, SKILLS, tmp_path / "out", settings,
                           on_evaluation=records.append, device="cpu", log=None)
    rows, _ = skill_mix(SKILLS, fraction=None, count=6, held_out=0, seed=5)
    for record in (records[0], records[-1]):
        w = record["weights"]
        assert record["regularised_loss"] == pytest.approx(
            record["loss"] + 0.05 * sum(abs(x) for x in w) / len(w), abs=1e-12)
        tokenizer, dense = _dense_model(tiny_model_dir, adapter_dirs, w, composition)
        assert record["loss"] == pytest.approx(mean_completion_loss(dense, tokenizer, rows),
                                               rel=1e-5)
        adapters = [LoraAdapter.open(d) for d in adapter_dirs]
        names = check_composable(adapters, composition)
        written = save_adapter(tmp_path / f"step{record['step']}",
                               compose_all(read_factors(adapters, names), w, composition),
                               adapters[0].config)
        assert record["loss"] == pytest.approx(_peft_loss(tiny_model_dir, written, rows),
                                               rel=1e-5)
    # The written adapter is the best evaluation's composition, and PEFT scores it so.
    assert result.adapter_dir == tmp_path / "out"
    assert result.loss == pytest.approx(_peft_loss(tiny_model_dir, result.adapter_dir, rows),
                                        rel=1e-5)
    summary = json.loads((result.adapter_dir / SUMMARY_JSON).read_text())
    assert summary["weights"] == result.weights and len(summary["history"]) == 4
    assert summary["settings"]["composition"] == composition
    assert read_provenance(result.adapter_dir)["merge"]["method"] == "lorahub"


def test_lorahub_merge_refuses_unequal_ranks_before_loading(tiny_model_dir, loras, tmp_path):
    rank4 = write_random_lora(tiny_model_dir, tmp_path / "rank4", 4, 4.0, 9, TARGETS)

    def merge(adapters):
        return lambda: lorahub_merge(adapters, tmp_path / "no_model", SKILLS, tmp_path / "o",
                                     LorahubSettings(budget=2, examples=2), log=None)

    raises_naming(LorahubError, merge([loras[0], rank4]), "model.layers.0.self_attn.q_proj",
                  "equal ranks", "r=2", "r=4")
    raises_naming(LorahubError, merge([loras[0], loras[2]]), loras[2], "lacks module",
                  "model.layers.0.self_attn.v_proj")
    assert not (tmp_path / "o").exists()


# The command line ----------------------------------------------------------------------


def _dataset(root, name, rows):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(root / name))
    return root / name


def test_merge_command_searches_and_writes_a_peft_adapter(tiny_model_dir, loras, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from study.cli import app

    data = [_dataset(tmp_path, "math", SKILLS[0]), _dataset(tmp_path, "code", SKILLS[1])]
    out = tmp_path / "merged"
    args = ["merge", "--method", "lorahub", "--out", str(out), loras[0], loras[2],
            "--model", tiny_model_dir, "--data", str(data[0]), "--data", str(data[1]),
            "--budget", "5", "--examples", "4", "--bounds", "-1", "1",
            "--composition", "exact", "--l1", "0.1", "--seed", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "evaluation 5/5" in result.output
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["settings"] == {**summary["settings"], "budget": 5, "examples": 4,
                                   "bounds": [-1.0, 1.0], "composition": "exact", "l1": 0.1,
                                   "seed": 3}
    assert len(summary["history"]) == summary["evaluations"] == 5
    assert all(-1 <= w <= 1 for r in summary["history"] for w in r["weights"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(out))
    lora_a = dict(model.named_modules())[
        "base_model.model.model.layers.0.self_attn.q_proj"].lora_A["default"]
    assert lora_a.weight.shape[0] == 5  # exact: rank 2 + 3
    assert LoraAdapter.open(out).rank_of("model.layers.0.self_attn.v_proj") == 2


def test_merge_command_rejects_bad_lorahub_input(tiny_model_dir, loras, tmp_path):
    from study.cli import app

    data = _dataset(tmp_path, "math", SKILLS[0])

    def merge(*flags, adapters=(loras[0], loras[1])):
        return ["merge", "--method", "lorahub", "--out", tmp_path / "out", *adapters,
                "--model", tiny_model_dir, "--data", data, "--data", data, *flags]

    cases = [
        (merge("--bounds", "1", "1"), ["low must be below high"]),
        (merge("--bounds", "0.5", "-0.5"), ["low=0.5", "high=-0.5"]),
        (merge("--budget", "0"), ["budget", "0"]),
        (merge("--examples", "0"), ["examples"]),
        (merge("--composition", "sum"), ["composition", "'sum'"]),
        (merge("--l1", "-1"), ["l1"]),
        (merge("--split", "test"), ["training rows", "test"]),
        (merge(adapters=(loras[0], loras[2])), ["lacks module", loras[2]]),
    ]
    for args, named in cases:
        assert_user_error(args, *named)
    assert not (tmp_path / "out").exists()
    for args, message in [
        (merge("--weights", "1", "1"), "takes no --weights"),
        (["merge", "--method", "ties", "--out", tmp_path / "o", loras[0], "--budget", "3"],
         "--budget is an option of method 'lorahub'"),
    ]:
        bad = CliRunner().invoke(app, [str(a) for a in args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
