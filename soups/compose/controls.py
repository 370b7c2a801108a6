"""The two controls a merging claim needs (as candidate kinds: `random_lora`, `mix_lora`).

- A random LoRA of the same per-module size (`random_stand_in`): each wrapped module keeps
  its rank, scaling and the Frobenius norm of its update dW = s * B @ A, with A and B drawn
  at random. Put in place of a skill LoRA (or of each, concatenated), it answers "does a
  perturbation of that size alone do this?": a merge that beats its random stand-in owes it
  to what the skill LoRAs learned, not to moving the weights.
- One LoRA trained on exactly the rows a learned composition trains on (`skill_mix` with the
  same settings and seed as CAT): "does CAT beat plain fine-tuning on its own data?" (the
  trial trains it with `soups.training.lora_training.train_lora`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from soups.adapters import LoraAdapter, LoraModule, save_adapter


def update_norm(module: LoraModule) -> float:
    """||s * B @ A||_F without forming the (out x in) product: s * sqrt(tr((B^T B)(A A^T)))."""
    a, b = module.A.double(), module.B.double()
    squared = torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0.0)
    return abs(module.scaling) * float(squared.sqrt())


def random_stand_in(adapter_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """A LoRA with the modules, ranks and scalings of the adapter at `adapter_dir`, random
    Gaussian factors, and each module's update norm equal to the adapter's (a module whose
    update is zero stays zero). Seeded: the same seed gives the same adapter."""
    adapter = LoraAdapter.open(adapter_dir)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in adapter.modules():
        a = torch.randn(module.A.shape, generator=generator, dtype=torch.float64)
        b = torch.randn(module.B.shape, generator=generator, dtype=torch.float64)
        drawn = LoraModule(a, b, module.scaling)
        target, current = update_norm(module), update_norm(drawn)
        factor = (target / current) ** 0.5 if current > 0 else 0.0  # split over A and B
        dtype = module.A.dtype
        modules[name] = LoraModule((a * factor).to(dtype), (b * factor).to(dtype),
                                   module.scaling)
    return save_adapter(out_dir, modules, adapter.config, provenance={
        "control": "random stand-in: same modules, ranks, scalings and update norms",
        "source": str(adapter_dir), "seed": seed})
