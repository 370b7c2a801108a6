"""The seed axis of a study (`search.seeds`), after the search: with several seeds, the
leaderboard has one row per candidate (method, rank and parameters; the seed left out) with
the mean, standard error and count over its seeds of the validation objective and of the
test score, so that a claim about a method has a spread. The best candidate is the one with
the best mean validation objective; its seed with the best validation objective is the
trial that is exported.

A candidate row holds `objective` (the mean, where a trial row holds its own value),
`objective_stderr` and `objective_n`, `test` / `test_stderr` / `test_n` for the selected
candidate, `seeds`, the mean of each validation metric (`metrics`) and its trial rows in
seed order (`per_seed`).

Pure (standard library only): the study, `soups status` and the analysis aggregate alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from soups.names import OBJECTIVE

PER_SEED = "per_seed"  # a candidate row's trial rows, one per seed, in seed order


def stderr_key(key: str) -> str:
    return f"{key}_stderr"


def count_key(key: str) -> str:
    return f"{key}_n"


def mean_stderr(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, standard error (sample standard deviation / sqrt(n)) and n of the values that
    are not None (nor NaN): (None, None, 0) without any; the standard error is None with one
    value, whose spread is unknown."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(present)
    if n == 0:
        return None, None, 0
    mean = sum(present) / n
    if n == 1:
        return mean, None, 1
    variance = sum((v - mean) ** 2 for v in present) / (n - 1)
    return mean, math.sqrt(variance / n), n


def _candidate_key(trial: dict) -> str:
    """What makes a candidate: its method, rank and parameters, not its seed."""
    return json.dumps([trial["method"], trial["rank"], trial["params"]], sort_keys=True,
                      default=str)


def _status(trials: list[dict], finished: int) -> str:
    if finished == len(trials):
        return "finished"
    if finished:
        return f"finished {finished} of {len(trials)} seeds"
    return ", ".join(sorted({t["status"] for t in trials}))


def candidate_rows(trials: list[dict]) -> list[dict]:
    """The leaderboard over seeds of the trial rows (`study.selection.leaderboard`), one row
    per candidate: best mean objective first, candidates with no finished seed last. A
    candidate has one trial per seed: when the search ran it twice with a seed (Optuna may
    suggest a candidate again; both are one MLflow run), the finished one is kept."""
    groups: dict[str, dict[int, dict]] = {}
    for trial in sorted(trials, key=lambda t: t[OBJECTIVE] is None):  # finished first
        groups.setdefault(_candidate_key(trial), {}).setdefault(trial["seed"], trial)
    rows = []
    for by_seed in groups.values():
        group = [by_seed[seed] for seed in sorted(by_seed)]
        done = [t for t in group if t[OBJECTIVE] is not None]
        mean, stderr, n = mean_stderr(t[OBJECTIVE] for t in done)
        names = dict.fromkeys(k for t in done for k in t["metrics"])
        first = group[0]
        rows.append({
            "candidate": first["candidate"], "method": first["method"],
            "rank": first["rank"], "params": first["params"], "status": _status(group, n),
            OBJECTIVE: mean, stderr_key(OBJECTIVE): stderr, count_key(OBJECTIVE): n,
            "seeds": [t["seed"] for t in group],
            "metrics": {k: mean_stderr(t["metrics"].get(k) for t in done)[0] for k in names},
            PER_SEED: group,
        })
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, -(r[OBJECTIVE] or 0.0)))
    return rows


def add_test(row: dict) -> None:
    """A candidate row's test score over its seeds: mean, standard error and n of its
    trials' `test` (the trials the test split was evaluated for)."""
    mean, stderr, n = mean_stderr(t.get("test") for t in row[PER_SEED])
    row.update({"test": mean, stderr_key("test"): stderr, count_key("test"): n})


def trial_rows(rows: list[dict]) -> list[dict]:
    """Every trial of a leaderboard: its rows, or each candidate's trials."""
    return [t for row in rows for t in row.get(PER_SEED, [row])]


def exported_trial(row: dict) -> dict:
    """The trial a leaderboard row stands for, whose checkpoint `export` writes: a trial row
    itself; of a candidate row, its finished seed with the best validation objective (the
    first of them on a tie)."""
    trials = row.get(PER_SEED, [row])
    done = [t for t in trials if t[OBJECTIVE] is not None]
    return max(done, key=lambda t: t[OBJECTIVE]) if done else trials[0]


def shown(row: dict, key: str) -> str:
    """A leaderboard value as printed: `0.123`; over seeds `0.123 ± 0.010 (n=3)` (no ± with
    one seed); `-` when there is none."""
    value = row.get(key)
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if count_key(key) in row:
        stderr = row.get(stderr_key(key))
        text += (f" ± {stderr:.3f}" if stderr is not None else "") + \
            f" (n={row[count_key(key)]})"
    return text
