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
    import pickle

    import optuna

    from trainables.search import optuna_define_by_run

    space = parse_space({"methods": {"ties": {"density": {"uniform": [0.2, 0.9]}},
                                     "base": {}}}, "s.yaml", _lookup)
    define = optuna_define_by_run(space, ranks=[8, 16])
    define = pickle.loads(pickle.dumps(define))  # Tune pickles it with the searcher's state
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


@pytest.mark.parametrize(("data", "named"), [
    ({"finetune": {"micro_batch_size": 0}}, "finetune.micro_batch_size: Input should be greater "
                                            "than or equal to 1 (got 0)"),
    ({"cat": {"fraction": 7}}, "cat.fraction: Input should be less than or equal to 1 (got 7)"),
    ({"finetune": {"learning_rate": -0.001}}, "finetune.learning_rate: Input should be greater "
                                              "than 0 (got -0.001)"),
    ({"finetune": {"dropout": 1.0}}, "finetune.dropout: Input should be less than 1 (got 1.0)"),
    ({"finetune": {"max_steps": 0}}, "finetune.max_steps: Input should be greater than or equal "
                                     "to 1 (got 0)"),
    ({"finetune": {"cpus_per_worker": 0}}, "finetune.cpus_per_worker"),
    ({"cat": {"held_out": 0}}, "cat.held_out"),
    ({"search": {"num_samples": 0}}, "search.num_samples"),
    ({"search": {"cpus_per_trial": 0}}, "search.cpus_per_trial"),
    ({"search": {"gpus_per_trial": -0.5}}, "search.gpus_per_trial"),
    ({"evaluation": {"validation_limit": 0}}, "evaluation.validation_limit"),
    ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens"),
    ({"generated": {"max_value": 4}}, "generated.max_value"),
    ({"generated": {"two_step_share": 1.5}}, "generated.two_step_share"),
    ({"generated": {"sizes": {"math": {"train": -1}}}}, "generated.sizes.math.train"),
    ({"cluster": {"worker_resources": {"gpu_node": 0}}}, "cluster.worker_resources.gpu_node"),
])
def test_out_of_range_value_is_named_with_file(tmp_path, data, named):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ") and named in str(err.value)


def test_range_ends_and_none_are_accepted():
    spec = parse_model(StudySpec, {
        "finetune": {"dropout": 0.0, "max_steps": None, "max_grad_norm": 0, "eval_every": 0,
                     "max_length": 8, "cpus_per_worker": None},
        "cat": {"fraction": 1.0, "warmup_steps": 0},
        "search": {"max_failures": 0, "gpus_per_trial": 0.5},
        "evaluation": {"validation_limit": None},
        "generated": {"max_value": 5, "two_step_share": 1.0, "sizes": {"math": {"train": 0}}},
    }, "s.yaml")
    assert spec.cat.fraction == 1.0 and spec.finetune.max_steps is None


def _real_space(methods: dict, **top):
    from study.resolve import method_parameters

    return parse_space({"methods": methods, **top}, "x.yaml", method_parameters)


def test_space_value_outside_the_method_range_names_file_method_parameter_and_value(tmp_path):
    from study.resolve import method_parameters

    path = tmp_path / "x.yaml"
    path.write_text("methods:\n  ties: {density: 3}\n")
    with pytest.raises(SearchSpaceError) as err:
        load_space(path, method_parameters)
    assert str(err.value) == f"{path}: methods.ties.density: 3 is outside (0, 1]"


@pytest.mark.parametrize(("methods", "message"), [
    ({"ties": {"density": {"grid": [0.5, 3]}}},
     "x.yaml: methods.ties.density: grid value 3 is outside (0, 1]"),
    ({"dare_ties": {"density": {"uniform": [0.0, 0.9]}}},
     "x.yaml: methods.dare_ties.density: uniform value 0.0 is outside (0, 1]"),
    ({"ties": {"density": "high"}},
     "x.yaml: methods.ties.density: 'high' is not valid: Input should be a valid number"),
    ({"svd": {"rank": {"randint": [1.5, 4.0]}}},
     "x.yaml: methods.svd.rank: randint takes integers [low, high), got [1.5, 4.0]"),
    ({"svd": {"rank": {"uniform": [2, 16]}}},  # Tune samples floats: no rank
     "x.yaml: methods.svd.rank: uniform value 2.0 is not valid: Input should be a valid integer"),
    ({"svd": {"rank": 0}}, "x.yaml: methods.svd.rank: 0 is outside [1, inf)"),
    ({"ties": {"density": 0.5, "majority_sign_method": {"choice": ["total", "sum"]}}},
     "x.yaml: methods.ties.majority_sign_method: choice value 'sum' is not valid: Input should "
     "be 'total' or 'frequency'"),
    ({"linear": {"weights": [1.0, "a"]}},
     "x.yaml: methods.linear.weights: [1.0, 'a'] is not valid: Input should be a valid number"),
    ({"cat_learned": {"fraction": 7}}, "x.yaml: methods.cat_learned.fraction: 7 is outside (0, 1]"),
    ({"cat_learned": {"max_steps": {"randint": [0, 10]}}},
     "x.yaml: methods.cat_learned.max_steps: randint value 0 is outside [1, inf)"),
    ({"cat_learned": {"learning_rate": {"loguniform": [0.001, 0.05]}, "held_out": 2.5}},
     "x.yaml: methods.cat_learned.held_out: 2.5 is not valid: Input should be a valid integer"),
    ({"cat_learned": {"granularity": "row"}},
     "x.yaml: methods.cat_learned.granularity: 'row' is not valid: Input should be 'module', "
     "'layer' or 'global'"),
    ({"skill": {"skill": {"grid": ["math", 3]}}},
     "x.yaml: methods.skill.skill: grid value 3 is not a skill name"),
])
def test_space_values_are_checked_against_declared_types_and_ranges(methods, message):
    with pytest.raises(SearchSpaceError) as err:
        _real_space(methods)
    assert str(err.value) == message


def test_space_rank_must_be_positive_integers():
    with pytest.raises(SearchSpaceError, match=r"x.yaml: rank: grid value 0 is not a LoRA rank"):
        _real_space({"base": {}}, rank={"grid": [8, 0]})


def test_space_values_inside_the_ranges_pass():
    space = _real_space({
        "ties": {"density": {"uniform": [0.3, 1.0]}, "majority_sign_method": "frequency"},
        "dare_linear": {"density": 1, "seed": {"randint": [0, 5]}},
        "svd": {"rank": {"randint": [1, 17]}},
        "linear": {"weights": {"choice": [[1, 1], [0.7, 0.3]]}},
        "cat_learned": {"init": "values", "init_values": [0.5, 0.5], "fraction": 1.0,
                        "max_steps": {"randint": [1, 100]}},
        "skill": {"skill": "math"},
    })
    assert space.methods["dare_linear"]["density"] == 1


def test_skill_must_be_one_of_the_study_skills(tmp_path):
    from study.resolve import load_search_space

    path = tmp_path / "x.yaml"
    path.write_text("methods:\n  skill: {skill: {choice: [math, maths]}}\n")
    spec = parse_model(StudySpec, {"search": {"space": str(path)}}, "s.yaml")
    with pytest.raises(SearchSpaceError, match=r"x.yaml: methods.skill.skill: choice value "
                                               r"'maths' is not a skill of the study; its "
                                               r"skills: \['code', 'math'\]"):
        load_search_space(spec)


def test_cluster_study_and_its_space_are_valid():
    from study.resolve import load_search_space

    spec = load_spec(ROOT / "docs" / "cluster_study.yaml")
    assert len(load_search_space(spec).methods) == 13


def test_set_changes_one_key_of_a_default_task_entry():
    """`--set target.math_code.chat_template=...` changes that key of the default target,
    keeping its scorer (it used to replace the entry, silently scoring by final number),
    and `--set skills.code....` no longer drops the other skill."""
    from study.spec import assignments, load_spec

    spec = load_spec(None, assignments(["target.math_code.chat_template=tokenizer",
                                        "skills.code.chat_template=none"]))
    default = load_spec(None)
    assert spec.target["math_code"].chat_template == "tokenizer"
    assert spec.target["math_code"].scorer == default.target["math_code"].scorer
    assert spec.target["math_code"].scorer.kind == "program"
    assert list(spec.skills) == list(default.skills) == ["math", "code"]
    assert spec.skills["code"].chat_template == "none"
    assert spec.skills["math"] == default.skills["math"]
