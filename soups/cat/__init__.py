"""CAT, the learnable concatenation of LoRAs (LoRA Soups, Prabhakar et al. 2024,
https://arxiv.org/abs/2410.13025): k frozen skill LoRAs attached to a frozen base model,
one learned scalar per (module, LoRA), trained on a small skill mix and exported exactly as
one PEFT LoRA of rank sum(r_i).

- `settings`: `CatSettings` (granularity, normalisation, init) and the paper's recipe;
- `layer`: `CatLinear` (one concatenated-A matmul, a rank scale, one concatenated-B matmul);
- `model`: `CatModel` (wraps a causal LM, owns the weights);
- `mix`, `train`: the skill mix and the weights-only training loop;
- `export`: the folded PEFT adapter and `cat_weights.json`;
- `run`: `learn_cat`, all of the above end to end.
"""

from soups.cat.export import export_cat, folded_modules
from soups.cat.layer import CatLinear, CatWeights, delta_norm
from soups.cat.mix import skill_mix
from soups.cat.model import CatModel
from soups.cat.run import learn_cat, resolve_device
from soups.cat.settings import PAPER_CAT_TRAIN, CatSettings
from soups.cat.train import CatTrainResult, StopTraining, train_cat

__all__ = [
    "PAPER_CAT_TRAIN", "CatLinear", "CatModel", "CatSettings", "CatTrainResult", "CatWeights",
    "StopTraining", "delta_norm", "export_cat", "folded_modules", "learn_cat", "resolve_device",
    "skill_mix", "train_cat",
]
