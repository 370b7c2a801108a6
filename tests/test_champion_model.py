"""The registered champion is a model MLflow loads and runs (trainables/champion_model.py):
`mlflow.pyfunc.load_model("models:/<name>@champion")` answers prompts exactly as the base
model with the PEFT adapter does, and the version carries a description and tags."""

from __future__ import annotations

import pytest
from conftest import write_random_lora

pytestmark = pytest.mark.unit


def test_the_champion_loads_through_mlflow_and_generates(tiny_model_dir, tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soups.home import default_tracking_uri
    from trainables import tracking

    adapter = write_random_lora(tiny_model_dir, tmp_path / "adapter", 4, 8, seed=3)
    saved = mlflow.get_tracking_uri()
    try:
        tracking.configure(default_tracking_uri(tmp_path))
        experiment = tracking.experiment_id("champ")
        with tracking.tracked_run(experiment, "k", "ties r4", "trial", "champ") as run_id:
            pass
        ended = MlflowClient().get_run(run_id).info
        config = {"base_model": tiny_model_dir, "base_model_name": "embedded",
                  "chat_template": False, "max_new_tokens": 6}
        version = tracking.register_champion(run_id, adapter, config, "champ-champion",
                                             "the best of study champ", {"method": "ties"})
        registered = MlflowClient().get_model_version_by_alias("champ-champion", "champion")
        assert int(registered.version) == version and registered.run_id == run_id
        assert registered.description == "the best of study champ"
        assert registered.tags["method"] == "ties"
        info = MlflowClient().get_run(run_id).info  # registering left the run as it was
        assert (info.status, info.end_time) == ("FINISHED", ended.end_time)
        model = mlflow.pyfunc.load_model("models:/champ-champion@champion")
        prompts = ["### Question:\nWhat is 3 plus 4?\n### Answer:\n", "### Question:\nHi"]
        answers = model.predict(prompts)
    finally:
        mlflow.set_tracking_uri(saved)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          adapter).eval()
    assert isinstance(answers, list) and len(answers) == 2
    for prompt, answer in zip(prompts, answers, strict=True):  # one at a time: no padding
        ids = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**ids, max_new_tokens=6, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or 0)
        assert answer == tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
