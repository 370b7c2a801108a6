"""Export: a trial's adapter as a PEFT folder with a model card; the best one is also copied
to `<study>/best_adapter`, logged to its trial's MLflow run and registered as the study's
champion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from soups.moe.folder import is_moe_folder
from soups.names import TEST, task_metric
from study.layout import BEST_DIR
from study.selection import checkpoint_adapter
from study.spec import SpecError, StudySpec
from trainables import tracking
from trainables.merge_trial import TRIAL_FILE


def export_best(spec: StudySpec, best: dict, root: Path, log) -> None:
    """Copy the best adapter to `<study>/best_adapter`, log it to the best trial's run and
    register it with alias `champion` (the base model alone has nothing to export)."""
    if checkpoint_adapter(best) is None:
        log("the best candidate is the base model without adapter: nothing to export")
        return
    export_adapter(best, root / BEST_DIR, spec)
    if best["run_id"]:
        tracking.log_artifact(best["run_id"], root / BEST_DIR, "adapter")
        name = spec.tracking.register_model or f"{spec.name}-champion"
        version = tracking.register_champion(best["run_id"], "adapter", name)
        log(f"registered {name} version {version} as models:/{name}@champion")


def export_adapter(row: dict, out: Path, spec: StudySpec) -> Path:
    """Write a trial's adapter as a PEFT folder with a model card (a mixture of LoRA experts
    folder is copied as it is, with a card saying how to load it)."""
    adapter = checkpoint_adapter(row)
    if adapter is None:
        raise SpecError(f"trial {row['trial']} is the base model alone: no adapter to export")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    _name_the_base(tmp, spec)
    trial = json.loads((Path(row["checkpoint"]) / TRIAL_FILE).read_text())
    (tmp / "README.md").write_text(_model_card(spec, row, trial))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _name_the_base(folder: Path, spec: StudySpec) -> None:
    """The adapter names its base as the user did (a named GGUF base by its hub id), not by
    the cache folder it was trained from; the embedded model has no other name."""
    from soups.gguf_base import public_name
    from study.spec import EMBEDDED

    config = folder / "adapter_config.json"
    if spec.base_model == EMBEDDED or not config.is_file():
        return
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = public_name(spec.base_model)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _model_card(spec: StudySpec, row: dict, trial: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(trial["metrics"].items())
                        if isinstance(v, float))
    mixture = is_moe_folder(checkpoint_adapter(row))
    what = "A mixture of LoRA experts (not a PEFT adapter)" if mixture else "A LoRA adapter"
    load = ("PEFT alone cannot load it (a router per layer mixes the LoRAs under `experts/` "
            "token by token); load it with `soups.moe.load_moe(this_folder, base_model_dir)`"
            if mixture else "Load it with `PeftModel.from_pretrained(base_model, this_folder)`")
    return (f"# {spec.name}: {row['candidate']}\n\n{what} made by study `{spec.name}` "
            f"(LoRA Soups skill composition).\nSkills: {', '.join(spec.skills)}; target: "
            f"{spec.target_name}; base model: `{spec.base_model}`.\n\n"
            f"{load}.\n\n"
            f"Method `{row['method']}`, rank {row['rank']}, "
            + (f"seed {row['seed']}, " if row.get("seed") is not None else "")
            + "parameters "
            f"`{json.dumps(row['params'], default=str)}`.\n\n"
            f"| metric | value |\n|---|---|\n{metrics}\n"
            + (f"| {task_metric(TEST, spec.target_name)} | {row['test']:.4f} |\n"
               if row.get("test") is not None else ""))
