"""Stage 4, composition: LoRAs combined into one model for the target task.

- `merge/`: static merges (linear, CAT, TIES, DARE, SVD, KnOTS, LoRA-LEGO...) through one
  engine and a method registry;
- `cat/`: CAT with learned per-layer weights (the paper's method);
- `lorahub/`: LoraHub's gradient-free weight search;
- `moe/`: the mixture of LoRA experts (learned routers);
- `controls`: the random LoRAs a merging claim is compared against.

Imports evaluation, training, data and the foundations; never tasks.
"""
