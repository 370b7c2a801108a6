"""The settings of a fine-tune: the LoRA to train and the optimiser recipe. Pure: importing
this module loads no torch (study files, the command line and the adapter cache's key read
these without paying for torch).

The dataclasses are the one description of a skill fine-tune: the Ray Train + DeepSpeed
trainable (`trainables/`) and the plain loop (`soups.training.lora_training`) both take them, the
CAT weights are trained with `TrainSettings` too, and the adapter cache hashes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Which tokens carry the loss (`soups.training.text_batches`): the whole sequence or the completion.
LossOn = Literal["all", "completion"]

# The paper's skill LoRAs (LLaMA-7B): r=32, alpha=64, dropout 0.05 on q,k,v,up,down.
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PAPER_TARGETS

    def peft_config(self):
        from peft import LoraConfig  # lazy: peft

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainSettings:
    """The optimiser recipe. The defaults are the default study's stage 1 on the embedded
    model (the study file's `finetune` section reads its defaults from here); the paper's
    7B recipe is lr 3e-4, 3 epochs, length 256, loss on all tokens, 100 warm-up steps
    (`docs/finetune.md`)."""

    learning_rate: float = 2e-3
    epochs: float = 2.0  # fractional epochs allowed; `max_steps` wins when set
    max_steps: int | None = None
    micro_batch_size: int = 16
    grad_accumulation: int = 1
    max_length: int = 192
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the gradient norm to this; 0 = no clipping
    loss_on: LossOn = "completion"
    seed: int = 0
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 = once per epoch
    # The result is the evaluated checkpoint with the lowest held-out loss (evaluations at
    # `eval_steps`), not the last step's; without a held-out set, the last step's.
    keep_best: bool = False
    held_out: int = 64  # validation rows per skill a study holds out for that loss; 0 = none

    def steps_per_epoch(self, n_examples: int, world_size: int = 1) -> int:
        """Optimizer steps in one pass over `n_examples` when each step takes
        `micro_batch_size * grad_accumulation` examples on each of `world_size` workers."""
        global_batch = self.micro_batch_size * self.grad_accumulation * world_size
        return max(1, math.ceil(n_examples / global_batch))

    def total_steps(self, n_examples: int, world_size: int = 1) -> int:
        per_epoch = self.steps_per_epoch(n_examples, world_size)
        return self.max_steps or max(1, math.ceil(per_epoch * self.epochs))

    def eval_steps(self, n_examples: int, world_size: int = 1) -> set[int]:
        """Steps after which the held-out loss is evaluated: every `eval_every` steps, or at
        each epoch's end (micro-batches form one stream across epochs, so an epoch ends in
        the step that consumes its last micro-batch), and always the last step."""
        total = self.total_steps(n_examples, world_size)
        if self.eval_every:
            return set(range(self.eval_every, total + 1, self.eval_every)) | {total}
        chunks_per_epoch = math.ceil(n_examples / self.micro_batch_size)
        per_step = world_size * self.grad_accumulation
        ends = {math.ceil(e * chunks_per_epoch / per_step) for e in range(1, total + 1)}
        return {s for s in ends if s <= total} | {total}
