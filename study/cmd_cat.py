"""`soups cat`: train CAT weights (LoRA Soups' learnable concatenation) for skill LoRAs on a
small mix of the skill data, and export one standard PEFT LoRA of rank sum(r_i).

    soups cat ADAPTER_DIR... --out DIR [--model DIR] [--data DATASET_DIR ...]
              [--granularity module|layer|global] [--normalisation softmax|none]
              [--init randn|uniform|ones|norm|V1,V2,...] [--fraction F | --count N] ...

`run_cat` is the same thing as a plain function (for `soups merge --method cat_learned`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def cat_settings(granularity: str, normalisation: str, init: str, seed: int):
    """CatSettings from CLI strings; `init` is a named init or comma-separated values."""
    from soups.cat.settings import INITS, CatSettings

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


def run_cat(
    adapters: list[Path],
    out: Path,
    model: Path | None = None,
    data: list[Path] | None = None,
    split: str = "train",
    granularity: str = "module",
    normalisation: str = "softmax",
    init: str = "randn",
    seed: int = 0,
    fraction: float = 0.05,
    count: int = 0,
    held_out: int = 120,
    lr: float = 1e-4,
    epochs: float = 1.0,
    max_steps: int = 0,
    batch_size: int = 6,
    grad_accumulation: int = 1,
    max_length: int = 256,
    warmup: int = 100,
    eval_every: int = 100,
    device: str | None = None,
    dtype: str = "auto",
):
    """Train and export a CAT; defaults are the paper's recipe, the embedded base model and
    the generated math and code skills. Returns the `CatTrainResult`."""
    from dataclasses import replace

    from soups.cat import PAPER_CAT_TRAIN, learn_cat
    from soups.data import load_task_dataset

    if not adapters:
        raise typer.BadParameter("give at least one adapter folder", param_hint="ADAPTERS")
    settings = cat_settings(granularity, normalisation, init, seed)
    if model is None:
        from soups.base_model import BaseModelSettings, build_base_model
        from soups.home import cache_dir

        model = build_base_model(cache_dir("base_models"), BaseModelSettings())
    if not data:
        from soups.data import DataSettings, build_task_datasets
        from soups.home import cache_dir

        root = build_task_datasets(cache_dir("datasets"), DataSettings())
        data = [root / "math", root / "code"]
    skills = [load_task_dataset(path, split) for path in data]
    train = replace(PAPER_CAT_TRAIN, learning_rate=lr, epochs=epochs, max_steps=max_steps or None,
                    micro_batch_size=batch_size, grad_accumulation=grad_accumulation,
                    max_length=max_length, warmup_steps=warmup, eval_every=eval_every, seed=seed)
    result = learn_cat(
        [str(a) for a in adapters], model, skills, out, settings, train,
        fraction=None if count else fraction, count=count or None, held_out=held_out,
        device=device, dtype=dtype, log=typer.echo,
    )
    typer.echo(f"exported {out} (PEFT LoRA, rank sum(r_i) per module; weights in "
               "cat_weights.json)")
    return result


def cat(
    adapters: list[Path] = typer.Argument(..., help="Skill LoRA adapter folders (PEFT, "
                                          "safetensors)."),
    out: Path = typer.Option(..., help="Folder for the exported adapter."),
    model: Path = typer.Option(None, help="Base model folder (default: the embedded one)."),
    data: list[Path] = typer.Option(None, help="Skill datasets (save_to_disk folders or data "
                                    "files with prompt/completion), one per skill; default: "
                                    "the generated math and code skills."),
    split: str = typer.Option("train", help="Split of each skill dataset to draw from."),
    granularity: str = typer.Option("module", help="module | layer | global."),
    normalisation: str = typer.Option("softmax", help="softmax (official) | none."),
    init: str = typer.Option("randn", help="randn (official) | uniform | ones | norm, or "
                             "comma-separated starting weights (one per adapter)."),
    seed: int = typer.Option(0, help="Seed of the init, the mix and the batch order."),
    fraction: float = typer.Option(0.05, help="Share of each skill's rows in the mix."),
    count: int = typer.Option(0, help="Rows in the mix in all (overrides --fraction; 0 = "
                              "use --fraction)."),
    held_out: int = typer.Option(120, help="Held-out rows for best-checkpoint selection."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    epochs: float = typer.Option(1.0, help="Passes over the mix."),
    max_steps: int = typer.Option(0, help="Stop after this many steps (0 = use --epochs)."),
    batch_size: int = typer.Option(6, help="Micro-batch size."),
    grad_accumulation: int = typer.Option(1, help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(256, help="Token limit per example."),
    warmup: int = typer.Option(100, help="Linear warm-up steps."),
    eval_every: int = typer.Option(100, help="Steps between held-out evaluations."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a GPU that has it) | float32 | "
                              "bfloat16."),
) -> None:
    """Train CAT weights (one per LoRA per module) on a small skill mix and export the exact
    concatenation as one PEFT LoRA."""
    run_cat(adapters, out, model, data, split, granularity, normalisation, init, seed,
            fraction, count, held_out, lr, epochs, max_steps, batch_size, grad_accumulation,
            max_length, warmup, eval_every, device, dtype)
