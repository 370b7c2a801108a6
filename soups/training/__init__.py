"""Stage 2, training: base models and the LoRAs fine-tuned on them.

- `base_model`: the embedded base model (built, shipped) and `load_pretrained` for any base;
  `gguf_base`: GGUF bases dequantized once into a cached folder; `tokenizer`: the embedded
  model's byte-level BPE tokenizer;
- `train_settings`: the LoRA and optimiser recipe (pure, no torch); `training_loop`: the
  optimiser steps and held-out loss every trainer shares; `lora_training`: a single-process
  PEFT fine-tune; `text_batches`: rows tokenized into padded training and scoring batches
  (evaluation scores with them too);
- `adapter_cache`: trained adapters on disk, keyed by everything that made them.

Imports data and the foundations.
"""
