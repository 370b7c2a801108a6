"""`soups cat`: train CAT weights (LoRA Soups' learnable concatenation) for skill LoRAs on a
small mix of the skill data, and export one standard PEFT LoRA of rank sum(r_i).

    soups cat ADAPTER_DIR... --out DIR [--model DIR] [--data DATASET_DIR ...]
              [--granularity module|layer|global] [--normalisation softmax|none]
              [--init randn|uniform|ones|norm|V1,V2,...] [--fraction F | --count N] ...

The options of a learned CAT (`CAT_DEFAULTS`) are shared with `soups merge --method
cat_learned`; their defaults are the paper's recipe and CAT's official shape
(`soups.compose.cat.settings`), read from there. `run_cat` is the same thing as a plain function.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import typer

from soups.compose.cat.settings import (
    INITS,
    PAPER_CAT_TRAIN,
    PAPER_FRACTION,
    PAPER_HELD_OUT,
    CatSettings,
)
from soups.data.datasets import DataSettings, build_task_datasets, load_task_dataset
from soups.home import cache_dir

_SHAPE = CatSettings()
# Every option of a learned CAT, with its default and its help.
CAT_DEFAULTS: dict[str, object] = {
    "granularity": _SHAPE.granularity, "normalisation": _SHAPE.normalisation,
    "init": _SHAPE.init, "seed": _SHAPE.seed, "fraction": PAPER_FRACTION, "count": 0,
    "held_out": PAPER_HELD_OUT, "lr": PAPER_CAT_TRAIN.learning_rate,
    "epochs": PAPER_CAT_TRAIN.epochs, "max_steps": PAPER_CAT_TRAIN.max_steps or 0,
    "batch_size": PAPER_CAT_TRAIN.micro_batch_size,
    "grad_accumulation": PAPER_CAT_TRAIN.grad_accumulation,
    "max_length": PAPER_CAT_TRAIN.max_length, "warmup": PAPER_CAT_TRAIN.warmup_steps,
    "eval_every": PAPER_CAT_TRAIN.eval_every, "device": None, "dtype": "auto",
}
_HELP = {
    "granularity": "module | layer | global.",
    "normalisation": "softmax (official) | none.",
    "init": "randn (official) | uniform | ones | norm, or comma-separated starting weights "
            "(one per adapter).",
    "seed": "Seed of the init, the mix and the batch order.",
    "fraction": "Share of each skill's rows in the mix.",
    "count": "Rows in the mix in all (overrides --fraction; 0 = use --fraction).",
    "held_out": "Held-out rows for best-checkpoint selection.",
    "lr": "AdamW learning rate.",
    "epochs": "Passes over the mix.",
    "max_steps": "Stop after this many steps (0 = use --epochs).",
    "batch_size": "Micro-batch size.",
    "grad_accumulation": "Micro-batches per optimizer step.",
    "max_length": "Token limit per example.",
    "warmup": "Linear warm-up steps.",
    "eval_every": "Steps between held-out evaluations.",
    "device": "cpu, cuda, cuda:1 ... (default: cuda if present).",
    "dtype": "auto (bf16 on a GPU that has it) | float32 | bfloat16.",
}


def with_cat_options(prefix: str = "", without: tuple[str, ...] = ()):
    """Give a command the options of a learned CAT (`CAT_DEFAULTS`, less `without`) as
    keyword parameters, taken by its `**options`: declared once, for `soups cat` and `soups
    merge`. Typer reads the command's signature, which this extends."""

    def decorate(command):
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                   default=typer.Option(default, help=prefix + _HELP[name]),
                                   annotation=str if default is None else type(default))
                 for name, default in CAT_DEFAULTS.items() if name not in without]
        command.__signature__ = signature.replace(parameters=kept + added)
        return command

    return decorate


def cat_settings(granularity: str, normalisation: str, init: str, seed: int):
    """CatSettings from CLI strings; `init` is a named init or comma-separated values."""
    values = None
    if init not in INITS or init == "values":
        try:
            values = tuple(float(v) for v in init.split(","))
        except ValueError:
            raise typer.BadParameter(
                f"{init!r} is neither one of {[i for i in INITS if i != 'values']} nor "
                "comma-separated numbers", param_hint="--init") from None
    try:
        return CatSettings(granularity=granularity, normalisation=normalisation,
                           init="values" if values else init, init_values=values, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def model_and_skills(model: Path | None, data: list[Path] | None, split: str = "train"
                     ) -> tuple[Path, list]:
    """The base model folder and each skill dataset's `split` rows; default model and data:
    the embedded base model and the generated math and code skills (built once, cached)."""
    if model is None:
        from soups.training.base_model import BaseModelSettings, build_base_model  # lazy: torch

        model = build_base_model(cache_dir("base_models"), BaseModelSettings())
    if not data:
        root = build_task_datasets(cache_dir("datasets"), DataSettings())
        data = [root / "math", root / "code"]
    return model, [load_task_dataset(path, split) for path in data]


def run_cat(adapters: list[Path], out: Path, model: Path | None = None,
            data: list[Path] | None = None, split: str = "train", **options):
    """Train and export a CAT; `options` are names of `CAT_DEFAULTS` (the paper's recipe
    where not given); default model and data: the embedded base model and the generated
    math and code skills. Returns the `CatTrainResult`."""
    from soups.compose.cat import learn_cat  # lazy: torch

    unknown = sorted(set(options) - set(CAT_DEFAULTS))
    if unknown:
        raise TypeError(f"run_cat takes no option {unknown[0]!r}")
    o = {**CAT_DEFAULTS, **options}
    if not adapters:
        raise typer.BadParameter("give at least one adapter folder", param_hint="ADAPTERS")
    settings = cat_settings(o["granularity"], o["normalisation"], o["init"], o["seed"])
    model, skills = model_and_skills(model, data, split)
    train = replace(PAPER_CAT_TRAIN, learning_rate=o["lr"], epochs=o["epochs"],
                    max_steps=o["max_steps"] or None, micro_batch_size=o["batch_size"],
                    grad_accumulation=o["grad_accumulation"], max_length=o["max_length"],
                    warmup_steps=o["warmup"], eval_every=o["eval_every"], seed=o["seed"])
    result = learn_cat(
        [str(a) for a in adapters], model, skills, out, settings, train,
        fraction=None if o["count"] else o["fraction"], count=o["count"] or None,
        held_out=o["held_out"], device=o["device"], dtype=o["dtype"], log=typer.echo,
    )
    typer.echo(f"exported {out} (PEFT LoRA, rank sum(r_i) per module; weights in "
               "cat_weights.json)")
    return result


@with_cat_options()
def cat(
    adapters: list[Path] = typer.Argument(..., help="Skill LoRA adapter folders (PEFT, "
                                          "safetensors)."),
    out: Path = typer.Option(..., help="Folder for the exported adapter."),
    model: Path = typer.Option(None, help="Base model folder (default: the embedded one)."),
    data: list[Path] = typer.Option(None, help="Skill datasets (save_to_disk folders or data "
                                    "files with prompt/completion), one per skill; default: "
                                    "the generated math and code skills."),
    split: str = typer.Option("train", help="Split of each skill dataset to draw from."),
    **options,
) -> None:
    """Train CAT weights (one per LoRA per module) on a small skill mix and export the exact
    concatenation as one PEFT LoRA."""
    run_cat(adapters, out, model, data, split, **options)
