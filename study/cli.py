"""The `soups` command line. Each command lives in its own module and is registered here;
heavy libraries (torch, transformers, ray) are imported inside commands so `--help` is fast.
Commands raise a `SoupsError` for bad input and leave printing it to `SoupsGroup`."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import typer
from typer.core import TyperGroup

from analysis import cmd_report
from soups.errors import SoupsError
from study import (
    cmd_cat,
    cmd_data,
    cmd_merge,
    cmd_methods,
    cmd_prepare,
    cmd_run,
    cmd_validate,
)


class SoupsGroup(TyperGroup):
    """The one error handler of every command, whoever invokes the group (`main()`, or
    `CliRunner().invoke(app, ...)`): a `SoupsError` (bad input, soups/errors.py) becomes
    `error: <message>` on stderr and exit status 2, as a bad option does; any other
    exception is a bug and keeps its traceback."""

    def list_commands(self, ctx):
        """In the order a study's life goes (their registration order), not alphabetical."""
        return list(self.commands)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SoupsError as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=SoupsGroup,
    name="soups",
    help="Compose skills by merging LoRA adapters (LoRA Soups): fine-tune, merge, search, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"soups {version('lora-soups')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("soups (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", callback=_show_version,
                                      is_eager=True, help="Print the version and exit."),
) -> None:
    """Compose skills by merging LoRA adapters (LoRA Soups): fine-tune, merge, search, export."""


def _command(name: str, function) -> None:
    """Register a command; the list in `soups --help` shows its docstring's first paragraph
    as one line (the full docstring is its own --help)."""
    first = (function.__doc__ or "").strip().split("\n\n")[0]
    app.command(name, short_help=" ".join(first.split()))(function)


def _register() -> None:
    """One line per command; each command module keeps its heavy imports inside functions.
    The CLI is the one place `study` reaches `analysis` (the report command lives there,
    beside the library it drives: analysis reads MLflow, never runs a study)."""
    # A study's life: check it, prepare and inspect its inputs, run it, follow it, compare
    # and export; then the building blocks one at a time.
    _command("validate", cmd_validate.validate)
    _command("prepare", cmd_prepare.prepare)
    app.add_typer(cmd_data.data_app, name="data")
    _command("studies", cmd_run.studies)
    _command("run", cmd_run.run)
    _command("status", cmd_run.status)
    _command("resume", cmd_run.resume)
    _command("report", cmd_report.report)
    _command("export", cmd_run.export)
    _command("methods", cmd_methods.methods)
    _command("merge", cmd_merge.merge)
    _command("cat", cmd_cat.cat)
    _command("evaluate", cmd_prepare.evaluate)


_register()


def _is_list_option(param) -> bool:
    """An option of a list type (typer vendors its own click: no isinstance check)."""
    return param.param_type_name == "option" and bool(getattr(param, "multiple", False))


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def expand_list_options(args: list[str]) -> list[str]:
    """Let every list option take several values after one flag, as argparse's nargs='+'
    does: `--weights 0.4 0.6` becomes `--weights 0.4 --weights 0.6` (click wants the flag
    repeated). Values run to the next option or `--`; negative numbers are values."""
    group = typer.main.get_command(app)
    name = next((a for a in args if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name)
    if command is None:
        return list(args)
    multiple = {flag for p in command.params if _is_list_option(p) for flag in p.opts}
    out: list[str] = []
    current, has_value = None, False
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        if arg.startswith("-") and not _is_number(arg):
            current, has_value = (arg if arg in multiple else None), False
        elif current is not None:
            if has_value:
                out.append(current)
            has_value = True
        out.append(arg)
    return out


def main() -> None:
    # A closed pipe (`soups methods | head`) ends the command quietly with status 1: click's
    # own handling of EPIPE. A study's console survives one (study.console).
    app(args=expand_list_options(sys.argv[1:]), prog_name="soups")


if __name__ == "__main__":
    main()
