"""Figures from a trial table: each function returns a matplotlib Figure (never shows it).

Accuracies are fractions of examples scored correct (0-1) on the *validation* split unless a
label says test; the objective is the validation accuracy on the target task.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis import summaries
from soups.compose.cat.plot import cat_weights_figure
from soups.names import CAT_EVAL_LOSS, OBJECTIVE
from study.methods import method_notes

# Figures are built without pyplot: no global figure state to leak or close, safe in threads,
# and a notebook shows the returned Figure once.
STUDY_COLOURS = colormaps["tab10"].colors


class AnalysisFigure(Figure):
    """A Figure that Jupyter shows as a PNG without pyplot (IPython calls `_repr_png_`)."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


def _subplots(nrows: int = 1, ncols: int = 1, figsize=(6, 4)):
    fig = AnalysisFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def png_bytes(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _no_data(message: str, size=(6, 1.6)):
    fig, ((ax,),) = _subplots(figsize=size)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
    ax.set_axis_off()
    return fig


def _top(values, floor: float = 0.05) -> float:
    """A y-axis top for accuracies: room above the largest value, never a flat axis."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    return max(floor, 1.15 * max(values, default=0.0))


def method_comparison(trials: pd.DataFrame, target: str):
    """Bars: each method's best validation accuracy on the target (one bar per study);
    grey markers: mean ± standard error over seeds of each seed's best (methods run with
    several seeds); dots: every finished trial; diamonds: the test accuracy of a study's
    selected trial (the mean over its seeds)."""
    summary = summaries.method_summary(trials, target)
    summary = summary[summary["best_validation"].notna()]
    if summary.empty:
        return _no_data("no finished trials")
    methods = list(dict.fromkeys(summary["method"]))
    studies = list(dict.fromkeys(summary["study"]))
    width = 0.8 / len(studies)
    fig, ((ax,),) = _subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.2))
    done = summaries.finished(trials)
    rng = np.random.default_rng(0)
    plotted: list[float] = []
    for s, study in enumerate(studies):
        colour = STUDY_COLOURS[s % len(STUDY_COLOURS)]
        rows = summary[summary["study"] == study].set_index("method")
        xs = np.arange(len(methods)) + (s - (len(studies) - 1) / 2) * width
        best = [rows["best_validation"].get(m, np.nan) for m in methods]
        bars = ax.bar(xs, best, width * 0.9, color=colour, alpha=0.75,
                      label=f"best trial ({study})" if len(studies) > 1 else "best trial")
        ax.bar_label(bars, labels=[f"{v:.3f}" if np.isfinite(v) else "" for v in best],
                     fontsize=7, padding=2)
        spread = rows[rows["seed_stderr"].notna()]
        if len(spread):  # spread over seeds, where a method ran with several
            at = [xs[methods.index(m)] + width / 4 for m in spread.index]
            ax.errorbar(at, spread["seed_mean"], yerr=spread["seed_stderr"], fmt="o",
                        color="dimgrey", markersize=4, capsize=3,
                        label="mean ± standard error over seeds (each seed's best)")
            plotted.extend(spread["seed_mean"] + spread["seed_stderr"])
        for x, method in zip(xs, methods, strict=True):
            points = done[(done["study"] == study) & (done["group"] == method)][OBJECTIVE]
            ax.scatter(x + rng.uniform(-width / 4, width / 4, len(points)), points, s=10,
                       color="black", zorder=3, label="every trial")
            plotted.extend(points)
            test = rows["test"].get(method)
            if not pd.isna(test):
                ax.scatter([x], [test], marker="D", s=40, color="crimson", zorder=4,
                           label="test accuracy (selected trial)")
                plotted.append(test)
    ax.set_ylim(0, 1.25 * _top(plotted))  # room for the legend above the bars
    families = method_notes(methods)  # merges beside learned ones, baselines and controls
    ticks = [f"{m} [{families[m]['kind']}]" if m in families else m for m in methods]
    ax.set_xticks(range(len(methods)), ticks, rotation=30, ha="right")
    ax.set_xlabel("candidate [family] (ordered by best validation accuracy)")
    ax.set_ylabel(f"{target} accuracy (fraction correct)")
    ax.set_title(f"Every candidate on the target task {target} (validation split)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()  # the rotated candidate names stay inside the image
    return fig


def skill_retention(trials: pd.DataFrame, skills: list[str]):
    """Per method (its best trial): validation accuracy on each skill (bars), the skill
    LoRA's own accuracy on it (dashed line: what a merge would keep in full), and the share
    kept (bar labels, 100% = as good as the skill LoRA alone; n/a where that LoRA scores 0
    or was not evaluated)."""
    table = summaries.retention(trials, skills)
    columns = [s for s in skills if s in table]
    if table.empty or table[columns].isna().all().all():
        return _no_data("no skill accuracy to show: the study evaluated no skill")
    refs = summaries.skill_references(trials, skills)
    fig, ((ax,),) = _subplots(figsize=(max(6.0, 0.9 * len(table) + 2), 4.0))
    width = 0.8 / len(skills)
    xs = np.arange(len(table))
    for i, skill in enumerate(skills):
        colour = STUDY_COLOURS[(i + 2) % len(STUDY_COLOURS)]
        values = table[skill].astype(float)
        kept = 100 * table[f"retention/{skill}"].astype(float)
        bars = ax.bar(xs + (i - (len(skills) - 1) / 2) * width, values, width * 0.9,
                      label=skill, color=colour)
        ax.bar_label(bars, labels=[f"{k:.0f}%" if np.isfinite(k) else "n/a" for k in kept],
                     fontsize=7, padding=2)
        if skill in refs:
            ax.axhline(refs[skill], color=colour, linestyle="--", linewidth=1,
                       label=f"{skill} LoRA alone on {skill}: {refs[skill]:.3f}")
    ax.set_xticks(xs, table["method"], rotation=30, ha="right")
    ax.set_xlabel("method (its best trial; ordered by target accuracy)")
    ax.set_ylabel("skill accuracy (validation, fraction correct)")
    ax.set_title("Per-skill retention: accuracy on each skill; labels: % of the skill "
                 "LoRA's own", fontsize=10)
    ax.set_ylim(0, 1.3 * _top(table[columns].astype(float).to_numpy().ravel()))
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def rank_method_heatmap(trials: pd.DataFrame, target: str):
    """Best validation accuracy on the target for each method (rows) and LoRA rank (columns);
    blank where the combination was not tried."""
    table = summaries.rank_by_method(trials)
    if table.empty:
        return _no_data("no finished trial with a LoRA rank")
    values = table.to_numpy(dtype=float)
    fig, ((ax,),) = _subplots(figsize=(1.3 * len(table.columns) + 3, 0.45 * len(table) + 1.6))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0,
                      vmax=max(np.nanmax(values), 1e-3))
    ax.set_xticks(range(len(table.columns)), [f"r = {c}" for c in table.columns])
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xlabel("LoRA rank of the skill adapters")
    ax.set_ylabel("method")
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 * np.nanmax(values) else "black")
    ax.set_title(f"Best {target} accuracy by rank and method (validation)")
    fig.colorbar(image, ax=ax, label=f"{target} accuracy (fraction correct)")
    return fig


def cat_settings(trials: pd.DataFrame, target: str):
    """Learned CAT by initialisation, granularity and normalisation: the target validation
    accuracy (top row) and the final held-out loss of the weight training (bottom row,
    lower is better) of each trial (dots) and their mean (bar)."""
    cat = summaries.cat_trials(trials)
    if cat.empty:
        return _no_data("no finished learned-CAT (cat_learned) trials in this study")
    has_loss = CAT_EVAL_LOSS in cat and cat[CAT_EVAL_LOSS].notna().any()
    rows = 2 if has_loss else 1
    # Only what the search varied: a panel of one value compares nothing.
    settings = summaries.varied_cat_settings(trials) or list(summaries.CAT_SETTINGS)
    fig, axes = _subplots(rows, len(settings), figsize=(3.7 * len(settings), 3.2 * rows))
    metrics = [(OBJECTIVE, f"{target} accuracy (validation)")]
    if has_loss:
        metrics.append((CAT_EVAL_LOSS, "final held-out loss (CAT training)"))
    for r, (column, ylabel) in enumerate(metrics):
        for c, setting in enumerate(settings):
            ax = axes[r][c]
            values = sorted(cat[setting].unique())
            ticks = []
            for x, value in enumerate(values):
                points = cat.loc[cat[setting] == value, column].dropna()
                ax.bar(x, points.mean(), 0.6, color=STUDY_COLOURS[c], alpha=0.6)
                ax.scatter(np.full(len(points), x), points, color="black", s=12, zorder=3)
                ticks.append(f"{value}\nmean {points.mean():.3f}, n={len(points)}")
            ax.set_xticks(range(len(values)), ticks, fontsize=8)
            ax.set_xlabel(f"CAT {setting}")
            if c == 0:
                ax.set_ylabel(ylabel)
            if column == OBJECTIVE:
                ax.set_ylim(0, _top(cat[column]))
            else:
                ax.set_ylim(0, 1.2 * cat[column].max())
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Learned CAT: weight initialisation, granularity, normalisation "
                 "(bars: mean over trials)", fontsize=10)
    fig.tight_layout()
    return fig


def search_progress(trials: pd.DataFrame):
    """Best validation objective so far against the number of finished trials (left) and
    against wall time since the study's first trial started (right); dots: each trial."""
    progress = summaries.best_so_far(trials)
    if progress.empty:
        return _no_data("no finished trials")
    fig, ((by_count, by_time),) = _subplots(1, 2, figsize=(11, 3.8))
    for s, (study, group) in enumerate(progress.groupby("study", sort=False)):
        colour = STUDY_COLOURS[s % len(STUDY_COLOURS)]
        for ax, x in ((by_count, "trial_number"), (by_time, "minutes")):
            ax.step(group[x], group["best_so_far"], where="post", color=colour,
                    label=f"best so far ({study})")
            ax.scatter(group[x], group[OBJECTIVE], color=colour, s=12, alpha=0.6,
                       label=f"each trial ({study})")
    top = _top(progress[OBJECTIVE])
    for ax, xlabel in ((by_count, "finished trials"),
                       (by_time, "wall time since the first trial started (minutes)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("objective: target accuracy (validation)")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    by_count.xaxis.get_major_locator().set_params(integer=True)
    by_count.legend(fontsize=8, loc="lower right")
    fig.suptitle("Search progress", fontsize=10)
    fig.tight_layout()
    return fig


def learned_cat_weights(record: dict, names: list[str] | None = None):
    """Heat map of learned CAT weights (`analysis.runs.cat_weights` gives the record):
    one panel per LoRA, layers down, module types across."""
    return cat_weights_figure(record, names, figure_class=AnalysisFigure)
