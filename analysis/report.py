"""A self-contained HTML report of one study, or of several side by side: figures embedded as
PNG, tables, the study's configuration and links to every MLflow run. Read-only over MLflow.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import figures, summaries
from analysis.runs import (
    StudyRuns,
    cat_weights,
    combined,
    parent_artifact_names,
    parent_artifact_text,
)
from soups.errors import SoupsError
from soups.names import BUILD_SECONDS, OBJECTIVE, TEST, WALL_SECONDS
from study import mlflow_links
from study.methods import method_notes

# Section ids, in report order (tests check that each is present).
SECTIONS = ("summary", "methods", "retention", "leaderboard", "rank-method", "cat-settings",
            "cat-weights", "progress", "finetunes", "configuration")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.failed td { background: #fdecea; } tr.best td { background: #eaf6ea; }
img { max-width: 100%; } summary { cursor: pointer; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def ui_base(study: StudyRuns, mlflow_ui: str | None) -> str:
    """The MLflow UI serving this store: given, the tracking server itself, or local."""
    return mlflow_links.ui_base(study.tracking_uri, mlflow_ui)


def _run_link(study: StudyRuns, run_id: str, ui: str, text: str = "run") -> str:
    url = mlflow_links.run_url(ui, study.experiment_id, run_id)
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>'


def _cell(value, fmt: str | None = None) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if fmt:
        return fmt.format(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def _table(frame: pd.DataFrame, raw: set[str] = frozenset(),
           row_class: Callable[[pd.Series], str] | None = None,
           formats: dict[str, str] | None = None) -> str:
    """An HTML table; columns in `raw` hold markup already (links), the rest is escaped;
    `formats` gives a column its number format (default: 3 decimals)."""
    formats = formats or {}
    if frame.empty:
        return '<p class="note">(none)</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cls = f' class="{row_class(row)}"' if row_class else ""
        cells = "".join(
            f'<td class="text">{row[c]}</td>' if c in raw else
            f'<td{" class=text" if isinstance(row[c], str) else ""}>'
            f"{_cell(row[c], formats.get(c))}</td>"
            for c in frame.columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(fig, alt: str) -> str:
    data = base64.b64encode(figures.png_bytes(fig)).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary(study: StudyRuns, ui: str) -> str:
    trials = study.trials
    counts = trials["status"].value_counts()
    best = summaries.finished(trials).head(1)
    target = study.target
    test = summaries.accuracy_column(target, TEST) if target else None
    items = [
        f"target task <b>{html.escape(str(target))}</b>; skills "
        f"<b>{html.escape(', '.join(study.skills))}</b>",
        "trials: " + (", ".join(f"{n} {html.escape(s)}" for s, n in counts.items()) or "none"),
        f"fine-tunes: {len(study.finetunes)}",
        f"MLflow: {html.escape(study.tracking_uri)}, experiment {study.experiment_id}: "
        f'<a href="{html.escape(mlflow_links.runs_table_url(ui, study.experiment_id))}">'
        "the trials in the MLflow UI, best first</a>"
        + (f" ({_run_link(study, study.parent['run_id'], ui, 'parent run')})"
           if study.parent else ""),
    ]
    if len(best):
        row = best.iloc[0]
        tested = row.get(test) if test else None
        parsed = row.get(summaries.parsed_column(target)) if target else None
        items.append(
            f"best by validation: <b>{html.escape(row['label'])}</b>, {target} accuracy "
            f"{row[OBJECTIVE]:.3f} (validation)"
            + (f", <b>{tested:.3f}</b> on the test split (scored once, after selection)"
               if tested is not None and not pd.isna(tested) else "")
            + (f"; {parsed:.0%} of its answers could be scored"
               if parsed is not None and not pd.isna(parsed) else "")
            + f" ({_run_link(study, row['run_id'], ui)})")
        items.append(_winner_family(row["group"]))
    items.append(_spread_note(trials))
    start, end = study.parent.get("start_time"), study.parent.get("end_time")
    if not pd.isna(start) and not pd.isna(end):
        items.append(f"study run time {(end - start).total_seconds() / 60:.1f} min "
                     f"(started {start:%Y-%m-%d %H:%M} UTC; the parent run: base model, "
                     "fine-tunes, search and test)")
    if len(study.duplicates):
        items.append(f"{len(study.duplicates)} duplicate trial run(s) ignored (same run key "
                     "as a kept run)")
    return f"<h3>{html.escape(study.name)}</h3><ul>" + "".join(
        f"<li>{i}</li>" for i in items) + "</ul>"


# What the winner's family says about the study's question (is composing by merging better?).
FAMILY_VERDICT = {
    "merge": "a merge of the skill LoRAs (no training after stage 1)",
    "learned": "a learned composition of the skill LoRAs (weights or a router trained on a "
               "small skill mix)",
    "stage-1": "a baseline, not a composition: one LoRA trained in stage 1 (a skill LoRA "
               "alone, or DATA-MIX on all the skills' data)",
    "reference": "the base model without any adapter: no candidate improved on it",
    "control": "a control (a random LoRA, or one trained on CAT's rows): the composition "
               "claim does not hold on this study",
}


def _winner_family(group: str) -> str:
    family = method_notes([group]).get(group, {}).get("kind")
    verdict = FAMILY_VERDICT.get(family, "of a kind this version does not know")
    return f"the winner is {html.escape(verdict)}"


def _spread_note(trials: pd.DataFrame) -> str:
    if summaries.several_seeds(trials):
        seeds = int(trials["seed"].nunique())
        return (f"{seeds} seeds per candidate: the leaderboard gives each candidate's mean ± "
                "standard error over them")
    return ("<b>one seed</b>: every score is a single run, with no spread; differences of a "
            "few rows may be noise (<code>search.seeds: [0, 1, 2]</code> gives mean ± "
            "standard error)")


def _leaderboard(studies: list[StudyRuns], ui: str) -> str:
    parts = []
    for study in studies:
        trials = study.trials
        target, skills = study.target, study.skills
        frame = pd.DataFrame({
            "#": range(1, len(trials) + 1), "trial": trials["label"],
            "status": trials["status"],
            f"{target} (val)": trials[OBJECTIVE],
            "parsed": trials.get(summaries.parsed_column(target)),
            f"{target} (test)": trials.get(summaries.accuracy_column(target, TEST)),
            **{f"{s} (val)": trials.get(summaries.accuracy_column(s)) for s in skills},
            "build s": trials.get(BUILD_SECONDS), "trial s": trials["duration_s"],
            "MLflow": [_run_link(study, r, ui) for r in trials["run_id"]],
        })

        def row_class(row):
            if row["status"] != "finished":
                return "failed"
            return "best" if row["#"] == 1 else ""

        title = f"<h3>{html.escape(study.name)}</h3>" if len(studies) > 1 else ""
        parts.append(title + _over_seeds(study)
                     + _table(frame, raw={"MLflow"}, row_class=row_class,
                              formats={"build s": "{:.1f}", "trial s": "{:.1f}",
                                       "parsed": "{:.0%}"}))
    return "".join(parts) + ('<p class="note">Sorted by the objective (validation accuracy '
                             "on the target); unfinished trials last and shaded. "
                             "<i>parsed</i>: the share of target answers the scorer could "
                             "read at all (a program that parses, a number): a score of 0 "
                             "with parsed 0% means the candidate never wrote an answer in "
                             "the expected form, not that it answered wrongly. Test "
                             "accuracy exists only for the trial each study selected (for "
                             "each seed of the selected candidate, with several seeds).</p>")


def _over_seeds(study: StudyRuns) -> str:
    """With several seeds: each candidate's mean ± standard error over its seeds (the
    study's leaderboard), before the trials one by one."""
    if not summaries.several_seeds(study.trials):
        return ""
    table = summaries.candidate_summary(study.trials, study.target)
    frame = pd.DataFrame({
        "#": range(1, len(table) + 1), "candidate": table["candidate"],
        "seeds": table["seeds"],
        f"{study.target} (val)": [_spread(m, e) for m, e in zip(
            table["validation"], table["validation_stderr"], strict=True)],
        f"{study.target} (test)": [_spread(m, e, n) for m, e, n in zip(
            table["test"], table["test_stderr"], table["test_seeds"], strict=True)],
    })
    return ("<p>Per candidate over its seeds: mean ± standard error (sample standard "
            "deviation / &radic;n; no ± with one seed), best mean first. The candidate of "
            "the best mean is the one selected.</p>"
            + _table(frame, row_class=lambda row: "best" if row["#"] == 1 else "")
            + "<p>Every trial:</p>")


def _spread(mean, stderr, n=None) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    text = f"{mean:.3f}"
    if stderr is not None and not pd.isna(stderr):
        text += f" ± {stderr:.3f}"
    return text + (f" (n={n})" if n is not None else "")


def _methods(studies: list[StudyRuns]) -> str:
    target = studies[0].target
    trials = combined(studies)
    summary = summaries.method_summary(trials, target)
    shown = summary.drop(columns=["best_run_id"], errors="ignore")
    notes = method_notes(shown["method"])
    for column in ("kind", "what it is"):
        shown[column] = [notes.get(m, {}).get(column, "") for m in shown["method"]]
    return (_figure(figures.method_comparison(trials, target), "method comparison")
            + _table(shown, formats={"seeds": "{:.0f}"}))


def _per_study(studies: list[StudyRuns], section: Callable[[StudyRuns], str]) -> str:
    if len(studies) == 1:
        return section(studies[0])
    return "".join(f"<h3>{html.escape(s.name)}</h3>{section(s)}" for s in studies)


def _retention(study: StudyRuns) -> str:
    table = summaries.retention(study.trials, study.skills)
    refs = summaries.skill_references(study.trials, study.skills)
    note = ", ".join(f"{s} LoRA on {s}: {v:.3f}" for s, v in refs.items())
    return (_figure(figures.skill_retention(study.trials, study.skills), "retention")
            + _table(table) + f'<p class="note">100% = the skill LoRA alone ({note}).</p>')


def _rank_method(study: StudyRuns) -> str:
    ranks = summaries.finished(study.trials)["rank"].dropna().unique()
    if len(ranks) < 2:  # one column would compare nothing
        shown = f"r{int(ranks[0])}" if len(ranks) else "none"
        return (f'<p class="note">One LoRA rank in this study ({shown}): nothing to compare '
                "across ranks (a search space with <code>rank: {grid: [8, 16]}</code> "
                "varies it).</p>")
    return _figure(figures.rank_method_heatmap(study.trials, study.target), "rank x method")


def _cat_settings(study: StudyRuns) -> str:
    if summaries.cat_trials(study.trials).empty:
        return '<p class="note">No finished learned-CAT trial.</p>'
    varied = summaries.varied_cat_settings(study.trials)
    if not varied:
        return ('<p class="note">The search did not vary the learned CAT\'s initialisation, '
                "granularity or normalisation: nothing to compare.</p>")
    table = summaries.cat_setting_summary(study.trials)
    table = table[table["setting"].isin(varied)]
    return _figure(figures.cat_settings(study.trials, study.target), "CAT settings") + \
        _table(table)


def _cat_weights(study: StudyRuns, ui: str) -> str:
    cat = summaries.cat_trials(study.trials)
    if cat.empty:
        return '<p class="note">No finished learned-CAT trial.</p>'
    best = cat.iloc[0]  # the trial table is sorted by the objective
    record = cat_weights(study, best["run_id"])
    if record is None:
        return '<p class="note">The best learned-CAT trial logged no cat_weights.json.</p>'
    return (f"<p>Best learned-CAT trial: {html.escape(best['label'])} "
            f"({_run_link(study, best['run_id'], ui)}). One panel per skill LoRA; each cell "
            "is the weight a_i of that LoRA in that layer's module.</p>"
            + _figure(figures.learned_cat_weights(record, study.skills), "CAT weights"))


def _finetunes(study: StudyRuns, ui: str) -> str:
    frame = study.finetunes.copy()
    if frame.empty:
        return '<p class="note">No fine-tune runs.</p>'
    frame = frame[[c for c in frame.columns if not c.startswith("param.")]]
    frame["MLflow"] = [_run_link(study, r, ui) for r in frame.pop("run_id")]
    return _table(frame, raw={"MLflow"}, formats={"epoch": "{:g}", "rank": "{:g}",
                                                  WALL_SECONDS: "{:.1f}"}) + (
        '<p class="note">Metrics are the last logged value of each curve; the curves are in '
        "the MLflow runs.</p>")


def _configuration(study: StudyRuns) -> str:
    parts = []
    for name in sorted(n for n in parent_artifact_names(study) if n.endswith((".yaml", ".yml"))):
        text = parent_artifact_text(study, name)
        if text is not None:
            parts.append(f"<details><summary><b>{html.escape(name)}</b></summary>"
                         f"<pre>{html.escape(text)}</pre></details>")
    return "".join(parts) or '<p class="note">The parent run logged no configuration.</p>'


def render(studies: list[StudyRuns], mlflow_ui: str | None = None) -> str:
    """The report's HTML for one or several studies (same target task for a comparison)."""
    targets = {s.target for s in studies}
    if len(targets) > 1:
        raise SoupsError(f"studies {[s.name for s in studies]} have different target tasks "
                         f"{sorted(map(str, targets))}: a comparison needs one target")
    ui = ui_base(studies[0], mlflow_ui)
    names = ", ".join(s.name for s in studies)
    sections = {
        "summary": ("Summary", "".join(_summary(s, ui) for s in studies)),
        "methods": ("Every candidate on the target", _methods(studies)),
        "retention": ("Per-skill retention", _per_study(studies, _retention)),
        "leaderboard": ("Leaderboard", _leaderboard(studies, ui)),
        "rank-method": ("Rank x method", _per_study(studies, _rank_method)),
        "cat-settings": ("CAT initialisation, granularity, normalisation",
                         _per_study(studies, _cat_settings)),
        "cat-weights": ("Learned CAT weights",
                        _per_study(studies, lambda s: _cat_weights(s, ui))),
        "progress": ("Search progress",
                     _figure(figures.search_progress(combined(studies)), "search progress")),
        "finetunes": ("Skill fine-tunes (stage 1)",
                      _per_study(studies, lambda s: _finetunes(s, ui))),
        "configuration": ("Configuration", _per_study(studies, _configuration)),
    }
    body = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>'
                   for key, (title, content) in sections.items())
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>LoRA Soups report: "
            f"{html.escape(names)}</title><style>{STYLE}</style></head><body>"
            f"<h1>LoRA Soups study report: {html.escape(names)}</h1>"
            f'<p class="note">Written {created} from MLflow. Accuracies are fractions of '
            "examples scored correct; the objective is the validation accuracy on the target "
            f"task. Run links open the MLflow UI at {html.escape(ui)} (start it with "
            f"<code>{html.escape(mlflow_links.ui_command(studies[0].tracking_uri))}"
            f"</code>).</p>{body}</body></html>")


def write_report(studies: list[StudyRuns], out_dir: Path, mlflow_ui: str | None = None
                 ) -> Path:
    """Write `report.html` and `trials.csv` (the tidy trial table) into `out_dir`."""
    page = render(studies, mlflow_ui)
    out_dir.mkdir(parents=True, exist_ok=True)
    combined(studies).to_csv(out_dir / "trials.csv", index=False)
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
