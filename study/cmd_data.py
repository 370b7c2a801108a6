"""`soups data preview STUDY.yaml`: what the study's tasks look like before anything trains:
the rendered prompts and completions, token counts, rows the length cutoff truncates,
carve sizes and decontamination counts."""

from __future__ import annotations

from pathlib import Path

import typer

from soups.errors import did_you_mean

data_app = typer.Typer(help="Inspect a study's task data (sources, templates, carving).",
                       no_args_is_help=True)
ROLES = ("train", "validation", "test")


@data_app.command("preview")
def preview(
    study: Path = typer.Argument(None, help="The study file (default: the embedded study)."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Only this task (repeatable)."),
    n: int = typer.Option(2, "-n", min=0, help="Examples shown per task."),
    set_: list[str] = typer.Option(None, "--set", help="Change one key of the study: "
                                   "KEY.PATH=VALUE, as `soups run --set`."),
) -> None:
    """Render each task as the study will: rows per split (after carving, filtering and
    decontamination), the first evaluation prompts with their reference completions, and
    the training token counts against `finetune.max_length`. Loads the data and the base
    model's tokenizer; trains nothing."""
    from soups.tasks.task_data import load_tokenizer  # lazy: pydantic
    from soups.training.text_batches import encode_example  # lazy: torch
    from study.resolve import data_report, resolve_base_model, resolve_tasks  # lazy: pydantic
    from study.spec import SpecError, assignments, load_spec  # lazy: pydantic

    spec = load_spec(study, assignments(set_))
    unknown = sorted(set(task or ()) - set(spec.tasks()))
    if unknown:
        raise SpecError(f"no task {unknown[0]!r} in the study; tasks: {sorted(spec.tasks())}"
                        + did_you_mean(unknown[0], spec.tasks()))
    model_dir = resolve_base_model(spec, log=typer.echo)
    tasks = resolve_tasks(spec, model_dir)
    report = data_report(tasks)
    tokenizer = load_tokenizer(model_dir)
    max_length = spec.finetune.max_length
    for name, data in tasks.items():
        if task and name not in task:
            continue
        role = "skill" if name in spec.skills else "target"
        rows = report[name]["rows"]
        typer.secho(f"\n== {name} ({role}) ==", bold=True)
        typer.echo(f"source: {data.spec.source}  fingerprint: "
                   f"{_short(report[name]['fingerprint'])}")
        typer.echo("rows: " + ", ".join(f"{r} {rows[r]}" for r in ROLES)
                   + f"; decontamination removed {report[name]['decontaminated']} train rows")
        train = data.rows("train")
        lengths = [len(encode_example(tokenizer, r["prompt"], r["completion"], 10**9)[0])
                   for r in train]
        if lengths:
            over = sum(length > max_length for length in lengths)
            typer.echo(f"train tokens: mean {sum(lengths) / len(lengths):.0f}, max "
                       f"{max(lengths)}; {over} of {len(lengths)} rows longer than "
                       f"max_length {max_length} are truncated")
        shown_role = "validation" if rows["validation"] else "train"
        examples = data.rows(shown_role, n) if n else []
        generation = data.generation(spec.evaluation.model_dump())
        if name not in spec.skills or shown_role == "validation":
            typer.echo(f"generation: {generation.params()}  scorer: {data.spec.scorer.kind}")
        for i, (row, prompt) in enumerate(zip(examples, data.eval_prompts(examples),
                                              strict=True), 1):
            typer.secho(f"--- {shown_role} example {i}: prompt "
                        f"({len(tokenizer(prompt)['input_ids'])} tokens)", fg="cyan")
            typer.echo(prompt)
            typer.secho("--- reference completion", fg="cyan")
            typer.echo(row["raw_completion"] if "raw_completion" in row else row["completion"])


def _short(fingerprint: dict) -> str:
    return ", ".join(f"{k}={str(v)[:24]}" for k, v in fingerprint.items()
                     if k not in ("carve",))
