"""The `soups` command line. Each command lives in its own module and is registered here;
heavy libraries (torch, transformers, ray) are imported inside commands so `--help` is fast."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="soups",
    help="Compose skills by merging LoRA adapters (LoRA Soups): fine-tune, merge, search, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """One line per command; each command module keeps its heavy imports inside functions.
    The CLI is the one place `study` reaches `analysis` (the report command lives there,
    beside the library it drives: analysis reads MLflow, never runs a study)."""
    from analysis import cmd_report
    from study import cmd_cat, cmd_merge, cmd_prepare, cmd_run, cmd_validate

    app.command("prepare")(cmd_prepare.prepare)
    app.command("evaluate")(cmd_prepare.evaluate)
    app.command("merge")(cmd_merge.merge)
    app.command("cat")(cmd_cat.cat)
    app.command("run")(cmd_run.run)
    app.command("resume")(cmd_run.resume)
    app.command("status")(cmd_run.status)
    app.command("export")(cmd_run.export)
    app.command("validate")(cmd_validate.validate)
    app.command("report")(cmd_report.report)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
