"""The seed axis (`search.seeds`, study/seeds.py): the spec refuses bad seed lists naming the
value, each seed has its own stage-1 adapters (distinct cache keys), the search runs every
candidate once per seed (grid, random and Optuna), a trial takes its seed's adapters, and the
leaderboard over seeds has exact means, standard errors and counts. No study is run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import raises_naming

from search_spaces import parse_space
from study.seeds import (
    PER_SEED,
    add_test,
    candidate_rows,
    exported_trial,
    mean_stderr,
    shown,
    trial_rows,
)
from study.spec import SpecError, StudySpec, parse_model

pytestmark = pytest.mark.unit

PARAMS = {"base": set(), "ties": {"density"}, "skill": {"skill"}, "linear": {"weights"}}


def _spec(**search) -> StudySpec:
    return parse_model(StudySpec, {"search": search}, "s.yaml")


# --- the spec ------------------------------------------------------------------------------

@pytest.mark.parametrize(("seeds", "named"), [
    ([], ["search.seeds", "at least one seed"]),
    ([0, -3], ["search.seeds", "non-negative", "-3"]),
    ([0, 1, 1], ["search.seeds", "distinct", "got 1 more than once"]),
    ([0, "x"], ["search.seeds.1", "'x'"]),
    (2, ["search.seeds", "valid list", "got 2"]),
])
def test_bad_seed_lists_are_refused_naming_the_value(seeds, named):
    raises_naming(SpecError, lambda: _spec(seeds=seeds), "s.yaml", *named)


def test_without_seeds_stage_1_keeps_finetune_seed():
    spec = parse_model(StudySpec, {"finetune": {"seed": 7}}, "s.yaml")
    assert spec.search.seeds is None and spec.stage1_seeds == [7]
    assert _spec(seeds=[2, 0, 5]).stage1_seeds == [2, 0, 5]  # in the order given


# --- stage 1 -------------------------------------------------------------------------------

class _Task:
    def __init__(self, name: str):
        self._rows = [{"prompt": f"{name} {i}?", "completion": str(i)} for i in range(6)]

    def rows(self, role: str, limit: int | None = None) -> list[dict]:
        return self._rows[:limit] if role == "train" else self._rows[:2]


def _stage1_keys(spec: StudySpec, monkeypatch, tmp_path) -> tuple[dict, list[int]]:
    """Stage 1 with every fine-tune answered by its real cache key (nothing trains)."""
    import study.stage1
    import trainables.finetune
    from soups.training.adapter_cache import cache_key
    from trainables.finetune import CacheEntry, finetune_key_inputs

    seeds = []

    def fake_finetune(cache_root, model_dir, dataset, lora, train, eval_dataset, deepspeed,
                      scaling, **kwargs):
        seeds.append(train.seed)
        key = cache_key(finetune_key_inputs(model_dir, dataset, lora, train, deepspeed,
                                            scaling, eval_dataset))
        return CacheEntry(key, tmp_path / key, trained=False), None

    monkeypatch.setenv("SOUPS_HOME", str(tmp_path))
    monkeypatch.setattr(trainables.finetune, "cached_finetune", fake_finetune)
    monkeypatch.setattr(study.stage1, "_log_finetune", lambda *args, **kwargs: None)
    tasks = {"math": _Task("math"), "code": _Task("code")}
    adapters = study.stage1.stage1(spec, "org/no-such-model", tasks, [8], True, "", "0", "",
                                   log=lambda line: None)
    return adapters, seeds


def test_each_seed_fine_tunes_its_own_adapters_under_distinct_cache_keys(monkeypatch,
                                                                          tmp_path):
    adapters, trained_with = _stage1_keys(_spec(seeds=[0, 1]), monkeypatch, tmp_path)
    assert sorted(adapters) == ["0", "1"] and trained_with == [0, 0, 0, 1, 1, 1]
    for name in ("math", "code", "data_mix"):
        assert adapters["0"]["8"][name] != adapters["1"]["8"][name], name
    folders = [f for by_rank in adapters.values() for f in by_rank["8"].values()]
    assert len(set(folders)) == 6
    # Without a seed axis, stage 1 is today's: finetune.seed (0), the same keys as seed 0.
    plain, trained_with = _stage1_keys(StudySpec(), monkeypatch, tmp_path)
    assert plain == {"0": adapters["0"]} and trained_with == [0, 0, 0]


# --- the search ----------------------------------------------------------------------------

def _space():
    return parse_space({"methods": {"base": {}, "ties": {"density": {"uniform": [0.2, 0.9]}},
                                    "skill": {"skill": {"grid": ["math", "code"]}}},
                        "rank": {"grid": [8, 16]}}, "s.yaml", PARAMS.get)


def _candidate(variant: dict) -> tuple:
    return variant["method"], variant["rank"], tuple(sorted(variant["params"].items()))


def test_grid_runs_every_candidate_once_per_seed_with_the_same_drawn_values():
    from trainables.search import param_space, variants

    grid = param_space(_space(), [4], "grid", seeds=[3, 5])["variant"]["grid_search"]
    assert len(grid) == 2 * len(variants(_space(), [4])) == 14
    by_candidate: dict[tuple, list[int]] = {}
    for variant in grid:
        by_candidate.setdefault(_candidate(variant), []).append(variant["seed"])
    assert len(by_candidate) == 7 and all(s == [3, 5] for s in by_candidate.values())
    densities = {v["params"]["density"] for v in grid if v["method"] == "ties"}
    assert len(densities) == 2  # one draw per ties rank, shared by both seeds
    # Without seeds the grid is today's: no seed, the sampled value left to Tune.
    plain = param_space(_space(), [4], "grid")["variant"]["grid_search"]
    assert len(plain) == 7 and all("seed" not in v for v in plain)


def test_random_search_draws_its_candidates_once_then_runs_each_seed():
    from trainables.search import param_space

    first = param_space(_space(), [4], "random", seeds=[0, 1, 2], num_samples=4, seed=9)
    again = param_space(_space(), [4], "random", seeds=[0, 1, 2], num_samples=4, seed=9)
    drawn = first["variant"]["grid_search"]
    assert drawn == again["variant"]["grid_search"]  # the search seed decides the draws
    candidates = {_candidate(v) for v in drawn}
    assert 1 <= len(candidates) <= 4 and len(drawn) == 3 * len(candidates)
    assert [v["seed"] for v in drawn[:3]] == [0, 1, 2]


def test_optuna_suggestions_are_repeated_once_per_seed_and_learn_the_mean():
    from ray.tune.search import Searcher

    from trainables.search import SeedRepeater

    class Counting(Searcher):
        def __init__(self):
            super().__init__(metric="objective", mode="max")
            self.suggested, self.completed = 0, []

        def suggest(self, trial_id):
            self.suggested += 1
            return {"variant": {"method": "ties", "params": {"density": self.suggested / 10},
                                "rank": 8}}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.completed.append((trial_id, result))

    inner = Counting()
    repeater = SeedRepeater(inner, [4, 7])
    configs = [repeater.suggest(f"t{i}") for i in range(4)]
    assert [c["variant"]["seed"] for c in configs] == [4, 7, 4, 7]
    assert [c["variant"]["params"]["density"] for c in configs] == [0.1, 0.1, 0.2, 0.2]
    assert all("__trial_index__" not in c for c in configs) and inner.suggested == 2
    repeater.on_trial_complete("t0", {"objective": 0.2})
    repeater.on_trial_complete("t1", {"objective": 0.4})
    assert inner.completed == [("t0", {"objective": pytest.approx(0.3)})]


def test_a_trial_takes_its_seeds_adapters_and_its_run_key_names_the_seed():
    from trainables.candidates import candidate_kind
    from trainables.trial_context import TrialContext, trial_seed
    from trainables.trial_run import trial_run_key

    adapters = {str(s): {"8": {"math": f"/a/math-s{s}"}} for s in (0, 1)}
    ctx = TrialContext(study="s", experiment_id="0", tracking_uri="", parent_run_id="",
                       model_dir="", skills=("math", "code"), target="t", tasks={},
                       adapters=adapters, evaluation={}, cat={}, seed=5, stage1_seed=0)
    skill = {"method": "skill", "params": {"skill": "math"}, "rank": 8}
    build = candidate_kind("skill").build
    assert build(ctx, {**skill, "seed": 1}, None, None) == "/a/math-s1"
    assert build(ctx, skill, None, None) == "/a/math-s0"  # no axis: finetune.seed's
    assert trial_seed(ctx, {**skill, "seed": 1}) == 1 and trial_seed(ctx, skill) == 5
    raises_naming(ValueError, lambda: build(ctx, {**skill, "seed": 2}, None, None),
                  "seed 2", "seeds ['0', '1']")
    keys = {trial_run_key("s", {**skill, "seed": s}) for s in (0, 1)}
    assert len(keys) == 2 and trial_run_key("s", skill) not in keys


# --- the leaderboard over seeds ------------------------------------------------------------

def test_mean_and_standard_error_are_exact():
    mean, stderr, n = mean_stderr([0.1, 0.2, 0.6])
    assert (mean, n) == (pytest.approx(0.3), 3)
    # sample variance ((0.2² + 0.1² + 0.3²) / 2) = 0.07; standard error sqrt(0.07 / 3)
    assert stderr == pytest.approx(math.sqrt(0.07 / 3))
    assert mean_stderr([0.4, None, float("nan")]) == (0.4, None, 1)  # one value: no spread
    assert mean_stderr([]) == (None, None, 0)


def _trial(seed: int, objective: float | None, method: str = "ties", density: float = 0.5,
           status: str = "finished") -> dict:
    return {"trial": f"{method}-{density}-{seed}", "candidate": f"{method} r8", "method": method,
            "rank": 8, "params": {"density": density}, "seed": seed, "status": status,
            "objective": objective,
            "metrics": {"validation/math/accuracy": objective, "build_seconds": 2.0 * seed}
            if objective is not None else {},
            "run_id": f"run-{seed}", "checkpoint": f"/ckpt/{method}-{density}-{seed}"}


TRIALS = [_trial(0, 0.10), _trial(1, 0.30), _trial(2, 0.20),  # ties 0.5: mean 0.20
          _trial(0, 0.40, density=0.9), _trial(1, None, density=0.9, status="failed"),
          _trial(2, 0.30, density=0.9),  # ties 0.9: mean 0.35 over two seeds
          _trial(0, None, "linear", status="failed")]


def test_one_row_per_candidate_with_mean_standard_error_and_count():
    rows = candidate_rows(list(reversed(TRIALS)))  # any order in
    assert [(r["params"], r["status"]) for r in rows] == [
        ({"density": 0.9}, "finished 2 of 3 seeds"), ({"density": 0.5}, "finished"),
        ({"density": 0.5}, "failed")]
    top, second, failed = rows
    assert top["objective"] == pytest.approx(0.35) and top["objective_n"] == 2
    assert top["objective_stderr"] == pytest.approx(0.05)  # std 0.0707 / sqrt(2)
    assert second["objective"] == pytest.approx(0.20) and second["objective_n"] == 3
    assert second["objective_stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert second["metrics"]["build_seconds"] == pytest.approx(2.0)  # each metric's mean
    assert failed["objective"] is None and failed["objective_n"] == 0
    assert second["seeds"] == [0, 1, 2] and [t["seed"] for t in second[PER_SEED]] == [0, 1, 2]
    assert "seed" not in top and top["candidate"] == "ties r8"
    # The export is the best candidate's seed with the best validation objective.
    assert exported_trial(top)["trial"] == "ties-0.9-0"
    assert exported_trial(TRIALS[1]) is TRIALS[1]  # a trial row stands for itself
    assert len(trial_rows(rows)) == len(TRIALS) and trial_rows(TRIALS) == TRIALS
    # A candidate run twice with one seed (a repeated Optuna suggestion) counts that seed once.
    again = candidate_rows([*TRIALS, _trial(1, None, status="failed"), _trial(2, 0.20)])
    assert again[1]["objective_n"] == 3 and again[1]["objective"] == pytest.approx(0.20)


def test_test_scores_of_the_selected_candidate_over_its_seeds():
    (top, *_) = candidate_rows([dict(t) for t in TRIALS])
    top[PER_SEED][0]["test"], top[PER_SEED][2]["test"] = 0.25, 0.35
    add_test(top)
    assert top["test"] == pytest.approx(0.30) and top["test_n"] == 2
    assert top["test_stderr"] == pytest.approx(0.05)
    assert shown(top, "test") == "0.300 ± 0.050 (n=2)"
    assert shown(top, "objective") == "0.350 ± 0.050 (n=2)"
    assert shown(TRIALS[0], "objective") == "0.100"  # a trial row prints as before
    assert shown(TRIALS[0], "test") == "-"


def test_printed_leaderboard_over_seeds():
    from study.selection import print_leaderboard

    lines: list[str] = []
    print_leaderboard(candidate_rows([dict(t) for t in TRIALS]), "math", lines.append)
    assert "0.350 ± 0.050 (n=2)" in lines[1] and "ties r8" in lines[1]
    assert "linear r8" in lines[3] and " failed " in lines[3]
    lines.clear()
    print_leaderboard([TRIALS[0]], "math", lines.append)  # trials one by one: their seed
    assert "ties r8 seed 0" in lines[1] and "0.100" in lines[1]
    assert lines[1].split()[6] == "-"  # no parse rate logged: none shown
    lines.clear()
    parsing = {**TRIALS[0], "metrics": {**TRIALS[0]["metrics"], "validation/math/parsed": 0.25}}
    print_leaderboard([parsing], "math", lines.append)
    assert "parsed" in lines[0].split() and lines[1].split()[6] == "0.25"


def test_leaderboard_trial_rows_carry_their_seed_only_on_a_seed_axis():
    from study.selection import leaderboard

    class Result:
        def __init__(self, variant):
            self.config, self.error, self.checkpoint = {"variant": variant}, None, None
            self.metrics, self.path = {"objective": 0.5, "trial_id": "t"}, str(Path("/t"))

    variant = {"method": "base", "params": {}, "rank": None}
    (plain,) = leaderboard([Result(variant)])
    (seeded,) = leaderboard([Result({**variant, "seed": 3})])
    assert "seed" not in plain and seeded["seed"] == 3
    assert {k: v for k, v in seeded.items() if k != "seed"} == plain


def test_test_all_scores_every_finished_candidate_and_each_of_its_seeds(monkeypatch, tmp_path):
    """`evaluation.test_all`: after selection, the test split of every other finished
    candidate (each finished seed; a failed one is skipped), the best's untouched."""
    from study import selection

    for trial in TRIALS:
        (tmp_path / trial["trial"]).mkdir(exist_ok=True)
    rows = candidate_rows([{**t, "run_id": None, "checkpoint": str(tmp_path / t["trial"])}
                           for t in TRIALS])
    evaluated = []

    def fake_evaluate(context, adapter, split, tasks, limit, out):
        evaluated.append(Path(adapter).parent.name if adapter else None)
        return {"test/math/accuracy": 0.1 * len(evaluated)}

    monkeypatch.setattr(selection, "evaluate_candidate", fake_evaluate)
    monkeypatch.setattr(selection, "checkpoint_adapter", lambda t: t["checkpoint"] + "/adapter")
    spec = parse_model(StudySpec, {"evaluation": {"test_all": True}}, "s.yaml")

    class Context:
        target = "math"

    lines: list[str] = []
    best = rows[0]
    selection.evaluate_test_split_of_all(spec, Context(), rows, best, lines.append)
    assert evaluated == ["ties-0.5-0", "ties-0.5-1", "ties-0.5-2"]  # not the best, nor failed
    assert "test" not in best
    assert rows[1]["test"] == pytest.approx(0.2) and rows[1]["test_n"] == 3
    assert "test" not in rows[2]  # the failed candidate has no test score
    assert lines == [f"test split of math: {shown(rows[1], 'test')} for ties r8 (1/1)"]
