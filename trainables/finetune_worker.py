"""The per-worker loop of a LoRA fine-tune on Ray Train V2 + DeepSpeed.

Each Ray Train worker loads the base model, wraps it with PEFT, and hands model, torch
AdamW and the warm-up schedule to `deepspeed.initialize` (Ray has already set up the
process group; DeepSpeed reuses it). The data order is the plain loop's
(`soups.training.lora_training.train_lora`): one seeded permutation per epoch, cut into
micro-batches, consumed as one stream across epochs; global step s takes micro-batches
[s*W*A, (s+1)*W*A) of that stream, rank r the ones at offsets j*W + r (j < A). So W
workers with gradient accumulation A compute exactly the update of the plain loop with
accumulation W*A, which the tests check. The step loop itself is DeepSpeed's, not the
plain loop's (`soups.training.training_loop`): `engine.backward` scales the loss by 1/A and
`engine.step` on every micro-batch steps the optimizer, clipping (`gradient_clipping`, when
> 0 like the plain loop) and schedule only at the accumulation boundary, after the
all-reduce of the gradients.

Every report (each epoch, or every `eval_every` steps, and the end) evaluates held-out
loss, saves a DeepSpeed checkpoint on every rank (frozen base weights excluded) plus the
loop state on rank 0, and calls `ray.train.report`, a barrier that merges the ranks'
files into one checkpoint. After a worker failure Ray Train restarts the group and each
rank loads that checkpoint and skips the data it had consumed. The final report also
holds the adapter: under ZeRO-3 the LoRA parameters are gathered on all ranks
(`GatheredParameters`, a collective) and rank 0 saves them, then re-reads the file and
compares it with what it gathered, so an empty or partial save fails loudly.

With `keep_best` the result is the reported step with the lowest held-out loss: at each
report that improves on it, the LoRA parameters are gathered (as for the final save) and
rank 0 keeps a CPU copy. Every checkpoint holds that copy as `best_adapter/` (rank 0
writes it from memory, so it carries forward through later checkpoints), a restarted
rank 0 reads it back, and the final report saves it as the checkpoint's `adapter/`: a run
that fails after its best step still ends with that step's weights. Every rank takes the
same decisions, since the held-out loss is all-reduced and the loop state is shared.

References: Ray Train V2 user guide (https://docs.ray.io/en/latest/train/); DeepSpeed
ZeRO (Rajbhandari et al., 2020, arXiv 1910.02054) and its model-checkpointing docs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from soups.adapters import WEIGHTS_FILE, LoraAdapter
from soups.training.text_batches import collate
from soups.training.train_settings import LoraSettings, TrainSettings
from soups.training.training_loop import adamw_with_warmup
from trainables.finetune_settings import (
    PACE_PREFIX,
    PROGRESS_PREFIX,
    DeepSpeedSettings,
    ScalingSettings,
    deepspeed_config,
    resolve_precision,
)

DS_TAG = "state"  # DeepSpeed checkpoint tag: one per Ray checkpoint folder
STATE_FILE = "loop_state.json"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"  # keep_best: the lowest held-out loss so far

Encoded = list[tuple[list[int], list[int]]]
StepHook = Callable[[int, int, bool], None]  # (rank, step, resumed) after each optimizer step


@dataclass
class WorkerSpec:
    """Everything a worker needs; `train_data` / `eval_data` are Ray object refs to
    encoded examples (token ids, labels), tokenised once by the driver."""

    name: str
    model_dir: str
    lora: LoraSettings
    train: TrainSettings
    deepspeed: DeepSpeedSettings
    scaling: ScalingSettings
    train_data: object
    eval_data: object | None
    n_train: int
    pad_id: int
    step_hook: StepHook | None = None
    label: str | None = None  # what the progress shows (`LoRA math r8`); default `name`

    @property
    def shown(self) -> str:
        return self.label or self.name


@dataclass
class LoopState:
    """What rank 0 writes into every checkpoint (and the driver reads at the end)."""

    step: int = 0
    attempts: int = 0
    resumed_from: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)  # per step, mean over W*A batches
    step_tokens: list[int] = field(default_factory=list)  # per step, all ranks (non-padding)
    step_seconds: list[float] = field(default_factory=list)  # per step, rank 0 compute time
    history: list[dict] = field(default_factory=list)  # one record per report
    precision: str = "fp32"
    worker_start: list[float] = field(default_factory=list)  # time.time() per attempt
    first_step_start: list[float] = field(default_factory=list)
    best_step: int | None = None  # keep_best: the step of the lowest held-out loss so far
    best_eval_loss: float | None = None


class ChunkStream:
    """Micro-batch index lists of the plain loop, in order: epoch after epoch, each a
    `torch.randperm(n, generator)` of one generator seeded with `seed`, cut every `micro`."""

    def __init__(self, n: int, micro: int, seed: int):
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        self.n, self.micro = n, micro
        self.per_epoch = math.ceil(n / micro)
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch, self._chunks = -1, []

    def chunk(self, index: int) -> list[int]:
        """Indices of global micro-batch `index` (non-decreasing calls are cheap)."""
        epoch, offset = divmod(index, self.per_epoch)
        if epoch < self._epoch:
            raise ValueError(f"chunk {index} is behind the stream (epoch {self._epoch})")
        while self._epoch < epoch:
            order = torch.randperm(self.n, generator=self._generator).tolist()
            self._chunks = [order[i : i + self.micro] for i in range(0, self.n, self.micro)]
            self._epoch += 1
        return self._chunks[offset]


def rank_step_chunks(stream: ChunkStream, world: int, accum: int, rank: int,
                     start_step: int) -> Iterator[list[list[int]]]:
    """For steps start_step, start_step + 1, ...: this rank's `accum` micro-batches."""
    step = start_step
    while True:
        base = step * world * accum
        yield [stream.chunk(base + j * world + rank) for j in range(accum)]
        step += 1


def train_worker(config: dict) -> None:
    """Ray Train worker entry point: `config["spec"]` is a `WorkerSpec`."""
    import ray  # lazy: ray
    import ray.train  # lazy: ray

    spec: WorkerSpec = config["spec"]
    worker_start = time.time()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train, ds = spec.train, spec.deepspeed
    if not spec.scaling.use_gpu:
        torch.set_num_threads(spec.scaling.cpus_per_worker)
    encoded: Encoded = ray.get(spec.train_data)
    held_out: Encoded | None = ray.get(spec.eval_data) if spec.eval_data is not None else None

    engine, precision = _build_engine(spec, world)
    state = LoopState(precision=precision)
    best: dict[str, torch.Tensor] | None = None  # rank 0: CPU copy of the best LoRA weights
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            loaded, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=False)
            if loaded is None:
                raise RuntimeError(f"{spec.name}: no DeepSpeed state in checkpoint {folder}")
            state = LoopState(**json.loads((Path(folder) / STATE_FILE).read_text()))
            if rank == 0 and state.best_step is not None:
                best = read_adapter(engine.module, Path(folder) / BEST_ADAPTER_DIR)
        state.resumed_from.append(state.step)
    state.attempts += 1
    state.worker_start.append(worker_start)
    resumed = checkpoint is not None

    total = train.total_steps(spec.n_train, world)
    reports = train.eval_steps(spec.n_train, world)
    per_epoch = train.steps_per_epoch(spec.n_train, world)
    stream = ChunkStream(spec.n_train, train.micro_batch_size, train.seed)
    steps = rank_step_chunks(stream, world, train.grad_accumulation, rank, state.step)
    bar = _progress_bar(spec.shown, total, state.step) if rank == 0 else None
    pace = _Pace(spec.shown, total, state.step, world) if rank == 0 else None
    pending: list[tuple[float, int]] = []  # (loss sum, tokens) of this rank, per step
    engine.train()
    state.first_step_start.append(time.time())
    ran_a_step = state.step < total
    while state.step < total:
        start = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for chunk in next(steps):
            batch = _to_device(collate([encoded[i] for i in chunk], spec.pad_id), engine.device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # an optimizer step only at the accumulation boundary
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        state.step += 1
        pending.append((loss_sum, tokens))
        if rank == 0:
            state.step_seconds.append(time.perf_counter() - start)
            bar.update(1)
            line = pace.step(state.step, tokens)
            if line and state.step not in reports:  # a report prints its own line
                print(PACE_PREFIX + line, flush=True)
        if spec.step_hook is not None:
            spec.step_hook(rank, state.step, resumed)
        if state.step in reports:
            _collect_steps(state, pending, world * train.grad_accumulation, engine.device)
            pending = []
            record = _record(state, per_epoch, total, train.grad_accumulation * world)
            if held_out is not None:
                record["eval_loss"] = _held_out_loss(engine, held_out, train.micro_batch_size,
                                                     spec.pad_id, rank, world)
                if train.keep_best and _improves(state, record["eval_loss"]):
                    state.best_step, state.best_eval_loss = state.step, record["eval_loss"]
                    best = gather_adapter(engine, ds.zero_stage, rank)
            state.history.append(record)
            if rank == 0:
                print(PROGRESS_PREFIX + _format_record(spec.shown, record, total)
                      + pace.eta(state.step), flush=True)
            _report(engine, state, record, rank, ds.zero_stage, final=state.step >= total,
                    best=best)
    if bar is not None:
        bar.close()
    if not ran_a_step:
        # Resumed a run that had finished (same storage path and name): report its end
        # again, so this attempt too ends with the adapter in its last checkpoint.
        _report(engine, state, state.history[-1], rank, ds.zero_stage, final=True, best=best)


def _improves(state: LoopState, eval_loss: float) -> bool:
    """Strictly lower than the best so far: ties keep the earlier step."""
    return state.best_eval_loss is None or eval_loss < state.best_eval_loss


def _build_engine(spec: WorkerSpec, world: int):
    import deepspeed  # lazy: deepspeed
    from peft import get_peft_model  # lazy: peft
    from transformers import AutoModelForCausalLM  # lazy: transformers

    on_gpu = spec.scaling.use_gpu and torch.cuda.is_available()
    precision = resolve_precision(spec.deepspeed.precision, on_gpu,
                                  on_gpu and torch.cuda.is_bf16_supported())
    # Same seed and call order as the plain loop, so the LoRA initialisation is identical.
    torch.manual_seed(spec.train.seed)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    model = get_peft_model(model, spec.lora.peft_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_with_warmup(params, spec.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(spec.train, spec.deepspeed, world, precision),
    )
    return engine, precision


def _to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _all_reduce_sum(values: list[list[float]], device) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.cpu()


def _collect_steps(state: LoopState, pending: list[tuple[float, int]], batches_per_step: int,
                   device) -> None:
    """Sum every rank's per-step loss sums and tokens (one collective per report)."""
    if not pending:
        return
    summed = _all_reduce_sum([list(p) for p in pending], device)
    state.train_losses += [float(x) / batches_per_step for x in summed[:, 0]]
    state.step_tokens += [int(x) for x in summed[:, 1]]


def _record(state: LoopState, per_epoch: int, total: int, batches_per_step: int) -> dict:
    since = state.history[-1]["step"] if state.history else 0
    window = state.train_losses[since:] or state.train_losses[-1:]
    steady = state.step_seconds[1:] if len(state.step_seconds) > 1 else state.step_seconds
    steady_tokens = state.step_tokens[len(state.step_tokens) - len(steady):]
    return {
        "step": state.step,
        "epoch": round(state.step / per_epoch, 4),
        "train_loss": sum(window) / max(len(window), 1),
        "tokens": sum(state.step_tokens),
        "tokens_per_s": sum(steady_tokens) / max(sum(steady), 1e-9),
        "total_steps": total,
    }


@torch.no_grad()
def _held_out_loss(engine, held_out: Encoded, micro: int, pad_id: int, rank: int,
                   world: int) -> float:
    """Token-weighted mean loss over `held_out` (as `soups.training.training_loop.held_out_loss`),
    micro-batches split over ranks. Every rank runs the same number of forward passes (a
    rank out of data repeats batch 0 with weight 0): ZeRO-3 forwards are collectives."""
    engine.eval()
    chunks = [held_out[i : i + micro] for i in range(0, len(held_out), micro)]
    total, count = 0.0, 0
    for round_ in range(math.ceil(len(chunks) / world)):
        index = round_ * world + rank
        weight = 1 if index < len(chunks) else 0
        batch = _to_device(collate(chunks[index if weight else 0], pad_id), engine.device)
        n = int((batch["labels"][:, 1:] != -100).sum()) * weight
        total += float(engine(**batch).loss) * n
        count += n
    engine.train()
    summed = _all_reduce_sum([[total, count]], engine.device)[0]
    return float(summed[0] / max(summed[1], 1))


def _report(engine, state: LoopState, record: dict, rank: int, zero_stage: int,
            final: bool, best: dict[str, torch.Tensor] | None = None) -> None:
    """Checkpoint (DeepSpeed state on every rank, loop state on rank 0, the best adapter
    when `keep_best` found one, the result adapter when final) and report it to Ray Train;
    a barrier every rank calls. `best`: rank 0's copy (None on the other ranks)."""
    import ray.train  # lazy: ray

    folder = Path(tempfile.mkdtemp(prefix=f"soups-ckpt-r{rank}-"))
    try:
        engine.save_checkpoint(str(folder), tag=DS_TAG, exclude_frozen_parameters=True)
        # Every rank knows whether a best exists (state.best_step): they agree on gathering.
        if final and state.best_step is None:
            save_adapter(engine, folder / ADAPTER_DIR, zero_stage, rank)
        if rank == 0 and state.best_step is not None:
            write_adapter(engine.module, folder / BEST_ADAPTER_DIR, best)
            if final:
                write_adapter(engine.module, folder / ADAPTER_DIR, best)
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(state.__dict__))
        metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
        metrics["final"] = final
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_adapter(engine, out: Path, zero_stage: int, rank: int) -> None:
    """Save the LoRA weights as a PEFT folder (safetensors, float32) from rank 0; all ranks
    call it (`gather_adapter`)."""
    state = gather_adapter(engine, zero_stage, rank)
    if rank == 0:
        write_adapter(engine.module, out, state)


def gather_adapter(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """A CPU float32 copy of the LoRA parameters on rank 0 (None on the other ranks).

    Under ZeRO-3 each rank holds a shard of every partitioned parameter; reading them
    outside `GatheredParameters` gives empty tensors. The gather is a collective, so all
    ranks enter it; only rank 0 copies."""
    import deepspeed  # lazy: deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    gather = (deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
              if zero_stage == 3 else nullcontext())
    with gather:
        return ({n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
                if rank == 0 else None)


def write_adapter(model, out: Path, state: dict[str, torch.Tensor]) -> None:
    """Save `state` (LoRA parameters by `named_parameters` name) as the PEFT folder `out`,
    and check the file."""
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    _check_saved(out, state)


def read_adapter(model, folder: Path) -> dict[str, torch.Tensor]:
    """The LoRA parameters of a folder `write_adapter` wrote, by `named_parameters` name."""
    from safetensors.torch import load_file  # lazy: safetensors.torch

    if not (folder / WEIGHTS_FILE).is_file():
        raise RuntimeError(f"checkpoint has a best step but no best adapter: {folder}")
    saved = load_file(str(folder / WEIGHTS_FILE))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if _saved_key(n) not in saved]
    if missing:
        raise RuntimeError(f"best adapter {folder}: no weights for {missing[:3]}")
    return {n: saved[_saved_key(n)] for n in names}


def _saved_key(name: str) -> str:
    """A parameter's key in a PEFT file: the adapter name ("default") is dropped."""
    return name.replace(".default.", ".")


def _check_saved(out: Path, state: dict[str, torch.Tensor]) -> None:
    """The file must hold exactly the gathered tensors, none of them empty."""
    from safetensors.torch import load_file  # lazy: safetensors.torch

    LoraAdapter.open(out)  # the project's reader accepts it (layout, shapes, finiteness)
    saved = load_file(str(out / WEIGHTS_FILE))
    expected = {_saved_key(k): v for k, v in state.items()}
    if set(saved) != set(expected):
        raise RuntimeError(f"adapter {out}: saved keys differ from the trained LoRA "
                           f"parameters ({sorted(set(saved) ^ set(expected))[:3]})")
    for key, tensor in expected.items():
        if tensor.numel() == 0 or not torch.equal(saved[key], tensor):
            raise RuntimeError(f"adapter {out}: {key} was not saved correctly "
                               f"(shape {tuple(saved[key].shape)}, expected "
                               f"{tuple(tensor.shape)})")


def _progress_bar(name: str, total: int, done: int):
    """A step bar drawn by the driver (Ray's distributed tqdm)."""
    from ray.experimental.tqdm_ray import tqdm  # lazy: ray

    bar = tqdm(total=total, desc=f"{name} steps", unit="step")
    bar.update(done)
    return bar


class _Pace:
    """Progress lines with or without a terminal: one every `EVERY` of the steps (and at
    least every `AT_MOST_S` seconds), with tokens/s and the time left, so a long fine-tune on
    a real model never goes quiet in a CI log or a file."""

    EVERY, AT_MOST_S = 0.05, 60.0

    def __init__(self, name: str, total: int, done: int, world: int):
        self.name, self.total, self.world = name, total, world
        self.start = self.last = time.monotonic()
        self.first, self.tokens, self.mark = done, 0, done

    def step(self, step: int, tokens: int) -> str | None:
        self.tokens += tokens * self.world  # this rank's share, times the ranks
        now = time.monotonic()
        due = max(1, round(self.total * self.EVERY))
        if step < self.total and step - self.mark < due and now - self.last < self.AT_MOST_S:
            return None
        self.mark, self.last = step, now
        rate = self.tokens / max(now - self.start, 1e-9)
        return (f"[{self.name}] step {step}/{self.total} ({100 * step / self.total:.0f}%)  "
                f"{rate:.0f} tokens/s" + self.eta(step))

    def eta(self, step: int) -> str:
        done = step - self.first
        if done <= 0 or step >= self.total:
            return ""
        left = (time.monotonic() - self.start) / done * (self.total - step)
        return f"  ETA {_duration(left)}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _format_record(name: str, record: dict, total: int) -> str:
    held = f"  eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
    return (f"[{name}] epoch {record['epoch']:.2f}  step {record['step']}/{total}  "
            f"train_loss {record['train_loss']:.4f}{held}  "
            f"{record['tokens_per_s']:.0f} tokens/s")


def worker_env(use_gpu: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for the workers: Ray forwards only RAY_TRAIN_* by itself.
    DeepSpeed picks its accelerator from DS_ACCELERATOR; tracking (MLFLOW_*), hub and
    cache settings come from the driver's environment; `extra` wins."""
    prefixes = ("MLFLOW_", "HF_", "TRANSFORMERS_", "SOUPS_", "TORCH_EXTENSIONS_DIR",
                "TOKENIZERS_PARALLELISM", "DS_")
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    env.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env
