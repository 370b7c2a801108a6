"""Ray Train + DeepSpeed fine-tunes of the tiny model on CPU (gloo), 2 workers, checked
against the plain single-process loop (`soups.training.lora_training.train_lora`).

W workers with accumulation A must compute the plain loop's update with accumulation W*A
(same data order, same initialisation, dropout 0), so every fit is compared with that
reference step by step: per-step training losses, held-out loss, the saved adapter's
products B A, and the logits of the adapter loaded with `PeftModel.from_pretrained`. One
fit per ZeRO stage (0, 2, 3); the ZeRO-3 fit (every parameter partitioned) also kills a
worker mid-run and must resume from its checkpoint to the same result; the ZeRO-2 fit goes
through the adapter cache, whose second request must train nothing. With `keep_best`, on a
held-out set unlike the training rows (its loss falls, then rises), both trainers must
end with the weights of the step with the lowest held-out loss, the Ray one also when a
worker dies after that step.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from soups.adapters import LoraAdapter
from soups.training.lora_training import train_lora
from soups.training.text_batches import encode_dataset
from soups.training.train_settings import LoraSettings, TrainSettings
from soups.training.training_loop import held_out_loss

pytestmark = pytest.mark.integration

LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0)  # dropout 0: the runs are deterministic
ROWS = [{"prompt": f"### Question:\nWhat is {a} plus {b}?\n### Answer:\n",
         "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a in range(8) for b in range(4)]  # 32 rows
HELD_OUT = [{"prompt": f"### Question:\nWhat is {a} plus {b}?\n### Answer:\n",
             "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a in range(8, 10) for b in range(4)]  # 8 rows
# Programs, not sums: fitting ROWS first lowers, then raises the loss on these.
UNRELATED = [{"prompt": "### Question:\nWrite a Python function solution() that returns "
                        f"{a} times {b}.\n### Answer:\n",
              "completion": f"def solution():\n    return {a} * {b}\n"}
             for a in range(2) for b in range(4)]  # 8 rows
# Evaluated at steps 2, 4, 6, 8 (held-out loss about 6.364, 6.332, 6.313, 6.353): best 6.
# Accumulation 2 = the update of 2 workers with accumulation 1.
KEEP_BEST = TrainSettings(learning_rate=2e-2, epochs=2, micro_batch_size=4, grad_accumulation=2,
                          warmup_steps=2, max_length=64, eval_every=2, keep_best=True)
BEST_STEP = 6


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, log_to_driver=True)
    yield
    if started:
        ray.shutdown()


def _reference(model_dir, tmp_path, train: TrainSettings, world: int):
    """The plain loop with accumulation world * A: the update the workers must compute."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = dataclasses.replace(train, grad_accumulation=train.grad_accumulation * world)
    out = tmp_path / "reference"
    result = train_lora(model_dir, ROWS, out, LORA, plain, eval_rows=HELD_OUT)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    return result, model, AutoTokenizer.from_pretrained(model_dir), out


def _logits(model_dir, adapter_dir, tokenizer) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return _probe(model, tokenizer)


@torch.no_grad()
def _probe(model, tokenizer) -> torch.Tensor:
    batch = tokenizer([r["prompt"] + r["completion"] for r in HELD_OUT[:4]],
                      return_tensors="pt", padding=True)
    return model(**batch).logits


def _check_against_reference(result, model_dir, tmp_path, train, world):
    ref, ref_model, tokenizer, ref_dir = _reference(model_dir, tmp_path, train, world)
    # Same optimizer steps, same per-step losses (mean over the W*A micro-batches).
    assert result.steps == ref.steps
    ref_losses = [h["train_loss"] for h in ref.history]
    assert result.train_losses == pytest.approx(ref_losses, rel=1e-4)
    # Training did something: loss falls on the training data and on held-out data.
    assert result.train_losses[-1] < result.train_losses[0] - 0.05
    evals = [h["eval_loss"] for h in result.history]
    assert evals[-1] < evals[0]
    pad = tokenizer.pad_token_id
    held = encode_dataset(tokenizer, HELD_OUT, train.max_length, train.loss_on)
    assert result.eval_loss == pytest.approx(
        held_out_loss(ref_model, held, train.micro_batch_size, pad), rel=1e-4)
    # The saved adapter: a readable PEFT folder whose B A equal the reference's.
    saved, expected = LoraAdapter.open(result.adapter_dir), LoraAdapter.open(ref_dir)
    assert saved.module_names == expected.module_names
    for name in saved.module_names:
        torch.testing.assert_close(saved.module(name).delta(), expected.module(name).delta(),
                                   rtol=1e-3, atol=1e-6)
    # Loaded with PEFT it gives the trained model's logits, which moved away from the base.
    logits = _logits(model_dir, result.adapter_dir, tokenizer)
    torch.testing.assert_close(logits, _probe(ref_model, tokenizer), rtol=1e-4, atol=1e-4)
    with ref_model.disable_adapter():
        assert (logits - _probe(ref_model, tokenizer)).abs().max() > 1e-3


def test_zero0_two_workers_match_the_plain_loop(ray_instance, tiny_model_dir, tmp_path):
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, finetune_adapter

    train = TrainSettings(learning_rate=2e-2, epochs=2, micro_batch_size=4, warmup_steps=2,
                          max_length=64)
    result = finetune_adapter(
        tiny_model_dir, ROWS, tmp_path / "adapter", LORA, train, eval_dataset=HELD_OUT,
        deepspeed=DeepSpeedSettings(zero_stage=0), scaling=ScalingSettings(num_workers=2),
        storage_path=tmp_path / "runs")
    assert result.attempts == 1 and result.precision == "fp32"
    assert [h["step"] for h in result.history] == [4, 8]  # one report per epoch
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    _check_against_reference(result, tiny_model_dir, tmp_path, train, world=2)


def test_zero2_with_accumulation_through_the_cache(ray_instance, tiny_model_dir, tmp_path):
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, cached_finetune

    train = TrainSettings(learning_rate=2e-2, epochs=2, micro_batch_size=2,
                          grad_accumulation=2, warmup_steps=2, max_length=64)
    args = dict(lora=LORA, train=train, eval_dataset=HELD_OUT,
                deepspeed=DeepSpeedSettings(zero_stage=2),
                scaling=ScalingSettings(num_workers=2), storage_path=tmp_path / "runs")
    entry, result = cached_finetune(tmp_path / "cache", tiny_model_dir, ROWS, **args)
    assert entry.trained and result is not None
    assert (entry.path / "adapter_model.safetensors").is_file()
    assert result.adapter_dir == entry.path  # trained into a temporary folder, then renamed
    _check_against_reference(result, tiny_model_dir, tmp_path, train, world=2)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    # The same request again: served from the cache, no Ray run started.
    again, nothing = cached_finetune(tmp_path / "cache", tiny_model_dir, ROWS, **args)
    assert not again.trained and nothing is None and again.path == entry.path
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_zero3_partitioned_resumes_after_a_worker_is_killed(ray_instance, tiny_model_dir,
                                                            tmp_path):
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, finetune_adapter

    def kill_rank1_at_step3(rank: int, step: int, resumed: bool) -> None:
        if rank == 1 and step == 3 and not resumed:
            import ray.train

            # Ray Train registers a report asynchronously (it polls the workers every 2 s):
            # wait until the step-2 checkpoint is registered, so the resume point is known.
            ray.train.get_all_reported_checkpoints()
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no exception

    train = TrainSettings(learning_rate=2e-2, epochs=2, micro_batch_size=4, warmup_steps=2,
                          max_length=64, eval_every=2)
    result = finetune_adapter(
        tiny_model_dir, ROWS, tmp_path / "adapter", LORA, train, eval_dataset=HELD_OUT,
        deepspeed=DeepSpeedSettings(zero_stage=3, param_persistence_threshold=0),
        scaling=ScalingSettings(num_workers=2), storage_path=tmp_path / "runs",
        max_failures=1, step_hook=kill_rank1_at_step3)
    assert result.attempts == 2 and result.resumed_from == [2]
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    # Resumed with optimizer, schedule and data position restored: the same run as the
    # uninterrupted plain loop.
    _check_against_reference(result, tiny_model_dir, tmp_path, train, world=2)


def _weights(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from soups.adapters import WEIGHTS_FILE

    return load_file(str(adapter_dir / WEIGHTS_FILE))


def _plain_run(model_dir, out, train: TrainSettings):
    return train_lora(model_dir, ROWS, out, LORA, train, eval_rows=UNRELATED)


def test_plain_loop_keep_best_saves_the_best_steps_weights(tiny_model_dir, tmp_path):
    result = _plain_run(tiny_model_dir, tmp_path / "best", KEEP_BEST)
    evals = {h["step"]: h["eval_loss"] for h in result.history if "eval_loss" in h}
    assert sorted(evals) == [2, 4, 6, 8] and result.steps == 8
    assert result.best_step == BEST_STEP == min(evals, key=evals.get)
    assert result.best_eval_loss == evals[BEST_STEP] < evals[8]
    assert result.eval_loss == evals[8]  # the last step's, as without keep_best
    # Training stopped at the best step (same seed, schedule and data order) saves exactly
    # the same tensors; training on to the end saves others.
    stopped = dataclasses.replace(KEEP_BEST, max_steps=BEST_STEP, keep_best=False)
    to_the_end = dataclasses.replace(KEEP_BEST, keep_best=False)
    assert _plain_run(tiny_model_dir, tmp_path / "stopped", stopped).best_step is None
    _plain_run(tiny_model_dir, tmp_path / "end", to_the_end)
    best, at_best = _weights(tmp_path / "best"), _weights(tmp_path / "stopped")
    assert best.keys() == at_best.keys()
    assert all(torch.equal(best[k], at_best[k]) for k in best)
    last = _weights(tmp_path / "end")
    assert any(not torch.allclose(best[k], last[k]) for k in best)


def test_keep_best_survives_a_worker_killed_after_the_best_step(ray_instance, tiny_model_dir,
                                                                tmp_path):
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, finetune_adapter

    def kill_rank1_at_step7(rank: int, step: int, resumed: bool) -> None:
        if rank == 1 and step == BEST_STEP + 1 and not resumed:
            import ray.train

            ray.train.get_all_reported_checkpoints()  # the step-6 checkpoint is registered
            os.kill(os.getpid(), signal.SIGKILL)

    train = dataclasses.replace(KEEP_BEST, grad_accumulation=1)  # x 2 workers
    result = finetune_adapter(
        tiny_model_dir, ROWS, tmp_path / "adapter", LORA, train, eval_dataset=UNRELATED,
        deepspeed=DeepSpeedSettings(zero_stage=3, param_persistence_threshold=0),
        scaling=ScalingSettings(num_workers=2), storage_path=tmp_path / "runs",
        max_failures=1, step_hook=kill_rank1_at_step7)
    # Resumed at the best step: the restarted rank 0 read the best adapter back from the
    # checkpoint, and the final report saved it (step 8 did not improve on it).
    assert result.attempts == 2 and result.resumed_from == [BEST_STEP]
    evals = {h["step"]: h["eval_loss"] for h in result.history}
    assert sorted(evals) == [2, 4, 6, 8]  # the history stays full
    assert result.best_step == BEST_STEP and result.best_eval_loss == evals[BEST_STEP]
    assert result.eval_loss == evals[8] > evals[BEST_STEP]
    # The adapter is the plain loop's at the best step, not at the last.
    at_best = dataclasses.replace(KEEP_BEST, max_steps=BEST_STEP, keep_best=False)
    plain = _plain_run(tiny_model_dir, tmp_path / "plain_best", at_best)
    assert result.best_eval_loss == pytest.approx(plain.eval_loss, rel=1e-4)
    _plain_run(tiny_model_dir, tmp_path / "plain_end", dataclasses.replace(KEEP_BEST,
                                                                          keep_best=False))
    saved = LoraAdapter.open(result.adapter_dir)
    best, last = LoraAdapter.open(tmp_path / "plain_best"), LoraAdapter.open(tmp_path / "plain_end")
    for name in saved.module_names:
        delta = saved.module(name).delta()
        torch.testing.assert_close(delta, best.module(name).delta(), rtol=1e-3, atol=1e-6)
    assert any(not torch.allclose(saved.module(n).delta(), last.module(n).delta(),
                                  rtol=1e-3, atol=1e-6) for n in saved.module_names)
