"""`soups run`, `soups resume`, `soups status`, `soups export`: a study's life cycle."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from soups.names import OBJECTIVE
from study.console import StudyConsole
from study.layout import LEADERBOARD_FILE, TUNE_DIR, study_dir
from study.seeds import exported_trial, shown, trial_rows
from study.shipped import shipped_studies, studies_dir, summary

# --smoke: the same pipeline, minutes instead of tens of minutes. On the shipped base model:
# 100 fine-tune steps are enough for each skill LoRA to learn its skill, so the smoke study's
# merges are measured on real skills (tests/test_study_run.py bounds them).
SMOKE = {
    "finetune": {"max_steps": 100},
    "cat": {"max_steps": 20, "eval_every": 10, "held_out": 32},
    "evaluation": {"validation_limit": 40, "test_limit": 60},
}


def _run_in_console(spec, resume: bool = False) -> None:
    """The study with its terminal kept for progress; everything else in its log file."""
    from study.registry import check_study  # lazy: pydantic
    from study.runner import run_study  # lazy: pydantic

    check_study(spec, resume)  # a study that cannot start leaves no folder (nor log) behind
    with StudyConsole(study_dir(spec)) as console:
        console.say(f"study {spec.name}: Ray's and the libraries' logs are in {console.path}")
        run_study(spec, resume=resume, log=console.say)


def run(
    study: Path = typer.Argument(None, help="Study YAML, or a shipped study's name (`soups "
                                 "studies`; default: the embedded study)."),
    name: str = typer.Option(None, help="Study name (default: the spec's name; "
                             "state in $SOUPS_HOME/NAME)."),
    smoke: bool = typer.Option(False, help="A minutes-long version: few fine-tune and CAT "
                               "steps, small evaluation splits."),
    set_: list[str] = typer.Option(None, "--set", help="Change one key of the study: "
                                   "KEY.PATH=VALUE (YAML value), e.g. --set "
                                   "base_model=/models/llama (repeatable)."),
) -> None:
    """Run a study end to end: fine-tune skill LoRAs, search merges with Ray Tune, evaluate
    the best on the test split once, export and register it."""
    from study.spec import (  # lazy: pydantic
        StudySpec,
        assignments,
        overlay,
        parse_model,
        study_data,
        study_path,
        with_overrides,
    )

    study = study_path(study) if study is not None else None
    label = str(study or "default study")
    data = with_overrides(study_data(study), assignments(set_), label)
    if smoke:
        data = overlay(data, {**SMOKE, "name": data.get("name", "smoke")})
    if name:
        data["name"] = name
    _run_in_console(parse_model(StudySpec, data, label))


def studies() -> None:
    """List the study files the project ships; run or validate one by its name (`soups run
    real_composition`), or copy it as a start for your own."""
    found = shipped_studies()
    typer.echo(f"shipped studies ({studies_dir() or 'none installed'}):")
    width = max((len(name) for name in found), default=0) + 2
    for name, path in found.items():
        typer.echo(f"  {name:<{width}}{summary(path)}")


def resume(name: str = typer.Argument(..., help="Name of an interrupted study.")) -> None:
    """Continue an interrupted study: finished trials are kept, unfinished ones rerun. A
    complete study is left as it is (said, exit status 0)."""
    from study.registry import StudyComplete, saved_spec  # lazy: pydantic

    try:
        _run_in_console(saved_spec(name), resume=True)
    except StudyComplete as done:
        typer.echo(str(done))


def status(name: str = typer.Argument(..., help="Study name.")) -> None:
    """Print a study's progress: trials by state and the best so far (over seeds: mean ±
    standard error and the number of seeds)."""
    from study.registry import saved_spec  # lazy: pydantic
    from trainables.tuner import trial_states  # lazy: pydantic

    root = study_dir(saved_spec(name))
    board = root / LEADERBOARD_FILE
    states = trial_states(root / TUNE_DIR)
    typer.echo(f"study {name} ({root})")
    typer.echo("trials: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items()))
                             or "none started"))
    if board.is_file():
        rows = json.loads(board.read_text())
        best = rows[0]
        typer.echo(f"complete; best {best['candidate']}: validation "
                   f"{shown(best, OBJECTIVE)}, test {shown(best, 'test')}")
    else:
        typer.echo("not complete (run `soups resume " + name + "` if it was interrupted)")


def export(
    name: str = typer.Argument(..., help="Study name."),
    out: Path = typer.Option(..., help="Folder to write the PEFT adapter to."),
    trial: str = typer.Option(None, help="Trial to export (default: the best)."),
    force: bool = typer.Option(False, help="Replace OUT when it is not empty."),
) -> None:
    """Write the best (or --trial) merged adapter of a finished study as a PEFT folder."""
    from study.export import export_adapter  # lazy: pydantic
    from study.registry import saved_spec  # lazy: pydantic
    from study.spec import SpecError  # lazy: pydantic

    spec = saved_spec(name)
    board = study_dir(spec) / LEADERBOARD_FILE
    if not board.is_file():
        raise SpecError(f"study {name} has not finished (no {LEADERBOARD_FILE})")
    rows = json.loads(board.read_text())
    if trial:  # any trial, also one seed of a candidate over seeds
        rows = [r for r in trial_rows(rows) if r["trial"] == trial]
        if not rows:
            raise SpecError(f"study {name} has no trial {trial!r}")
    row = next((r for r in rows if r[OBJECTIVE] is not None), None)
    if row is None:
        raise SpecError(f"study {name}: trial {trial or ''} did not finish")
    row = exported_trial(row)  # the trial itself, or the best candidate's best seed
    export_adapter(row, out, spec, force=force)
    seed = f" seed {row['seed']}" if "seed" in row else ""
    typer.echo(f"wrote {row['candidate']}{seed} to {out}")
