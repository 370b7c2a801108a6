"""Study spec and search spaces: shipped files parse against the real method signatures,
unknown or misspelt keys are errors naming file, key and value, the test split is refused as
objective, and search spaces expand into the trials they describe."""

from pathlib import Path

import pytest

from search_spaces import Domain, SearchSpaceError, load_space, parse_space, space_path
from study.spec import SpecError, StudySpec, load_spec, parse_model

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"base": set(), "skill": {"skill"}, "data_mix": set(), "ties": {"density", "weights"},
          "cat_learned": {"init", "learning_rate"}}


def test_default_study_is_valid():
    spec = load_spec()
    assert spec.target_name == "math_code" and list(spec.skills) == ["math", "code"]
    assert spec.objective.split == "validation"


def test_unknown_key_is_named_with_file(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("name: x\nfinetune:\n  rnaks: [8]\n")
    with pytest.raises(SpecError, match=r"study.yaml.*unknown key 'finetune.rnaks'"):
        load_spec(bad)


def test_bad_value_is_named(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("finetune:\n  zero_stage: 5\n")
    with pytest.raises(SpecError, match=r"finetune.zero_stage.*got 5"):
        load_spec(bad)


def test_unknown_sandbox_is_named():
    with pytest.raises(SpecError, match=r"evaluation.sandbox.*got 'docker'"):
        parse_model(StudySpec, {"evaluation": {"sandbox": "docker"}}, "s.yaml")
    assert StudySpec().evaluation.sandbox == "bwrap"


def test_test_split_refused_as_objective():
    with pytest.raises(SpecError, match="objective.split.*validation split.*got 'test'"):
        parse_model(StudySpec, {"objective": {"split": "test"}}, "s.yaml")


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")


def test_relative_sqlite_uri_refused():
    with pytest.raises(SpecError, match="relative"):
        parse_model(StudySpec, {"tracking": {"uri": "sqlite:///mlflow.db"}}, "s.yaml")


def test_target_must_be_objective_and_not_a_skill():
    with pytest.raises(SpecError, match="both a skill and the target"):
        parse_model(StudySpec, {"skills": {"math": {}, "math_code": {}}}, "s.yaml")


def _lookup(name):
    return PARAMS.get(name)


def test_space_rejects_parameter_the_method_does_not_take(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("methods:\n  ties: {desnity: 0.5}\n")
    with pytest.raises(SearchSpaceError, match=r"space.yaml: method 'ties' takes no parameter "
                                               r"'desnity'"):
        load_space(path, _lookup)


def test_space_rejects_unknown_method_key_and_domain(tmp_path):
    with pytest.raises(SearchSpaceError, match="unknown method 'tie'"):
        parse_space({"methods": {"tie": {}}}, "s.yaml", _lookup)
    with pytest.raises(SearchSpaceError, match="unknown key 'rnak'"):
        parse_space({"methods": {"base": {}}, "rnak": 8}, "s.yaml", _lookup)
    with pytest.raises(SearchSpaceError, match="methods.ties.density.*one key"):
        parse_space({"methods": {"ties": {"density": {"unifrom": [0, 1]}}}}, "s.yaml", _lookup)
    with pytest.raises(SearchSpaceError, match="low < high"):
        parse_space({"methods": {"ties": {"density": {"uniform": [1, 0]}}}}, "s.yaml", _lookup)


def test_space_parses_domains():
    space = parse_space({"methods": {"ties": {"density": {"uniform": [0.2, 0.9]}},
                                     "skill": {"skill": {"grid": ["math", "code"]}}},
                         "rank": {"grid": [8, 16]}}, "s.yaml", _lookup)
    assert space.methods["ties"]["density"] == Domain("uniform", (0.2, 0.9))
    assert space.rank == Domain("grid", (8, 16))


@pytest.mark.parametrize("name", ["paper", "cat", "wide"])
def test_shipped_spaces_check_against_real_signatures(name):
    from study.resolve import method_parameters

    space = load_space(name, method_parameters)
    assert space.methods
    first_line = space_path(name).read_text().splitlines()[0]
    assert first_line.startswith("# Run: soups run")


def test_grid_variants_expand_methods_grids_and_ranks():
    from trainables.search import variants

    space = parse_space({"methods": {"base": {}, "ties": {"density": 0.75},
                                     "skill": {"skill": {"grid": ["math", "code"]}}},
                         "rank": {"grid": [8, 16]}}, "s.yaml", _lookup)
    got = variants(space, ranks=[4])
    assert {"method": "base", "params": {}, "rank": None} in got
    assert sum(v["method"] == "ties" for v in got) == 2  # one per rank
    assert sum(v["method"] == "skill" for v in got) == 4  # skills x ranks
    assert len(got) == 7


def test_optuna_space_is_conditional_on_method():
    import optuna

    from trainables.search import optuna_define_by_run

    space = parse_space({"methods": {"ties": {"density": {"uniform": [0.2, 0.9]}},
                                     "base": {}}}, "s.yaml", _lookup)
    define = optuna_define_by_run(space, ranks=[8, 16])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        config = define(trial)["variant"]
        seen.add(config["method"])
        if config["method"] == "base":
            assert config["params"] == {} and config["rank"] is None
            assert set(trial.params) == {"method"}
        else:
            assert 0.2 <= config["params"]["density"] <= 0.9 and config["rank"] in (8, 16)
        study.tell(trial, 0.0)
    assert seen == {"ties", "base"}
