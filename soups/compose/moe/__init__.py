"""A mixture of LoRA experts, the MoE baseline of LoRA Soups (Prabhakar et al. 2024,
https://arxiv.org/abs/2410.13025), built as mergoo builds it
(https://github.com/Leeroo-AI/mergoo): k frozen skill LoRAs on a frozen base model, a
learned linear router per wrapped module on that module's input, a softmax over each
token's top-k router logits; only the routers are trained, on the same skill mix as CAT.
The gates depend on the input, so the result is not one LoRA: it is saved as a folder of
its own (`moe.json`, routers, experts) that `load_moe` loads and the evaluators accept.

- `settings`: `MoeSettings` (top_k, router init, bias, seed), the training recipe;
- `layer`: `MoeLinear` (base + experts + router) and the top-k gate;
- `model`: `MoeModel` (wraps a causal LM, routers its only trainable parameters);
- `folder`: the folder format, `export_moe`, `is_moe_folder`;
- `load`: `load_moe`, `install_moe`, `installed_moe`;
- `run`: `train_moe`, and `learn_moe`, all of the above end to end.
"""

from soups.lazy import lazy_exports

# Each public name and the submodule that defines it, imported on first use (`is_moe_folder`
# and the settings load no torch).
_EXPORTS = {
    "MoeError": "settings", "MoeSettings": "settings", "PAPER_MOE_TRAIN": "settings",
    "MoeLinear": "layer", "top_k_gates": "layer", "MoeModel": "model",
    "export_moe": "folder", "is_moe_folder": "folder", "read_moe_config": "folder",
    "install_moe": "load", "installed_moe": "load", "load_moe": "load",
    "learn_moe": "run", "train_moe": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
