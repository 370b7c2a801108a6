"""CAT, the learnable concatenation of LoRAs (LoRA Soups, Prabhakar et al. 2024,
https://arxiv.org/abs/2410.13025): k frozen skill LoRAs attached to a frozen base model,
one learned scalar per (module, LoRA), trained on a small skill mix and exported exactly as
one PEFT LoRA of rank sum(r_i).

- `settings`: `CatSettings` (granularity, normalisation, init) and the paper's recipe;
- `layer`: `CatLinear` (one concatenated-A matmul, a rank scale, one concatenated-B matmul);
- `model`: `CatModel` (wraps a causal LM, owns the weights);
- `mix`, `train`: the skill mix and the weights-only training loop;
- `export`: the folded PEFT adapter and `cat_weights.json`;
- `run`: `learn_cat`, all of the above end to end (`PreparedRun` and `train_weights`
  serve the router training of `soups.compose.moe` too).
"""

from soups.lazy import lazy_exports

# Each public name and the submodule that defines it, imported on first use: the command
# line reads the settings and the paper's recipe (`soups.compose.cat.settings`) without torch.
_EXPORTS = {
    "export_cat": "export", "folded_modules": "export", "CatLinear": "layer",
    "CatWeights": "layer", "delta_norm": "layer", "skill_mix": "mix", "CatModel": "model",
    "learn_cat": "run", "resolve_device": "run", "PAPER_CAT_TRAIN": "settings",
    "CatSettings": "settings", "CatTrainResult": "train", "StopTraining": "train",
    "train_cat": "train", "train_weights": "train", "PreparedRun": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
