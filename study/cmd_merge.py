"""`soups merge`: merge PEFT LoRA adapter folders into one PEFT adapter folder.

    soups merge --method METHOD --out OUT_DIR ADAPTER_DIR [ADAPTER_DIR ...]
                [--weights W ...] [--density D] [--rank R] [--majority-sign total|frequency]
                [--merge task_arithmetic|ties|dare_ties] [--seed S]
    soups merge --list
    soups merge --method cat_learned --out OUT_DIR ADAPTER_DIR ... [--model DIR] [--data DIR ...]
                [--granularity ...] [--normalisation ...] [--init ...] [--fraction F] ...

    soups merge --method lorahub --out OUT_DIR ADAPTER_DIR ... [--model DIR] [--data DIR ...]
                [--budget N] [--examples N] [--bounds LOW HIGH] [--composition lorahub|exact]
                [--l1 X] [--seed S]

`cat_learned` trains CAT weights on a skill mix (the same as `soups cat`); `lorahub` searches
one weight per LoRA on few-shot rows of the skill mix (study/cmd_lorahub.py); every other
method is a registered merge of `soups.compose.merge` and needs no base model.
"""

from __future__ import annotations

from pathlib import Path

import typer

from study.cmd_cat import run_cat, with_cat_options
from study.cmd_lorahub import HELP as LORAHUB_HELP
from study.cmd_lorahub import run_lorahub

CAT_LEARNED = "cat_learned"
LORAHUB = "lorahub"
FLAGS = {"majority_sign_method": "--majority-sign"}  # method parameter -> its CLI flag


def _print_methods() -> None:
    """The kinds of the candidate registry (`trainables/candidates.py`) this command builds:
    every merge method with its flags, then the learned ones (`soups methods` lists every
    kind a study may search, with the names a search space gives)."""
    from trainables.candidates import CANDIDATES, describe  # lazy: numpy, pydantic

    for kind in CANDIDATES.kinds():
        if kind.family == "merge":
            typer.echo("\n".join(describe(kind, flag=lambda n: FLAGS.get(n, "--" + n))))
    for name, options in ((CAT_LEARNED, "options as in `soups cat --help`"),
                          (LORAHUB, None)):
        head, *_ = describe(CANDIDATES.get(name))
        typer.echo(head + (f" ({options})" if options else ""))
        typer.echo(f"    {CANDIDATES.get(name).reference}")
    for name, text in LORAHUB_HELP.items():
        typer.echo(f"    --{name}: {text.removeprefix('lorahub: ')}")


@with_cat_options("cat_learned: ", without=("seed",))  # its own --seed serves both
def merge(
    adapters: list[Path] = typer.Argument(None, help="Adapter folders (PEFT LoRA, "
                                          "safetensors), in the order of --weights."),
    method: str = typer.Option(None, help="Merge method; `--list` shows them all."),
    out: Path = typer.Option(None, help="Folder for the merged adapter (PEFT LoRA)."),
    weights: list[float] = typer.Option(None, help="One weight per adapter: --weights 0.4 0.6 "
                                        "(values run to the next option); default depends "
                                        "on the method."),
    density: float = typer.Option(None, help="Fraction of entries kept (TIES, DARE, knots, "
                                  "magnitude pruning)."),
    rank: int = typer.Option(None, help="Output rank (svd, *_svd, knots, lora_lego)."),
    majority_sign: str = typer.Option(None, help="total | frequency (TIES sign election)."),
    row_merge: str = typer.Option(None, "--merge", help="knots: task_arithmetic | ties | "
                                  "dare_ties (merge of the aligned rows)."),
    seed: int = typer.Option(None, help="Seed of the random draws (DARE masks, LoRA-LEGO "
                             "k-means), of CAT training or of LoraHub's examples and search."),
    list_: bool = typer.Option(False, "--list", help="List the methods and their parameters."),
    model: Path = typer.Option(None, help="cat_learned, lorahub: base model folder (default: "
                               "embedded)."),
    data: list[Path] = typer.Option(None, help="cat_learned, lorahub: one dataset per skill "
                                    "(default: the generated math and code skills)."),
    split: str = typer.Option("train", help="cat_learned, lorahub: split of each skill "
                              "dataset."),
    budget: int = typer.Option(None, help=LORAHUB_HELP["budget"]),
    examples: int = typer.Option(None, help=LORAHUB_HELP["examples"]),
    bounds: tuple[float, float] = typer.Option(None, help=LORAHUB_HELP["bounds"]),
    composition: str = typer.Option(None, help=LORAHUB_HELP["composition"]),
    l1: float = typer.Option(None, help=LORAHUB_HELP["l1"]),
    **cat,
) -> None:
    """Merge LoRA adapters with one method (linear, TIES, DARE, cat, svd, ..., a learned CAT,
    or LoraHub's searched weights: --budget evaluations of loss + l1 * mean |w| on --examples
    skill rows, weights in --bounds; --device and --dtype as for cat_learned) into a standard
    PEFT adapter folder."""
    if list_:
        _print_methods()
        return
    if not method or out is None or not adapters:
        raise typer.BadParameter("give --method, --out and at least one adapter folder "
                                 "(or --list)")
    searched = {"budget": budget, "examples": examples, "bounds": bounds,
                "composition": composition, "l1": l1}  # LorahubSettings fields given
    if method != LORAHUB:
        for name, value in searched.items():
            if value is not None:
                raise typer.BadParameter(f"--{name} is an option of method {LORAHUB!r}, not "
                                         f"of {method!r}")
    if method == LORAHUB:
        for flag, value in (("--weights", weights or None), ("--density", density),
                            ("--rank", rank), ("--majority-sign", majority_sign),
                            ("--merge", row_merge)):
            if value is not None:
                raise typer.BadParameter(f"method {LORAHUB!r} takes no {flag} (it searches "
                                         "its weights)")
        run_lorahub(adapters, out, model, data, split, {**searched, "seed": seed},
                    device=cat["device"], dtype=cat["dtype"])
        return
    if method == CAT_LEARNED:
        for flag, value in (("--density", density), ("--rank", rank),
                            ("--majority-sign", majority_sign), ("--merge", row_merge)):
            if value is not None:
                raise typer.BadParameter(f"method {CAT_LEARNED!r} takes no {flag}")
        if weights:
            raise typer.BadParameter(f"method {CAT_LEARNED!r} learns its weights; give starting "
                                     "values with --init V1,V2,...")
        run_cat(adapters, out, model, data, split, seed=seed or 0, **cat)
        return
    from soups.compose.merge import merge_adapters  # lazy: numpy, pydantic

    given = {"weights": weights or None, "density": density, "rank": rank,
             "majority_sign_method": majority_sign, "merge": row_merge, "seed": seed}
    params = {name: value for name, value in given.items() if value is not None}

    def progress(done: int, total: int, module: str) -> None:
        if done == total or done % 50 == 0:
            typer.echo(f"merged {done}/{total} modules", err=True)

    path = merge_adapters(adapters, method, out, progress=progress, **params)
    typer.echo(f"wrote {path} ({method})")
