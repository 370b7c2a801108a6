"""The registry of candidate kinds (trainables/candidates.py): one entry per kind, read by the
search-space check, the Tune search, stage 1, the trials, `soups methods` and the report."""

import pytest
from conftest import raises_naming
from typer.testing import CliRunner

from search_spaces import SearchSpaceError, parse_space
from soups.compose.merge.methods import REGISTRY as MERGES
from study.cli import app
from study.resolve import method_parameters, stage1_needs
from trainables.candidates import (
    CANDIDATES,
    CandidateError,
    CandidateKind,
    CandidateRegistry,
    describe,
)

pytestmark = pytest.mark.unit


def _space(methods: dict):
    return parse_space({"methods": methods}, "x.yaml",
                       lambda name: method_parameters(name, ("math", "code")))


def test_every_merge_method_is_a_kind_with_its_parameters():
    for name in MERGES.names():
        kind = CANDIDATES.get(name)
        assert kind.family == "merge" and kind.stage1
        assert set(kind.parameters) == set(MERGES.get(name).parameters)
    own = {"base", "skill", "data_mix", "cat_learned", "lorahub", "lora_moe"}
    assert own <= set(CANDIDATES.names())
    assert len(CANDIDATES.names()) == len(set(CANDIDATES.names()))


def test_a_name_registered_twice_raises_and_an_unknown_name_lists_the_known():
    registry = CandidateRegistry()
    kind = CandidateKind("x", "reference", "a kind", lambda *a: None, stage1=False)
    registry.register(kind)
    raises_naming(CandidateError, lambda: registry.register(kind), "'x'", "already registered")
    raises_naming(CandidateError, lambda: CANDIDATES.get("tie"), "'tie'", "ties", "cat_learned")


def test_kinds_say_what_stage_1_must_train():
    assert stage1_needs(_space({"base": {}})) == (False, False)
    assert stage1_needs(_space({"base": {}, "ties": {"density": 0.5}})) == (True, False)
    assert stage1_needs(_space({"data_mix": {}})) == (True, True)
    assert not CANDIDATES.get("base").stage1 and CANDIDATES.get("data_mix").needs == ("data_mix",)


def test_search_space_is_checked_against_each_kinds_schema():
    raises_naming(SearchSpaceError, lambda: _space({"skill": {}}),
                  "method 'skill' needs parameter 'skill'")
    raises_naming(SearchSpaceError, lambda: _space({"skill": {"skill": "poetry"}}),
                  "methods.skill.skill", "'poetry'", "not a skill of the study")
    raises_naming(SearchSpaceError,
                  lambda: _space({"cat_learned": {"learning_rate": {"grid": [1e-3, -1.0]}}}),
                  "methods.cat_learned.learning_rate", "-1.0", "outside (0")
    raises_naming(SearchSpaceError, lambda: _space({"cat_learned": {"init": "zeros"}}),
                  "methods.cat_learned.init", "'zeros'")
    raises_naming(SearchSpaceError, lambda: _space({"data_mix": {"rank": 4}}),
                  "method 'data_mix' takes no parameter 'rank'")
    raises_naming(SearchSpaceError, lambda: _space({"lorahub": {"bounds": [1.5, -1.5]}}),
                  "methods.lorahub.bounds", "low < high")
    raises_naming(SearchSpaceError, lambda: _space({"lorahub": {"budget": 0}}),
                  "methods.lorahub.budget", "outside [1, inf)")
    raises_naming(SearchSpaceError, lambda: _space({"lorahub": {"composition": "mean"}}),
                  "methods.lorahub.composition", "'mean'")
    raises_naming(SearchSpaceError, lambda: _space({"lora_moe": {"top_k": 3}}),
                  "methods.lora_moe.top_k", "3", "more experts than the study has skills (2)")
    raises_naming(SearchSpaceError, lambda: _space({"lora_moe": {"top_k": 1}}),
                  "methods.lora_moe.top_k", "outside [2, inf)")
    space = _space({"cat_learned": {"init": {"grid": ["randn", "norm"]}, "max_steps": 30},
                    "ties": {"density": 0.75}, "skill": {"skill": {"grid": ["math", "code"]}}})
    assert set(space.methods) == {"cat_learned", "ties", "skill"}


def test_described_parameters_carry_types_ranges_and_defaults():
    ties = "\n".join(describe(CANDIDATES.get("ties")))
    assert "ties  (merge)" in ties and "density: float in (0, 1] (required)" in ties
    cat = "\n".join(describe(CANDIDATES.get("cat_learned")))
    assert "trains on the skill mix" in cat
    assert "init: one of randn, uniform, ones, norm, values (default 'randn')" in cat
    assert "learning_rate: float in (0, inf) (default 0.005)" in cat
    assert "needs: no adapters" in "\n".join(describe(CANDIDATES.get("base")))
    assert "skill LoRAs + data_mix" in "\n".join(describe(CANDIDATES.get("data_mix")))


def test_soups_methods_prints_every_kind_or_those_asked():
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0, listed.output
    heads = [line.split()[0] for line in listed.output.splitlines() if not line.startswith(" ")]
    assert heads == CANDIDATES.names()
    one = runner.invoke(app, ["methods", "dare_ties"])
    assert one.exit_code == 0 and one.output.startswith("dare_ties  (merge)")
    assert "seed: int in [0, inf) (default 0)" in one.output
    bad = runner.invoke(app, ["methods", "tie"])
    assert bad.exit_code == 2 and "unknown method 'tie'" in bad.output
