"""The resident evaluators (trainables/evaluator.py) on a local Ray instance: the scores of a
candidate equal the in-process evaluation's; candidates that arrive together are evaluated
side by side with the same answers; an evaluator killed mid-candidate is restarted, the
candidate redone, and the Tune trial that asked for it ends with one FINISHED MLflow run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import real_schemas

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


def _adapter(model_dir: str, out, seed: int, targets=("q_proj", "v_proj")) -> str:
    """A LoRA of the tiny model whose B factors are random (PEFT starts them at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from soups.tasks.task_data import TaskData
    from soups.tasks.task_spec import TaskSpec
    from study.spec import Evaluation

    folder = tmp_path_factory.mktemp("evaluator")
    path = real_schemas.gsm8k(folder / "gsm8k.parquet", n=24)
    spec = TaskSpec(source=str(path), preset="soups_qa", columns={"answer": "answer"},
                    expected="answer", carve={"sizes": {"validation": 12, "test": 12}},
                    generation={"max_new_tokens": 24},
                    scorer={"kind": "number", "extract": "hashes"})
    tasks = {"gsm8k": TaskData("gsm8k", spec, spec.source)}
    evaluation = {**Evaluation(device="cpu").model_dump(), "evaluator_gpus": 0}
    adapters = [_adapter(tiny_model_dir, folder / f"a{i}", seed=i) for i in range(2)]
    return tasks, evaluation, adapters


def _context(model_dir, tasks, evaluation, evaluators=(), **tracking):
    from trainables.trial_context import TrialContext

    return TrialContext(study="ev", experiment_id=tracking.get("experiment", "0"),
                        tracking_uri=tracking.get("uri", ""),
                        parent_run_id=tracking.get("parent", ""), model_dir=model_dir,
                        skills=(), target="gsm8k", tasks=tasks, adapters={},
                        evaluation=evaluation, cat={}, evaluators=evaluators)


def test_evaluators_score_as_the_in_process_path_side_by_side(ray_instance, tiny_model_dir,
                                                              setup, tmp_path):
    import ray

    from trainables.evaluator import (
        evaluate_candidate,
        evaluate_remote,
        start_evaluators,
        stop_evaluators,
    )

    tasks, evaluation, adapters = setup
    here = _context(tiny_model_dir, tasks, evaluation)
    expected = [evaluate_candidate(here, a, "validation", ["gsm8k"], None, tmp_path / str(i))
                for i, a in enumerate([None, *adapters])]
    names = start_evaluators("ev-a", tiny_model_dir, tasks, evaluation, log=lambda _: None)
    try:
        # Three candidates at once: one batch, rows of each batch from different adapters.
        refs = [ray.get_actor(names[0]).evaluate.remote(_candidate(a)) for a in
                [None, *adapters]]
        together = ray.get(refs)
        info = ray.get(ray.get_actor(names[0]).info.remote())
        alone = evaluate_remote(names, "x", adapters[0], "validation", ["gsm8k"], None)
    finally:
        stop_evaluators(names)
    for want, got in zip(expected, together, strict=True):
        assert _scores(got["metrics"]) == _scores(want)
    assert _scores(alone["metrics"]) == _scores(expected[1])
    assert together[1]["records"] == alone["records"]
    assert info["evaluated"] == 3


def _candidate(adapter):
    from trainables.evaluator import Candidate, adapter_files

    return Candidate(adapter_files(adapter), "validation", ("gsm8k",), None)


def _scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


def test_a_killed_evaluator_is_restarted_and_the_trial_finishes_once(
        ray_instance, tiny_model_dir, setup, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from trainables import tracking
    from trainables.evaluator import start_evaluators, stop_evaluators
    from trainables.merge_trial import merge_trial

    tasks, evaluation, _ = setup
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri)
    experiment = tracking.experiment_id("ev")
    names = start_evaluators("ev-b", tiny_model_dir, tasks, evaluation, log=lambda _: None)
    killed: list[int] = []

    def kill_mid_candidate() -> None:
        handle = ray.get_actor(names[0])
        deadline = time.time() + 120
        while time.time() < deadline:
            info = ray.get(handle.info.remote())
            if info["in_progress"]:
                os.kill(info["pid"], signal.SIGKILL)
                killed.append(info["pid"])
                return
            time.sleep(0.05)

    try:
        with tracking.tracked_run(experiment, "ev:parent", "ev", "parent", "ev") as parent:
            context = _context(tiny_model_dir, tasks, evaluation, names, uri=uri,
                               experiment=experiment, parent=parent)
            killer = threading.Thread(target=kill_mid_candidate, daemon=True)
            killer.start()
            tuner = tune.Tuner(
                tune.with_parameters(merge_trial, context=context),
                param_space={"variant": {"method": "base", "rank": None, "params": {}}},
                run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
            (result,) = list(tuner.fit())
            killer.join(timeout=5)
        after = ray.get(ray.get_actor(names[0]).info.remote())
    finally:
        stop_evaluators(names)
    assert killed, "the evaluator was never seen working"
    assert after["pid"] != killed[0]  # a new process, holding the base model again
    assert result.error is None and "objective" in result.metrics
    runs = [r for r in MlflowClient(uri).search_runs([experiment])
            if r.data.tags.get("soups.role") == "trial"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["objective"] == result.metrics["objective"]
