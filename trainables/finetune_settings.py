"""Settings of a distributed fine-tune beyond `soups.training.train_settings` (LoRA + optimiser):
how DeepSpeed shards and computes, and how many Ray Train workers run it; plus the DeepSpeed
config built from them. Pure: importing this module loads neither ray nor deepspeed.

DeepSpeed config reference: https://www.deepspeed.ai/docs/config-json/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from soups.training.train_settings import TrainSettings

# Marks a fine-tune worker's progress line: the study console shows these lines on the
# terminal, and sends every other worker line to the study's log.
PROGRESS_PREFIX = "soups-progress: "
# Marks a pace line (step, tokens/s, time left, every few percent): shown where no step bar
# is drawn (no terminal: a CI log, a file), logged always.
PACE_PREFIX = "soups-pace: "

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int = 0  # 0: plain data parallel; 1/2: shard optimiser state/gradients; 3: params
    # "auto": bf16 on a GPU that supports it, else fp32 (CPU bf16 autocast is slow and
    # DeepSpeed's CPU path only supports bf16 with ZeRO >= 1).
    precision: Precision = "auto"
    # ZeRO-3 keeps parameters smaller than this unpartitioned (DeepSpeed's default 1e5);
    # 0 partitions everything, which is how tests make a tiny model really sharded.
    param_persistence_threshold: int | None = None

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.param_persistence_threshold is not None and self.param_persistence_threshold < 0:
            raise ValueError("param_persistence_threshold must be >= 0, got "
                             f"{self.param_persistence_threshold}")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1  # also the worker's torch thread count on CPU
    # Custom Ray resources each worker also needs (on a cluster: keeps workers on worker nodes).
    custom_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")


def resolve_precision(precision: Precision, on_gpu: bool, bf16_supported: bool) -> str:
    """The precision actually used: "auto" becomes bf16 on a bf16-capable GPU, else fp32."""
    if precision == "auto":
        return "bf16" if on_gpu and bf16_supported else "fp32"
    if precision == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def deepspeed_config(train: TrainSettings, deepspeed: DeepSpeedSettings, world_size: int,
                     precision: str) -> dict:
    """The DeepSpeed config dict. The optimiser and LR schedule are the caller's own torch
    objects (passed to `deepspeed.initialize`), so no fused Adam is JIT-built and the
    schedule is exactly the plain loop's."""
    zero: dict = {"stage": deepspeed.zero_stage}
    if deepspeed.zero_stage == 3 and deepspeed.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = deepspeed.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accumulation,
        "train_batch_size": train.micro_batch_size * train.grad_accumulation * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our torch AdamW under ZeRO: DeepSpeed calls it "untested" but shards it fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # progress is ours; DeepSpeed's own lines are noise
        "wall_clock_breakdown": False,
    }
