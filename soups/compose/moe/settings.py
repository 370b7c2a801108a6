"""Settings of a mixture of LoRA experts: how many experts a token uses and how the routers
start, and the training recipe of the routers.

The MoE baseline of LoRA Soups (Prabhakar et al. 2024, https://arxiv.org/abs/2410.13025) is
built with mergoo (https://github.com/Leeroo-AI/mergoo): every LoRA-wrapped linear layer
gets a linear gate on its input, top-k experts per token, a softmax over the k chosen
logits; only the gates are trained. Pure: importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soups.compose.cat.settings import PAPER_CAT_TRAIN
from soups.errors import SoupsError

RouterInit = Literal["normal", "zeros"]
ROUTER_INITS: tuple[str, ...] = ("normal", "zeros")


class MoeError(SoupsError):
    """MoE settings, inputs or folders that cannot work (a top_k above the number of experts,
    a folder that is not a mixture of this base model, ...); the message names the value."""


@dataclass(frozen=True)
class MoeSettings:
    """Routing of a mixture of k LoRA experts.

    - top_k: experts per token, 1..k; the gate is a softmax over the top_k logits, the
      others get 0 (mergoo's `num_experts_per_tok`, which its examples set to 2). A module
      that only some experts carry routes over those (top_k capped at their number).
    - router_init: `normal` = weights N(0, init_std^2) (mergoo: its gates are missing from
      the composed checkpoint, so transformers initialises them with the model's
      `initializer_range`, 0.02 for Llama); `zeros` = every logit 0, a uniform gate.
    - init_std: the standard deviation of `normal`.
    - bias: a bias on the router (mergoo: none).
    - seed: the seed of the `normal` draw.
    """

    top_k: int = 2
    router_init: RouterInit = "normal"
    init_std: float = 0.02
    bias: bool = False
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise MoeError(f"MoE top_k must be an integer >= 1, got {self.top_k!r}")
        if self.router_init not in ROUTER_INITS:
            raise MoeError(f"MoE router_init must be one of {ROUTER_INITS}, "
                           f"got {self.router_init!r}")
        if not self.init_std > 0:
            raise MoeError(f"MoE init_std must be > 0, got {self.init_std!r}")

    def check_experts(self, k: int) -> None:
        """top_k fits k experts."""
        if self.top_k > k:
            raise MoeError(f"MoE top_k {self.top_k} is more than the {k} experts given")


# The routers are trained like the CAT weights (LoRA Soups trains both on the same skill
# mix): one epoch, AdamW lr 1e-4, 100 warm-up steps, micro-batch 6, length 256, loss on the
# whole sequence, best checkpoint by held-out loss.
PAPER_MOE_TRAIN = PAPER_CAT_TRAIN
