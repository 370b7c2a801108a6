"""Fine-tune one LoRA on one dataset with Ray Train V2 (`TorchTrainer`) + DeepSpeed, and the
cached entry point a study uses (`cached_finetune`: each adapter is trained once).

    result = finetune_adapter(model_dir, dataset, "out/math", LoraSettings(rank=16),
                              TrainSettings(epochs=3), eval_dataset=validation,
                              deepspeed=DeepSpeedSettings(zero_stage=2),
                              scaling=ScalingSettings(num_workers=2), storage_path="runs")

The driver tokenises once and puts the examples in Ray's object store; the workers
(`trainables.finetune_worker`) train, report train / held-out loss with a checkpoint each
epoch (or every `eval_every` steps), and resume from the last checkpoint when a worker dies
(`FailureConfig(max_failures)`). The final checkpoint holds the adapter (with `keep_best`,
the reported step's with the lowest held-out loss), which the driver copies to `out_dir`.
A run is named `storage_path/name`; reusing a name resumes that run (Ray Train V2
semantics), which `cached_finetune` uses on purpose: a driver that dies and asks again
continues the same training.

DATA-MIX (the paper's baseline): `finetune_adapter(model_dir, soups.data.data_mix.mix_datasets(
{"math": ..., "code": ...}, {"math": 1.0, "code": 1.0}), ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from soups.home import soups_home
from soups.training.adapter_cache import (
    AdapterCache,
    CacheEntry,
    cache_key,
    fingerprint_files,
    fingerprint_rows,
)
from soups.training.base_model import model_ref
from soups.training.text_batches import encode_dataset, pad_token_id
from soups.training.train_settings import LoraSettings, TrainSettings
from trainables.finetune_settings import DeepSpeedSettings, ScalingSettings
from trainables.finetune_worker import (
    ADAPTER_DIR,
    STATE_FILE,
    LoopState,
    StepHook,
    WorkerSpec,
    train_worker,
    worker_env,
)

# Bump when a change alters the adapter trained from the same inputs (data order, loss,
# optimiser, schedule, initialisation): cached adapters of older versions are not reused.
TRAINER_VERSION = 1
# How often Ray Train's controller polls its workers (seconds; Ray's default is 2).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

__all__ = ["DeepSpeedSettings", "FinetuneResult", "ScalingSettings", "cached_finetune",
           "finetune_adapter", "finetune_key_inputs"]


@dataclass
class FinetuneResult:
    adapter_dir: Path
    name: str  # the Ray Train run name under storage_path
    steps: int
    epochs: float
    train_loss: float  # mean over the steps since the previous report
    eval_loss: float | None  # the last step's held-out loss
    history: list[dict]  # one record per report: step, epoch, train_loss, eval_loss, ...
    train_losses: list[float]  # per optimizer step
    tokens: int
    attempts: int  # 1 + restarts after worker failures
    resumed_from: list[int]  # step of the checkpoint each restart resumed from
    precision: str
    wall_seconds: float
    startup_seconds: float  # call -> first optimizer step of the first attempt
    step_seconds: list[float] = field(default_factory=list)  # rank 0 compute time per step
    step_tokens: list[int] = field(default_factory=list)  # all ranks, per step
    checkpoint_path: str = ""
    best_step: int | None = None  # keep_best with a held-out set: the adapter's step
    best_eval_loss: float | None = None  # ... and its held-out loss


def finetune_adapter(
    model_dir: str | Path,
    dataset,
    out_dir: str | Path,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    eval_dataset=None,
    deepspeed: DeepSpeedSettings = DeepSpeedSettings(),
    scaling: ScalingSettings = ScalingSettings(),
    storage_path: str | Path | None = None,
    name: str | None = None,
    max_failures: int = 2,
    env: Mapping[str, str] | None = None,
    step_hook: StepHook | None = None,
    keep_checkpoints: int = 2,
    label: str | None = None,
) -> FinetuneResult:
    """Fine-tune a LoRA of `model_dir` (a local `save_pretrained` folder or a hub id) on
    `dataset` (rows with prompt / completion) and write it to `out_dir` (PEFT, safetensors).

    `eval_dataset`: held-out rows, scored at each report. `storage_path`: where Ray Train
    keeps checkpoints (a shared path on a cluster; default `$SOUPS_HOME/runs`). `label`:
    what the progress lines and bar show (default `name`, the Ray run's name). `env`:
    extra environment variables for the workers. `step_hook(rank, step, resumed)` runs in
    every worker after each optimizer step (monitoring, fault-injection tests); it must be
    picklable. Needs Ray: connects to a running instance or starts a local one.
    """
    import ray  # lazy: ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # lazy: ray
    from ray.train.torch import TorchTrainer  # lazy: ray
    from transformers import AutoTokenizer  # lazy: transformers

    called = time.time()
    model_dir = model_ref(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_dataset(tokenizer, dataset, train.max_length, train.loss_on)
    if not encoded:
        raise ValueError("the training dataset is empty")
    held_out = (encode_dataset(tokenizer, eval_dataset, train.max_length, train.loss_on)
                if eval_dataset is not None and len(eval_dataset) else None)
    name = name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage = Path(storage_path) if storage_path is not None else soups_home() / "runs"
    if "://" not in str(storage):
        storage = storage.resolve()
        storage.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    spec = WorkerSpec(
        name=name, model_dir=model_dir, lora=lora, train=train, deepspeed=deepspeed,
        scaling=scaling, train_data=ray.put(encoded),
        eval_data=ray.put(held_out) if held_out else None, n_train=len(encoded),
        pad_id=pad_token_id(tokenizer), step_hook=step_hook, label=label,
    )
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {}),
                 **scaling.custom_resources}
    # Ray Train's controller polls its workers every 2 s, so a fine-tune returned 2-4 s after
    # its last step; every 0.5 s it returns within about 1 s (benchmarks.finetune_overhead
    # --quick: 21.9 -> 16.9 s wall). A missed poll is a worker's death only after 10 min of
    # them, so a busy worker is not put at risk. The trainer hands this variable from the
    # driver's environment to its controller; a value the user set is kept.
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.5")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(scaling.use_gpu, dict(env or {}))},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tune {name}: the run ended without a checkpoint")
    out = Path(out_dir)
    with result.checkpoint.as_directory() as folder:
        if not (Path(folder) / ADAPTER_DIR).is_dir():
            raise RuntimeError(f"fine-tune {name}: last checkpoint {folder} has no adapter")
        shutil.copytree(Path(folder) / ADAPTER_DIR, out, dirs_exist_ok=True)
        state = LoopState(**json.loads((Path(folder) / STATE_FILE).read_text()))
    last = state.history[-1]
    return FinetuneResult(
        adapter_dir=out, name=name, steps=state.step, epochs=last["epoch"],
        train_loss=last["train_loss"], eval_loss=last.get("eval_loss"),
        history=state.history, train_losses=state.train_losses, tokens=sum(state.step_tokens),
        attempts=state.attempts, resumed_from=state.resumed_from, precision=state.precision,
        wall_seconds=time.time() - called,
        startup_seconds=state.first_step_start[0] - called,
        step_seconds=state.step_seconds, step_tokens=state.step_tokens,
        checkpoint_path=result.checkpoint.path,
        best_step=state.best_step, best_eval_loss=state.best_eval_loss,
    )


def finetune_key_inputs(
    model_dir: str | Path,
    dataset,
    lora: LoraSettings,
    train: TrainSettings,
    deepspeed: DeepSpeedSettings = DeepSpeedSettings(),
    scaling: ScalingSettings = ScalingSettings(),
    eval_dataset=None,
) -> dict:
    """What determines a fine-tuned adapter, for `soups.training.adapter_cache`. Left out on
    purpose: the ZeRO stage and CPU count (memory and speed, not the result) and, unless
    `keep_best`, the held-out evaluation (`eval_every`, `held_out`, the held-out rows:
    what is reported, not what is trained; `keep_best` itself is left out too when False,
    so the keys of adapters trained before it existed stay the same). With `keep_best`
    the held-out loss picks the adapter, so all of it is in. The worker count stays in:
    the global batch is micro-batch x accumulation x workers."""
    path = Path(model_dir)
    base = ({"fingerprint": fingerprint_files(path)} if path.is_dir()
            else {"hub_id": str(model_dir)})
    inputs = {
        "trainer": f"trainables.finetune/{TRAINER_VERSION}",
        "base_model": base,
        "dataset": fingerprint_rows(dataset),
        "lora": asdict(lora),
        "train": _trained_fields(train),
        "num_workers": scaling.num_workers,
        "precision": deepspeed.precision,
        "use_gpu": scaling.use_gpu,
    }
    if train.keep_best:
        inputs["eval_dataset"] = (fingerprint_rows(eval_dataset)
                                  if eval_dataset is not None else None)
    return inputs


# TrainSettings fields that change only what is reported, unless keep_best is True.
_EVALUATION_FIELDS = ("eval_every", "held_out", "keep_best")


def _trained_fields(train: TrainSettings) -> dict:
    fields = asdict(train)
    return fields if train.keep_best else {k: v for k, v in fields.items()
                                           if k not in _EVALUATION_FIELDS}


def cached_finetune(
    cache_root: str | Path,
    model_dir: str | Path,
    dataset,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    eval_dataset=None,
    deepspeed: DeepSpeedSettings = DeepSpeedSettings(),
    scaling: ScalingSettings = ScalingSettings(),
    storage_path: str | Path | None = None,
    **kwargs,
) -> tuple[CacheEntry, FinetuneResult | None]:
    """The adapter for these inputs from the cache at `cache_root`, trained once if absent.
    Returns the entry and, when this call trained it, the fine-tune result. The Ray run is
    named after the cache key, so a retry after a driver crash resumes the same run."""
    key_inputs = finetune_key_inputs(model_dir, dataset, lora, train, deepspeed, scaling,
                                     eval_dataset)
    cache = AdapterCache(cache_root)
    trained: list[FinetuneResult] = []

    def train_fn(tmp: Path) -> None:
        name = f"finetune-{cache_key(key_inputs)[:16]}"
        trained.append(finetune_adapter(
            model_dir, dataset, tmp, lora, train, eval_dataset, deepspeed, scaling,
            storage_path, name=name, **kwargs))
        (tmp / "finetune_history.json").write_text(json.dumps(trained[0].history, indent=2))

    entry = cache.get_or_train(key_inputs, train_fn, log=print)
    if not trained:
        return entry, None
    return entry, dataclasses.replace(trained[0], adapter_dir=entry.path)
