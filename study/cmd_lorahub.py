"""`soups merge --method lorahub`: search one weight per LoRA gradient-free (LoraHub, Huang et
al. 2023, https://arxiv.org/abs/2307.13269) on few-shot rows of the skill mix, and write the
composed adapter as one PEFT LoRA.

    soups merge --method lorahub --out OUT_DIR ADAPTER_DIR ... [--model DIR] [--data DIR ...]
                [--budget N] [--examples N] [--bounds LOW HIGH] [--composition lorahub|exact]
                [--l1 X] [--seed S] [--device D] [--dtype T]

The defaults are LoraHub's (`soups.compose.lorahub.settings`): 40 evaluations, weights in
[-1.5, 1.5] starting at 0, objective loss + 0.05 * mean |w|, factors summed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from soups.adapters import LoraAdapter
from soups.compose.lorahub.settings import (
    BOUNDS,
    BUDGET,
    EXAMPLES,
    L1,
    LorahubError,
    LorahubSettings,
)
from study.cmd_cat import model_and_skills

# Each LoraHub option of `soups merge`: its help (the defaults are the settings').
HELP = {
    "budget": f"lorahub: objective evaluations of the search (default {BUDGET}).",
    "examples": f"lorahub: few-shot rows drawn from the skill mix (default {EXAMPLES}).",
    "bounds": f"lorahub: LOW HIGH box of every weight (default {BOUNDS[0]} {BOUNDS[1]}).",
    "composition": "lorahub: lorahub = sum w_i A_i, sum w_i B_i (LoraHub's code, equal ranks) "
                   "| exact = sum w_i s_i B_i A_i, rank sum r_i (default lorahub).",
    "l1": f"lorahub: weight of the regulariser mean |w| (default {L1}).",
}


def run_lorahub(adapters: list[Path], out: Path, model: Path | None, data: list[Path] | None,
                split: str, options: dict, device: str | None = None, dtype: str = "auto"):
    """Search and write a LoraHub composition; `options` are `LorahubSettings` fields given
    on the command line (None: not given, the default). Returns the `LorahubResult`."""
    from soups.compose.lorahub import lorahub_merge  # lazy: numpy, pydantic, torch

    given = {name: value for name, value in options.items() if value is not None}
    if "bounds" in given:
        given["bounds"] = tuple(given["bounds"])
    settings = LorahubSettings(**given)  # bad values fail here, before anything loads
    if split == "test":
        raise LorahubError("LoraHub draws its examples from the skills' training rows; "
                           "--split test would search on a test split")
    from soups.compose.lorahub.compose import check_composable  # lazy: numpy, pydantic

    # Folders and ranks are checked before the default model and data are built.
    check_composable([LoraAdapter.open(a) for a in adapters], settings.composition)
    model, skills = model_and_skills(model, data, split)

    def progress(record: dict) -> None:
        typer.echo(f"evaluation {record['step']}/{settings.budget}: objective "
                   f"{record['regularised_loss']:.4f} (loss {record['loss']:.4f}), best "
                   f"{record['best_regularised_loss']:.4f}", err=True)

    result = lorahub_merge([str(a) for a in adapters], model, skills, out, settings,
                           on_evaluation=progress, device=device or "auto", dtype=dtype,
                           log=typer.echo)
    typer.echo(f"wrote {result.adapter_dir} (lorahub, weights "
               f"{[round(w, 4) for w in result.weights]}; search in lorahub.json)")
    return result
