"""Export: a trial's adapter as a PEFT folder with a model card; the best one is also copied
to `<study>/best_adapter`, logged to its trial's MLflow run and registered as the study's
champion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from soups.compose.moe.folder import is_moe_folder
from soups.names import OBJECTIVE, TEST, VALIDATION, candidate_label, task_metric
from soups.training.gguf_base import public_name
from study.layout import BEST_DIR, PROMPTS_FILE, study_dir
from study.selection import checkpoint_adapter
from study.spec import EMBEDDED, SpecError, StudySpec
from trainables import tracking
from trainables.trial_context import TRIAL_FILE


def export_best(spec: StudySpec, best: dict, root: Path, model_dir, log) -> None:
    """Copy the best adapter to `<study>/best_adapter`, log it to the best trial's run and
    register it as a runnable MLflow model with alias `champion` (the base model alone has
    nothing to export)."""
    if checkpoint_adapter(best) is None:
        log("the best candidate is the base model without adapter: nothing to export")
        return
    export_adapter(best, root / BEST_DIR, spec)
    if best["run_id"]:
        tracking.log_artifact(best["run_id"], root / BEST_DIR, "adapter")
        name = spec.tracking.register_model or f"{spec.name}-champion"
        version = tracking.register_champion(
            best["run_id"], root / BEST_DIR, champion_config(spec, model_dir), name,
            champion_description(spec, best), champion_tags(spec, best))
        log(f"registered {name} version {version} as models:/{name}@champion")


def champion_config(spec: StudySpec, model_dir) -> dict:
    """What the registered model needs to run (`trainables/champion_model.py`)."""
    fmt = _prompt_format(spec) or {}
    return {"base_model": str(model_dir), "base_model_name": base_name(spec),
            "chat_template": bool(fmt.get("chat_template")),
            "max_new_tokens": spec.evaluation.max_new_tokens}


def champion_tags(spec: StudySpec, best: dict) -> dict[str, str]:
    tags = {"study": spec.name, "method": best["method"], "rank": str(best["rank"]),
            "candidate": candidate_label(best["method"], best["rank"], best["params"]),
            OBJECTIVE: f"{best[OBJECTIVE]:.4f}", "target": spec.target_name,
            "base_model": base_name(spec)}
    if best.get("test") is not None:
        tags["test_accuracy"] = f"{best['test']:.4f}"
    return tags


def champion_description(spec: StudySpec, best: dict) -> str:
    label = candidate_label(best["method"], best["rank"], best["params"])
    test = f", test {best['test']:.3f}" if best.get("test") is not None else ""
    return (f"Champion of study {spec.name}: {label}, composing {', '.join(spec.skills)} for "
            f"{spec.target_name} on {base_name(spec)} (validation {best[OBJECTIVE]:.3f}{test}). "
            f"mlflow.pyfunc.load_model(...).predict([prompt]) answers prompts; the plain "
            f"PEFT adapter is the run's `adapter` artifact.")


def record_prompt_format(tasks: dict, root: Path) -> None:
    """How each task's prompts were written (`<study>/prompt_format.json`): through the
    base's chat template or plain, and one validation prompt as the model saw it. The model
    card states it: an adapter answers well only when prompted the way it was trained."""
    formats = {}
    for name, data in tasks.items():
        rows = data.rows("validation", 1) or data.rows("train", 1)
        chat = data.uses_chat()
        formats[name] = {"chat_template": chat,
                         "example_prompt": data.eval_prompts(rows)[0] if rows else None}
    root.mkdir(parents=True, exist_ok=True)
    (root / PROMPTS_FILE).write_text(json.dumps(formats, indent=2))


def export_adapter(row: dict, out: Path, spec: StudySpec, force: bool = True) -> Path:
    """Write a trial's adapter as a PEFT folder with a model card (a mixture of LoRA experts
    folder is copied as it is, with a card saying how to load it). A folder with anything in
    it is replaced only with `force`."""
    adapter = checkpoint_adapter(row)
    if adapter is None:
        raise SpecError(f"trial {row['trial']} is the base model alone: no adapter to export")
    out = Path(out)
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out} is not an empty folder: pass --force to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    _name_the_base(tmp, spec)
    trial = json.loads((Path(row["checkpoint"]) / TRIAL_FILE).read_text())
    (tmp / "README.md").write_text(model_card(spec, row, trial))
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    return out


def _name_the_base(folder: Path, spec: StudySpec) -> None:
    """The adapter names its base as the user did (a named GGUF base by its hub id, the
    embedded model as `embedded`), never by the cache folder it was trained from."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = base_name(spec)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def base_name(spec: StudySpec) -> str:
    """The base as the exported adapter names it (`soups.training.gguf_base.public_name`)."""
    return public_name(spec.base_model)


def _prompt_format(spec: StudySpec) -> dict | None:
    path = study_dir(spec) / PROMPTS_FILE
    return json.loads(path.read_text()).get(spec.target_name) if path.is_file() else None


def card_metadata(spec: StudySpec, row: dict, trial: dict) -> dict:
    """The Hugging Face model card header: base model, library, tags and a `model-index`
    with the target's validation (and, when evaluated, test) accuracy."""
    metrics = [{"type": "accuracy", "name": f"{spec.target_name} validation accuracy",
                "value": round(float(trial["metrics"][OBJECTIVE]), 4)}] \
        if trial["metrics"].get(OBJECTIVE) is not None else []
    if row.get("test") is not None:
        metrics.append({"type": "accuracy", "name": f"{spec.target_name} test accuracy",
                        "value": round(float(row["test"]), 4)})
    label = candidate_label(row["method"], row["rank"], row["params"])
    header = {
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "lora-soups", "skill-composition", f"method:{row['method']}",
                 *(f"skill:{s}" for s in spec.skills)],
        "model-index": [{"name": f"{spec.name}: {label}",
                         "results": [{"task": {"type": "text-generation",
                                               "name": spec.target_name},
                                      "dataset": {"type": spec.target_name,
                                                  "name": spec.target_name},
                                      "metrics": metrics}]}],
    }
    if spec.base_model != EMBEDDED:  # the embedded model is built locally, not on a hub
        header = {"base_model": base_name(spec), **header}
    return header


def _prompt_text(spec: StudySpec) -> str:
    fmt = _prompt_format(spec)
    if fmt is None:
        return ""
    how = ("through the base model's chat template (`tokenizer.apply_chat_template` with the "
           "question as the user's turn and `add_generation_prompt=True`)"
           if fmt["chat_template"] else "as plain text, without a chat template")
    text = f"## Prompt format\n\nTrained and evaluated with prompts written {how}."
    if fmt.get("example_prompt"):
        text += (f" A {spec.target_name} prompt exactly as the model saw it:\n\n"
                 f"```text\n{fmt['example_prompt']}\n```")
    return text + "\n\n"


def model_card(spec: StudySpec, row: dict, trial: dict) -> str:
    """The exported folder's README.md: the Hugging Face metadata header, what the adapter
    is and how to load it, the prompt format it expects, and its scores."""
    header = yaml.safe_dump(card_metadata(spec, row, trial), sort_keys=False)
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(trial["metrics"].items())
                        if isinstance(v, float) and k.startswith((VALIDATION, TEST)))
    mixture = is_moe_folder(checkpoint_adapter(row))
    what = "A mixture of LoRA experts (not a PEFT adapter)" if mixture else "A LoRA adapter"
    load = ("PEFT alone cannot load it (a router per layer mixes the LoRAs under `experts/` "
            "token by token); load it with "
            "`soups.compose.moe.load_moe(this_folder, base_model_dir)`"
            if mixture else "Load it with `PeftModel.from_pretrained(base_model, this_folder)`")
    base = (f"`{base_name(spec)}`" if spec.base_model != EMBEDDED else
            "the project's embedded model (`soups prepare --base embedded` builds it)")
    label = candidate_label(row["method"], row["rank"], row["params"], row.get("seed"))
    test = (f"| {task_metric(TEST, spec.target_name)} | {row['test']:.4f} |\n"
            if row.get("test") is not None and task_metric(TEST, spec.target_name)
            not in trial["metrics"] else "")
    return (f"---\n{header}---\n\n# {spec.name}: {label}\n\n{what} made by study "
            f"`{spec.name}` (LoRA Soups skill composition).\nSkills: "
            f"{', '.join(spec.skills)}; target: {spec.target_name}; base model: {base}.\n\n"
            f"{load}.\n\n"
            f"{_prompt_text(spec)}"
            f"## Candidate\n\nMethod `{row['method']}`, rank {row['rank']}, "
            + (f"seed {row['seed']}, " if row.get("seed") is not None else "")
            + f"parameters `{json.dumps(row['params'], default=str)}`.\n\n"
            f"## Results\n\n| metric | value |\n|---|---|\n{metrics}\n{test}")
