"""Stage 1: every (skill, rank) LoRA and the DATA-MIX LoRA per rank, fine-tuned with Ray
Train + DeepSpeed through the adapter cache (trained once, reused by every trial and every
later study with the same inputs), each recorded as an MLflow child run of the study. A study
with a seed axis (`search.seeds`) has one such set per seed: the seed is part of the
training settings, so of the cache key, and it shuffles the DATA-MIX rows too."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from soups.data.data_mix import mix_datasets
from soups.home import TRACKING_ENV
from soups.names import (
    CACHE_KEY_TAG,
    EPOCH,
    EVAL_LOSS,
    ROLE_FINETUNE,
    SKILL_TAG,
    TOKENS,
    TRAIN_LOSS,
    WALL_SECONDS,
)
from soups.tasks.task_data import TaskData
from study.layout import adapter_cache_dir, study_dir
from study.spec import StudySpec
from trainables import tracking

DATA_MIX = "data_mix"


def _skill_sets(spec: StudySpec, tasks: dict[str, TaskData], data_mix: bool, seed: int):
    """Training and held-out rows per fine-tune: each skill, and their DATA-MIX (mixed with
    `seed`). The first `finetune.held_out` validation rows of each skill; with 0, no
    held-out set (None)."""
    rows = spec.finetune.held_out
    train = {s: tasks[s].rows("train") for s in spec.skills}
    # A skill whose source has no validation rows (a training set, a raw text) has none.
    held_out = {s: (tasks[s].rows("validation", rows) or None) if rows else None
                for s in spec.skills}
    if data_mix:
        equal = {s: 1.0 for s in spec.skills}
        train[DATA_MIX] = mix_datasets(train, equal, seed=seed)
        held = {s: r for s, r in held_out.items() if r}
        held_out[DATA_MIX] = (mix_datasets(held, {s: 1.0 for s in held},
                                           seed=seed) if held else None)
    return train, held_out


def stage1(spec: StudySpec, model_dir: str, tasks: dict[str, TaskData], ranks: list[int],
           need_data_mix: bool, tracking_uri: str, experiment: str, parent_run_id: str,
           log=print) -> dict[str, dict[str, dict[str, str]]]:
    """The adapter folder of every fine-tune, for each of the study's stage-1 seeds:
    `{str(seed): {str(rank): {skill or "data_mix": folder}}}`."""
    return {str(seed): _one_seed(spec, model_dir, tasks, ranks, need_data_mix, seed,
                                 tracking_uri, experiment, parent_run_id, log)
            for seed in spec.stage1_seeds}


def _one_seed(spec: StudySpec, model_dir: str, tasks: dict[str, TaskData], ranks: list[int],
              need_data_mix: bool, seed: int, tracking_uri: str, experiment: str,
              parent_run_id: str, log) -> dict[str, dict[str, str]]:
    """The adapters fine-tuned with `seed`: `{str(rank): {skill or "data_mix": folder}}`."""
    # lazy: torch
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, cached_finetune

    ft = spec.finetune
    train_sets, eval_sets = _skill_sets(spec, tasks, need_data_mix, seed)
    scaling = ScalingSettings(
        num_workers=ft.num_workers, use_gpu=ft.use_gpu,
        cpus_per_worker=ft.cpus_per_worker or max(1, (os.cpu_count() or 1) // ft.num_workers),
        custom_resources=dict(spec.cluster.worker_resources))
    # The seed in names and lines only on a seed axis: a study without one reads as before.
    shown = f" seed {seed}" if spec.search.seeds is not None else ""
    adapters: dict[str, dict[str, str]] = {}
    for rank in ranks:
        lora, train = ft.lora_settings(rank), replace(ft.train_settings(), seed=seed)
        adapters[str(rank)] = {}
        for name, dataset in train_sets.items():
            log(f"stage 1: LoRA {name} rank {rank}{shown} ({len(dataset)} examples)")
            entry, result = cached_finetune(
                adapter_cache_dir(spec), model_dir, dataset, lora, train, eval_sets[name],
                DeepSpeedSettings(zero_stage=ft.zero_stage), scaling,
                storage_path=study_dir(spec) / "finetunes",
                env={TRACKING_ENV: tracking_uri}, label=f"LoRA {name} r{rank}{shown}",
            )
            adapters[str(rank)][name] = str(entry.path)
            if result is None:
                log(f"  cached: {entry.path}")
            else:
                held = (f", held-out loss {result.eval_loss:.3f}"
                        if result.eval_loss is not None else "")
                if result.best_step is not None:
                    held += (f" (kept step {result.best_step}: held-out loss "
                             f"{result.best_eval_loss:.3f})")
                log(f"  trained {result.steps} steps in {result.wall_seconds:.0f} s: train loss "
                    f"{result.train_loss:.3f}{held}")
            run_name = f"finetune-{name}-r{rank}" + (f"-s{seed}" if shown else "")
            _log_finetune(spec, experiment, parent_run_id, name, rank, entry, result,
                          asdict(lora), asdict(train), run_name)
    return adapters


def _log_finetune(spec, experiment, parent_run_id, name, rank, entry, result, lora, train,
                  run_name):
    """One MLflow child run per fine-tune (found again by its cache key, never duplicated)."""
    key = f"{spec.name}:finetune:{entry.key}"
    if tracking.find_run(experiment, key) is not None:
        return
    with tracking.tracked_run(experiment, key, run_name, ROLE_FINETUNE,
                              spec.name, parent_run_id,
                              tags={SKILL_TAG: name, CACHE_KEY_TAG: entry.key}) as run_id:
        tracking.log_params(run_id, {"skill": name, "rank": rank, "lora": lora,
                                     "train": train, "adapter_dir": str(entry.path),
                                     "cached": result is None})
        history_file = Path(entry.path) / "finetune_history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        for record in history:
            tracking.log_metrics(run_id, {k: v for k, v in record.items()
                                          if k in (TRAIN_LOSS, EVAL_LOSS, EPOCH)},
                                 step=int(record.get("step", 0)))
        if result is not None:
            tracking.log_metrics(run_id, {WALL_SECONDS: result.wall_seconds,
                                          TOKENS: result.tokens})
