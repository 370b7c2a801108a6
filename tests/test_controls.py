"""The controls of a merging claim (soups.compose.controls; kinds random_lora and mix_lora): a
random stand-in keeps each module's rank, scaling and update norm (against the dense update) and
loads through PEFT; `all` concatenates one per skill; mix_lora trains on exactly the rows
CAT learns its weights on."""

from __future__ import annotations

import pytest
import torch
from conftest import raises_naming, write_random_lora

from soups.adapters import LoraAdapter
from soups.compose.controls import random_stand_in, update_norm
from trainables.candidates import CANDIDATES, candidate_kind
from trainables.trial_context import TrialContext

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {name: write_random_lora(tiny_model_dir, folder / name, rank=4, alpha=8, seed=seed)
            for seed, name in enumerate(("math", "code"))}


def test_update_norm_is_the_dense_updates_frobenius_norm(loras):
    for _, module in LoraAdapter.open(loras["math"]).modules():
        assert update_norm(module) == pytest.approx(float(module.delta().norm()), rel=1e-5)


def test_a_random_stand_in_keeps_every_modules_rank_scaling_and_norm(loras, tmp_path,
                                                                     tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = LoraAdapter.open(loras["math"])
    stand_in = LoraAdapter.open(random_stand_in(loras["math"], tmp_path / "r", seed=3))
    assert stand_in.module_names == source.module_names
    for name, module in source.modules():
        drawn = stand_in.module(name)
        assert drawn.A.shape == module.A.shape and drawn.B.shape == module.B.shape
        assert drawn.scaling == pytest.approx(module.scaling)
        assert float(drawn.delta().norm()) == pytest.approx(float(module.delta().norm()),
                                                            rel=1e-4)
        cosine = torch.nn.functional.cosine_similarity(drawn.delta().flatten(),
                                                       module.delta().flatten(), dim=0)
        assert abs(float(cosine)) < 0.5  # not the skill's update
    again = LoraAdapter.open(random_stand_in(loras["math"], tmp_path / "again", seed=3))
    other = LoraAdapter.open(random_stand_in(loras["math"], tmp_path / "other", seed=4))
    name = source.module_names[0]
    assert torch.equal(again.module(name).A, stand_in.module(name).A)  # seeded
    assert not torch.equal(other.module(name).A, stand_in.module(name).A)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      tmp_path / "r")
    weight = dict(model.named_parameters())[
        f"base_model.model.{name}.lora_A.default.weight"]
    assert torch.equal(weight, stand_in.module(name).A)


def _ctx(loras, tiny_model_dir, tasks=None) -> TrialContext:
    from study.spec import Finetune

    recipe = Finetune(max_steps=2, micro_batch_size=2, grad_accumulation=1, max_length=48,
                      eval_every=0, held_out=0, alpha_ratio=2.0)
    return TrialContext(study="s", experiment_id="0", tracking_uri="", parent_run_id="",
                        model_dir=tiny_model_dir, skills=("math", "code"), target="t",
                        tasks=tasks or {}, adapters={"0": {"4": dict(loras)}}, evaluation={},
                        cat={"fraction": 0.5, "count": None, "held_out": 2}, seed=7,
                        finetune_lora=recipe.lora_settings(1),
                        finetune_train=recipe.train_settings())


def test_random_lora_of_all_skills_concatenates_one_stand_in_per_skill(loras, tmp_path,
                                                                       tiny_model_dir):
    build = candidate_kind("random_lora").build
    ctx = _ctx(loras, tiny_model_dir)
    variant = {"method": "random_lora", "params": {"skill": "all"}, "rank": 4}
    merged = LoraAdapter.open(build(ctx, variant, tmp_path / "all", lambda m: None))
    sources = [LoraAdapter.open(loras[s]) for s in ("math", "code")]
    for name in sources[0].module_names:
        module = merged.module(name)
        assert module.rank == 8  # 4 + 4: the exact concatenation
        parts = [LoraAdapter.open(random_stand_in(loras[s], tmp_path / f"{s}{i}", 7 + i))
                 for i, s in enumerate(("math", "code"))]
        want = sum(p.module(name).delta() for p in parts)
        assert torch.allclose(module.delta(), want, atol=1e-5)
    single = build(ctx, {**variant, "params": {"skill": "code"}}, tmp_path / "one", None)
    assert LoraAdapter.open(single).module(sources[1].module_names[0]).rank == 4
    raises_naming(ValueError, lambda: build(ctx, {**variant, "params": {"skill": "poetry"}},
                                            tmp_path / "x", None), "'poetry'", "all")


def test_mix_lora_trains_on_exactly_the_rows_cat_learns_on(loras, tmp_path, tiny_model_dir,
                                                           monkeypatch):
    from conftest import TINY_CORPUS

    import soups.compose.cat.mix

    calls = []
    real = soups.compose.cat.mix.skill_mix

    def recording(skills, *args, **kwargs):
        out = real(skills, *args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(soups.compose.cat.mix, "skill_mix", recording)
    import soups.compose.cat.run

    monkeypatch.setattr(soups.compose.cat.run, "skill_mix", recording, raising=False)

    class Rows:
        def __init__(self, rows):
            self._rows = rows

        def rows(self, split, limit=None):
            return self._rows

    def rows(text: str) -> list[dict]:  # 12 different rows of one skill
        prompt, completion = text.split("### Answer:\n")
        return [{"prompt": f"{prompt}({i})\n### Answer:\n", "completion": completion}
                for i in range(12)]

    tasks = {"math": Rows(rows(TINY_CORPUS[0])), "code": Rows(rows(TINY_CORPUS[1]))}
    ctx = _ctx(loras, tiny_model_dir, tasks)
    variant = {"method": "mix_lora", "params": {}, "rank": 4}
    reports = []
    out = candidate_kind("mix_lora").build(ctx, variant, tmp_path / "mix", reports.append)
    lora = LoraAdapter.open(out)
    assert lora.rank_of(lora.module_names[0]) == 4
    cat = {"method": "cat_learned", "params": {"max_steps": 1}, "rank": 4}
    candidate_kind("cat_learned").build(ctx, cat, tmp_path / "cat", lambda m: None)
    mix_rows, cat_rows = calls[0], calls[-1]
    assert mix_rows == cat_rows and len(mix_rows[0]) == 12  # half of each skill's 12 rows
    assert len({r["prompt"] for r in mix_rows[0]}) == 12 and len(mix_rows[1]) == 2
    assert CANDIDATES.get("mix_lora").family == "control"
