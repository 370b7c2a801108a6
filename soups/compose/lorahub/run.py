"""One LoraHub search end to end: open the adapters, load the base model once, draw the
few-shot examples from the skill mix, search the weights, write the composed adapter as a
standard PEFT LoRA folder with `lorahub.json` (weights, objective, history) beside it.

The examples come from the skills' training rows only (`skill_mix`): never from a target
task's validation or test split, which a study keeps for selection and the final score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from soups.adapters import INHERITED, LoraAdapter, check_fits, save_adapter
from soups.compose.cat.mix import skill_mix
from soups.compose.lorahub.compose import Factors, check_composable, compose_all
from soups.compose.lorahub.model import ComposedLoras
from soups.compose.lorahub.search import LorahubResult, OnEvaluation, search_weights
from soups.compose.lorahub.settings import LorahubError, LorahubSettings
from soups.evaluation.evaluate import json_safe, mean_completion_loss, resolve_device
from soups.training.base_model import load_pretrained

SUMMARY_JSON = "lorahub.json"
REFERENCE = "https://arxiv.org/abs/2307.13269"


def read_factors(adapters: Sequence[LoraAdapter], names: Sequence[str],
                 device: torch.device | str = "cpu") -> Factors:
    """Every module's float32 factors in each adapter (None where it lacks the module)."""
    return {n: [_to(a.module(n), device) if n in a.module_names else None for a in adapters]
            for n in names}


def _to(module, device):
    return replace(module, A=module.A.to(device), B=module.B.to(device))


def lorahub_merge(
    adapter_dirs: Sequence[str | Path],
    model_dir: str | Path,
    skill_rows: Sequence[Sequence[dict]],
    out_dir: str | Path,
    settings: LorahubSettings = LorahubSettings(),
    on_evaluation: OnEvaluation | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[str], None] | None = print,
) -> LorahubResult:
    """Search one weight per adapter with LoraHub and write the composed adapter to `out_dir`.

    `skill_rows`: each skill's training rows ({"prompt", "completion"}); the search scores
    `settings.examples` of them, split evenly over the skills and drawn with `settings.seed`.
    `on_evaluation(record)` is called after each of the `settings.budget` evaluations
    (`search_weights`). Returns the result with `adapter_dir` set."""
    if not adapter_dirs:
        raise LorahubError("LoraHub: give at least one adapter folder")
    if not skill_rows:
        raise LorahubError("LoraHub: no skill datasets to draw the examples from")
    if settings.examples < len(skill_rows):
        raise LorahubError(f"LoraHub examples ({settings.examples}) must be at least the "
                           f"number of skills ({len(skill_rows)})")
    adapters = [LoraAdapter.open(d) for d in adapter_dirs]
    names = check_composable(adapters, settings.composition)  # before loading a model
    rows, _ = skill_mix(skill_rows, fraction=None, count=settings.examples, held_out=0,
                        seed=settings.seed)
    where, precision = resolve_device(device, dtype)
    tokenizer, model = load_pretrained(model_dir, precision)
    model = model.to(where).eval()
    for adapter in adapters:
        check_fits(adapter.path, model)
    factors = read_factors(adapters, names, where)
    composed = ComposedLoras(model, factors, settings.composition,
                             settings.initial_weights(len(adapters)))
    if log is not None:
        log(f"LoraHub: {len(adapters)} LoRAs, {len(names)} modules, composition "
            f"{settings.composition!r}, {len(rows)} examples, budget {settings.budget} on "
            f"{where} ({precision})")

    def loss_of(weights: list[float]) -> float:
        composed.install(weights)
        loss = mean_completion_loss(model, tokenizer, rows, settings.batch_size,
                                    settings.max_length)
        if math.isnan(loss):
            raise LorahubError(f"LoraHub: none of the {len(rows)} examples keeps a completion "
                               f"token within max_length={settings.max_length}")
        return loss

    result = search_weights(loss_of, len(adapters), settings, on_evaluation)
    out = write_lorahub(adapters, out_dir, result, settings, len(rows))
    if log is not None:
        log(f"LoraHub: best objective {result.objective:.4f} (loss {result.loss:.4f}) at "
            f"evaluation {result.step}/{result.evaluations}, weights "
            f"{[round(w, 4) for w in result.weights]}; wrote {out}")
    return replace(result, adapter_dir=out)


def write_lorahub(adapters: Sequence[LoraAdapter], out_dir: str | Path, result: LorahubResult,
                  settings: LorahubSettings, examples: int) -> Path:
    """The composition under `result.weights` as a PEFT LoRA folder (factors re-read in
    float32), its provenance, and `lorahub.json` with the search's history."""
    names = check_composable(adapters, settings.composition)
    modules = compose_all(read_factors(adapters, names), result.weights, settings.composition)
    record = {"method": "lorahub", "reference": REFERENCE,
              "adapters": [str(a.path) for a in adapters], "settings": asdict(settings),
              "examples": examples, **result.summary()}
    record.pop("adapter_dir")
    base_config = {key: adapters[0].config.get(key) for key in INHERITED}
    out = save_adapter(out_dir, modules, base_config, provenance={"merge": record})
    summary = json_safe({**record, "history": result.history})  # a failed evaluation's inf
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    return out
