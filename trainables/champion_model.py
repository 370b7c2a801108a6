"""The study's champion as an MLflow model (models from code: MLflow copies this file into the
model and runs it on load; nothing is pickled). `mlflow.pyfunc.load_model(
"models:/<study>-champion@champion")` loads the base model and the exported PEFT adapter and
answers prompts the way the study evaluated them: greedy, through the base's chat template
when the study trained with one.

Self-contained on purpose (torch, transformers and peft only): a registry user needs neither
this project nor Ray to run the model, except for a mixture of LoRA experts, whose routers
only this project loads. The model's config (`model_config`) holds:
- `base_model`: the base's folder where the study ran; `base_model_name`: the name the
  adapter gives it (a hub id where there is one), tried when that folder is absent;
- `chat_template`: whether prompts go through the base's chat template;
- `max_new_tokens`: the generation length the study evaluated with.
"""

from __future__ import annotations

import os

import mlflow
from mlflow.pyfunc import PythonModel


class ChampionModel(PythonModel):
    def load_context(self, context):
        import torch  # lazy: torch
        from peft import PeftModel  # lazy: peft
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers

        config = context.model_config
        base = config["base_model"]
        if not os.path.isdir(base):
            base = config["base_model_name"]
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        adapter = context.artifacts["adapter"]
        if os.path.isfile(os.path.join(adapter, "moe.json")):
            # A mixture of LoRA experts: PEFT cannot load its routers; this project can.
            from soups.compose.moe import load_moe  # lazy: safetensors.torch

            self.model = load_moe(adapter, base, "cpu", "float32")
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.chat = bool(config.get("chat_template"))
        self.max_new_tokens = int(config.get("max_new_tokens", 128))

    def _prompt(self, text: str) -> str:
        if not self.chat:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    def predict(self, context, model_input: list[str], params: dict | None = None
                ) -> list[str]:
        """Prompts to answers, one string each (the type hints give the model its signature
        in the MLflow UI, and MLflow checks the input against it)."""
        import torch  # lazy: torch

        prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        encoded = self.tokenizer([self._prompt(p) for p in prompts], return_tensors="pt",
                                 padding=True, add_special_tokens=not self.chat)
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        width = encoded["input_ids"].shape[1]
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


mlflow.models.set_model(ChampionModel())
