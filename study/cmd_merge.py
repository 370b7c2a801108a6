"""`soups merge`: merge PEFT LoRA adapter folders into one PEFT adapter folder.

    soups merge --method METHOD --out OUT_DIR ADAPTER_DIR [ADAPTER_DIR ...]
                [--weights W ...] [--density D] [--rank R] [--majority-sign total|frequency]
                [--merge task_arithmetic|ties|dare_ties] [--seed S]
    soups merge --list
    soups merge --method cat_learned --out OUT_DIR ADAPTER_DIR ... [--model DIR] [--data DIR ...]
                [--granularity ...] [--normalisation ...] [--init ...] [--fraction F] ...

`cat_learned` trains CAT weights on a skill mix (the same as `soups cat`); every other method
is a registered merge of `soups.merge` and needs no base model.
"""

from __future__ import annotations

from pathlib import Path

import typer

from study.cmd_cat import with_cat_options

CAT_LEARNED = "cat_learned"
FLAGS = {"majority_sign_method": "--majority-sign"}  # method parameter -> its CLI flag


def _print_methods() -> None:
    from soups.merge.methods import REGISTRY  # not soups.merge: the engine needs torch

    for method in (REGISTRY.get(name) for name in REGISTRY.names()):
        typer.echo(f"{method.name}  ({method.space.value} space)  {method.summary}")
        typer.echo(f"    {method.reference}")
        for name, parameter in method.parameters.items():
            if name == "weights":
                default = "default " + ("1 each" if method.default_weights == "ones"
                                        else "1/k each")
            else:
                default = "required" if parameter.required else f"default {parameter.default!r}"
            typer.echo(f"    {FLAGS.get(name, '--' + name)}: {parameter.description} ({default})")
    typer.echo(f"{CAT_LEARNED}  (learned)  CAT: learn one weight per LoRA per module on a skill "
               "mix, export the exact concatenation (options as in `soups cat --help`)")


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
                             "k-means) or of CAT training."),
    list_: bool = typer.Option(False, "--list", help="List the methods and their parameters."),
    model: Path = typer.Option(None, help="cat_learned: base model folder (default: embedded)."),
    data: list[Path] = typer.Option(None, help="cat_learned: one dataset per skill."),
    split: str = typer.Option("train", help="cat_learned: split of each skill dataset."),
    **cat,
) -> None:
    """Merge LoRA adapters with one method (linear, TIES, DARE, cat, svd, ..., or a learned
    CAT) into a standard PEFT adapter folder."""
    if list_:
        _print_methods()
        return
    if not method or out is None or not adapters:
        raise typer.BadParameter("give --method, --out and at least one adapter folder "
                                 "(or --list)")
    if method == CAT_LEARNED:
        from study.cmd_cat import run_cat

        for flag, value in (("--density", density), ("--rank", rank),
                            ("--majority-sign", majority_sign), ("--merge", row_merge)):
            if value is not None:
                raise typer.BadParameter(f"method {CAT_LEARNED!r} takes no {flag}")
        if weights:
            raise typer.BadParameter(f"method {CAT_LEARNED!r} learns its weights; give starting "
                                     "values with --init V1,V2,...")
        run_cat(adapters, out, model, data, split, seed=seed or 0, **cat)
        return
    from soups.merge import merge_adapters

    given = {"weights": weights or None, "density": density, "rank": rank,
             "majority_sign_method": majority_sign, "merge": row_merge, "seed": seed}
    params = {name: value for name, value in given.items() if value is not None}

    def progress(done: int, total: int, module: str) -> None:
        if done == total or done % 50 == 0:
            typer.echo(f"merged {done}/{total} modules", err=True)

    path = merge_adapters(adapters, method, out, progress=progress, **params)
    typer.echo(f"wrote {path} ({method})")
