"""Tables computed from a trial table (`analysis.runs`): what the figures and the report show.

Every function takes the tidy trial table (one or several studies) and returns a DataFrame;
only finished trials (status `finished`, an objective) enter a comparison.
"""

from __future__ import annotations

import pandas as pd

from soups.compose.cat.settings import CatSettings
from soups.names import CAT_EVAL_LOSS, OBJECTIVE, PARSED, TEST, VALIDATION, task_metric
from study.seeds import mean_stderr

CAT_SETTINGS = ("init", "granularity", "normalisation")


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[(trials["status"] == "finished") & trials[OBJECTIVE].notna()]


def accuracy_column(task: str, split: str = VALIDATION) -> str:
    return task_metric(split, task)


def parsed_column(task: str, split: str = VALIDATION) -> str:
    """The share of a task's answers its scorer could read (`parsed`)."""
    return task_metric(split, task, PARSED)


def varied_cat_settings(trials: pd.DataFrame) -> list[str]:
    """The CAT settings that took more than one value among the finished learned-CAT
    trials: the only ones a comparison can show."""
    cat = cat_trials(trials)
    return [name for name in CAT_SETTINGS if cat[name].nunique() > 1] if len(cat) else []


def method_summary(trials: pd.DataFrame, target: str) -> pd.DataFrame:
    """Per study and method (the `group` column: skill LoRAs one by one): trials (all /
    finished), the best validation accuracy on the target and its trial, the mean, standard
    deviation and standard error over seeds of each seed's best (empty with one seed), and
    the test accuracy where the study scored one (the mean over the seeds it was scored
    for)."""
    test = accuracy_column(target, TEST)
    rows = []
    for (study, method), group in trials.groupby(["study", "group"], sort=False):
        done = finished(group)
        row = {"study": study, "method": method, "trials": len(group), "finished": len(done)}
        if len(done):
            best = done.loc[done[OBJECTIVE].idxmax()]
            per_seed = done.groupby(done["seed"].fillna(-1))[OBJECTIVE].max()
            tested = done[test].dropna() if test in done else pd.Series(dtype=float)
            row.update({
                "best_validation": best[OBJECTIVE], "best_trial": best["label"],
                "best_run_id": best["run_id"], "seeds": len(per_seed),
                "seed_mean": per_seed.mean(),
                "seed_std": per_seed.std(ddof=1) if len(per_seed) > 1 else None,
                "seed_stderr": mean_stderr(per_seed)[1],
                "test": tested.mean() if len(tested) else None,
            })
        rows.append(row)
    table = pd.DataFrame(rows)
    if "best_validation" not in table:
        table["best_validation"] = None
    return table.sort_values(["best_validation", "method"], ascending=[False, True],
                             na_position="last").reset_index(drop=True)


CANDIDATE_COLUMNS = ["candidate", "method", "seeds", "validation", "validation_stderr",
                     "test", "test_stderr", "test_seeds"]


def candidate_summary(trials: pd.DataFrame, target: str) -> pd.DataFrame:
    """Per candidate (its `label`: method, rank and parameters, not the seed) of one study,
    over its finished seeds: how many, and the mean and standard error (`study.seeds`) of
    the validation objective and of the test accuracy (scored for the selected candidate
    only); best mean first. What the study's leaderboard shows with several seeds."""
    test = accuracy_column(target, TEST)
    rows = []
    for label, group in finished(trials).groupby("label", sort=False):
        mean, stderr, n = mean_stderr(group[OBJECTIVE])
        test_mean, test_stderr, test_n = (mean_stderr(group[test]) if test in group
                                          else (None, None, 0))
        rows.append({"candidate": label, "method": group["group"].iloc[0], "seeds": n,
                     "validation": mean, "validation_stderr": stderr, "test": test_mean,
                     "test_stderr": test_stderr, "test_seeds": test_n})
    table = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    return table.sort_values("validation", ascending=False, kind="stable").reset_index(
        drop=True)


def several_seeds(trials: pd.DataFrame) -> bool:
    """Whether a study's finished trials ran with more than one seed."""
    return finished(trials)["seed"].nunique() > 1


def skill_references(trials: pd.DataFrame, skills: list[str]) -> dict[str, float]:
    """Each skill's own score: the best validation accuracy of that skill's LoRA alone (the
    `skill` trials), the 100% of retention. A skill without such a trial has none."""
    done = finished(trials)
    refs = {}
    if "param.skill" not in done:
        return refs
    for skill in skills:
        column = accuracy_column(skill)
        own = done[(done["method"] == "skill") & (done["param.skill"] == skill)]
        if column in own and own[column].notna().any():
            refs[skill] = float(own[column].max())
    return refs


def retention(trials: pd.DataFrame, skills: list[str]) -> pd.DataFrame:
    """Per method (`group`; its best trial by the objective): validation accuracy on each skill and
    the share of the skill LoRA's own accuracy it keeps (`retention/<skill>`, 1.0 = all;
    empty where the skill LoRA scores 0 or was not evaluated)."""
    refs = skill_references(trials, skills)
    done = finished(trials)
    rows = []
    for method, group in done.groupby("group", sort=False):
        best = group.loc[group[OBJECTIVE].idxmax()]
        row = {"method": method, "trial": best["label"], OBJECTIVE: best[OBJECTIVE]}
        for skill in skills:
            column = accuracy_column(skill)
            score = best.get(column)
            row[skill] = score
            ref = refs.get(skill)
            row[f"retention/{skill}"] = (score / ref if ref and score is not None
                                         and not pd.isna(score) else None)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(OBJECTIVE, ascending=False).reset_index(drop=True)


def rank_by_method(trials: pd.DataFrame) -> pd.DataFrame:
    """Best validation objective per method (`group`, rows) and LoRA rank (columns); NaN where that
    combination was not tried. Methods without a rank (the base model) are left out."""
    done = finished(trials).dropna(subset=["rank"])
    if done.empty:
        return pd.DataFrame()
    table = done.pivot_table(index="group", columns="rank", values=OBJECTIVE, aggfunc="max")
    table.columns = [int(c) for c in table.columns]
    return table.loc[table.max(axis=1).sort_values(ascending=False).index]


def cat_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished learned-CAT trials with their init / granularity / normalisation filled in
    (a setting the search space did not vary has CatSettings' default)."""
    done = finished(trials)
    cat = done[done["method"] == "cat_learned"].copy()
    defaults = CatSettings()
    for name in CAT_SETTINGS:
        column = f"param.{name}"
        values = cat[column] if column in cat else pd.Series(None, index=cat.index,
                                                             dtype=object)
        cat[name] = values.fillna(getattr(defaults, name)).astype(str)
    return cat


def cat_setting_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """For each CAT setting and value: trials, best and mean validation objective, and the
    mean final held-out loss of the CAT weight training (lower is better)."""
    cat = cat_trials(trials)
    rows = []
    for name in CAT_SETTINGS:
        for value, group in cat.groupby(name):
            rows.append({
                "setting": name, "value": value, "trials": len(group),
                "best_validation": group[OBJECTIVE].max(),
                "mean_validation": group[OBJECTIVE].mean(),
                "mean_held_out_loss": (group[CAT_EVAL_LOSS].mean()
                                       if CAT_EVAL_LOSS in group else None),
            })
    return pd.DataFrame(rows, columns=["setting", "value", "trials", "best_validation",
                                       "mean_validation", "mean_held_out_loss"])


def best_so_far(trials: pd.DataFrame) -> pd.DataFrame:
    """Per study, trials in the order they finished: their objective, the best objective so
    far, and the wall time since the study's first trial started (minutes)."""
    parts = []
    for study, group in finished(trials).groupby("study", sort=False):
        group = group.sort_values("end_time")
        start = trials.loc[trials["study"] == study, "start_time"].min()
        parts.append(pd.DataFrame({
            "study": study, "trial_number": range(1, len(group) + 1),
            "label": group["label"].to_numpy(), OBJECTIVE: group[OBJECTIVE].to_numpy(),
            "best_so_far": group[OBJECTIVE].cummax().to_numpy(),
            "minutes": ((group["end_time"] - start).dt.total_seconds() / 60).to_numpy(),
        }))
    if not parts:
        return pd.DataFrame(columns=["study", "trial_number", "label", OBJECTIVE,
                                     "best_so_far", "minutes"])
    return pd.concat(parts, ignore_index=True)
