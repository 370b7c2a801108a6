"""A checked `SearchSpace` (search_spaces/) as Ray Tune objects.

Each trial's config holds one `variant`: `{"method": name, "params": {...}, "rank": r}`.
Parameters are conditional on the method: a trial only ever sees its own method's params.
- grid: every method x its grid parameters x (for methods built from skill LoRAs) every
  rank, as one `grid_search` over variants; other domains are sampled inside a variant;
- random: a `choice` over the same variants (domains inside are sampled);
- optuna: a define-by-run space, so TPE models each method's parameters separately.

With a seed axis (`search.seeds`) each candidate runs once per seed, the seed in its variant
(`"seed": s`): grid and random search draw their candidates here, once, and grid over them
and the seeds (Tune would draw sampled values again for each seed); Optuna's suggestions are
repeated once per seed by `SeedRepeater`, and TPE learns from their mean objective.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
from ray import tune
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX
from ray.tune.search.sample import Domain as TuneDomain

from search_spaces import Domain, SearchSpace
from trainables.candidates import candidate_kind


def _ranked(method: str) -> bool:
    """Whether a method's variants carry a rank (it is built from stage-1 adapters)."""
    return candidate_kind(method).stage1


def _tune_domain(value):
    if not isinstance(value, Domain):
        return value
    kind, args = value.kind, value.values
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(*args)


def _grid_expansions(params: dict) -> list[dict]:
    """Cartesian product of the grid parameters; other values kept as they are."""
    grids = {k: v.values for k, v in params.items() if isinstance(v, Domain) and v.kind == "grid"}
    rest = {k: v for k, v in params.items() if k not in grids}
    out = []
    for combo in itertools.product(*grids.values()):
        out.append({**rest, **dict(zip(grids, combo, strict=True))})
    return out


def variants(space: SearchSpace, ranks: list[int]) -> list[dict]:
    """Every (method, grid point, rank) the space names; sampled domains stay Tune domains.
    `ranks`: the study's, used when the space names none."""
    rank_values = space.ranks(ranks)
    out = []
    for method, params in space.methods.items():
        for fixed in _grid_expansions(params):
            resolved = {k: _tune_domain(v) for k, v in fixed.items()}
            if not _ranked(method):
                out.append({"method": method, "params": resolved, "rank": None})
            else:
                out.extend({"method": method, "params": dict(resolved), "rank": r}
                           for r in rank_values)
    return out


def seeded_variants(space: SearchSpace, ranks: list[int], algorithm: str, seeds: list[int],
                    num_samples: int = 1, seed: int = 0) -> list[dict]:
    """Every candidate once per seed: grid search's variants, or `num_samples` variants drawn
    for random search (a candidate drawn twice runs once), their sampled values drawn once
    per candidate, each candidate with every seed in turn. `seed`: the search's own."""
    rng = np.random.default_rng(seed)
    options = variants(space, ranks)
    if algorithm == "random":
        options = [options[i] for i in rng.integers(len(options), size=num_samples)]
    elif algorithm != "grid":
        raise ValueError(f"seeded variants are for grid or random search, got {algorithm!r}")
    candidates: dict[str, dict] = {}
    for variant in options:
        params = {k: v.sample(random_state=rng) if isinstance(v, TuneDomain)
                  else v for k, v in variant["params"].items()}
        drawn = {**variant, "params": params}
        candidates.setdefault(json.dumps(drawn, sort_keys=True, default=str), drawn)
    return [{**c, "seed": s} for c in candidates.values() for s in seeds]


def param_space(space: SearchSpace, ranks: list[int], algorithm: str,
                seeds: list[int] | None = None, num_samples: int = 1, seed: int = 0) -> dict:
    """The `variant` entry of a Tune param_space for grid or random search; with `seeds`
    (the seed axis) a grid over `seeded_variants`, for either."""
    if seeds is not None:
        return {"variant": tune.grid_search(
            seeded_variants(space, ranks, algorithm, seeds, num_samples, seed))}
    options = variants(space, ranks)
    if algorithm == "grid":
        return {"variant": tune.grid_search(options)}
    if algorithm == "random":
        return {"variant": tune.choice(options)}
    raise ValueError(f"param_space is for grid or random search, got {algorithm!r}")


def optuna_define_by_run(space: SearchSpace, ranks: list[int]) -> OptunaDefineByRun:
    """A define-by-run function for `OptunaSearch`: the method first, then its parameters
    (named `<method>.<param>`), then the rank when the method uses skill LoRAs."""
    return OptunaDefineByRun(space, Domain("choice", tuple(space.ranks(ranks))))


class OptunaDefineByRun:
    """`optuna_define_by_run`'s function. An object, not a closure: Tune pickles the searcher,
    this function with it, whenever it saves the experiment's state."""

    def __init__(self, space: SearchSpace, rank_domain: Domain):
        self.space, self.rank_domain = space, rank_domain

    @staticmethod
    def _suggest(trial, name: str, value):
        if not isinstance(value, Domain):
            return value
        if value.kind in ("choice", "grid"):
            # Optuna categoricals must be primitives: suggest an index into the choices.
            index = trial.suggest_categorical(name, list(range(len(value.values))))
            return value.values[index]
        if value.kind == "uniform":
            return trial.suggest_float(name, *value.values)
        if value.kind == "loguniform":
            return trial.suggest_float(name, *value.values, log=True)
        return trial.suggest_int(name, value.values[0], value.values[1] - 1)

    def __call__(self, trial) -> dict:
        method = trial.suggest_categorical("method", list(self.space.methods))
        params = {name: self._suggest(trial, f"{method}.{name}", value)
                  for name, value in self.space.methods[method].items()}
        rank = None
        if _ranked(method):
            rank = self._suggest(trial, "rank", self.rank_domain)
        return {"variant": {"method": method, "params": params, "rank": rank}}


class FinalResultOptuna(OptunaSearch):
    """OptunaSearch that skips intermediate results without the objective (CAT trials report
    held-out loss per evaluation step for ASHA; only their final result has `objective`)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class SeedRepeater(Repeater):
    """Each suggestion of `searcher` run once per seed (the seed axis), the seed in the
    trial's variant; the searcher sees the mean objective over the seeds (Tune's Repeater,
    whose state Tune saves with the experiment, so a resumed search keeps its groups)."""

    def __init__(self, searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=True)
        self.seeds = list(seeds)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        config = dict(config)
        seed = self.seeds[config.pop(TRIAL_INDEX)]
        return {**config, "variant": {**config["variant"], "seed": seed}}
