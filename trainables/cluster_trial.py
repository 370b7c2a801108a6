"""The Ray Tune trial on a cluster: a driver on the head, its work on a worker node.

On a cluster (cluster.yaml) each trial is a thin driver pinned to the head by a custom
resource (`soups_driver`, which only the head offers): it owns the trial's MLflow run,
reports to Tune and saves the checkpoint, next to the MLflow server. The work - building the
candidate (a merge, CAT weight training, a stage-1 adapter) and scoring it on the validation
splits, the same functions as `merge_trial` - runs as a Ray task on a worker node, with the
trial's CPU / GPU request and the study's worker resources, spread over the nodes.

When a worker node is lost, the driver survives (it is on the head) and starts the work
again on another node, up to `node_retries` times: Tune sees one trial, MLflow one run that
ends FINISHED (with a `soups.node_losses` tag), and only the lost attempt's time is wasted.
An error in the work itself (a bug, a bad parameter) is not retried here: it fails the trial,
and Tune retries it `max_failures` times, as for a local trial.

The work is a Ray generator task: CAT's intermediate results stream back as it trains (for
ASHA and the MLflow loss curve), then the metrics and the checkpoint files (the adapter is
tens of MB for real models, fine for the object store). A restarted attempt reports only CAT
steps beyond those already reported, so Tune and MLflow see each step once.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from soups.names import DRIVER_TAG, LOSS_TAG, NODE_TAG, progress_step
from trainables import tracking
from trainables.evaluator import score_validation
from trainables.file_tree import read_tree, write_tree
from trainables.trial_context import ADAPTER_DIR, GENERATIONS_DIR, TrialContext
from trainables.trial_run import TrialRun, build_candidate, candidate_artifacts, trial_run


def node_loss_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean the work's node or process went away, not that the work failed."""
    from ray import exceptions  # lazy: ray

    return (exceptions.NodeDiedError, exceptions.WorkerCrashedError,
            exceptions.ObjectLostError, exceptions.OutOfMemoryError)


def trial_work(context: TrialContext, variant: dict) -> Iterator[dict]:
    """Runs on a worker node (a Ray generator task). Yields `{"node": id}` first, then
    `{"progress": metrics}` per CAT evaluation, then `{"result": {...}}` with the validation
    metrics, the checkpoint files and the artifacts, as bytes keyed by relative path."""
    import ray  # lazy: ray

    yield {"node": ray.get_runtime_context().get_node_id()}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / ADAPTER_DIR
        events: queue.Queue = queue.Queue()

        # The builder reports through a callback; a thread turns the calls into yields.
        def build() -> None:
            try:
                events.put(("built", build_candidate(
                    context, variant, out_dir, lambda m: events.put(("progress", dict(m))))))
            except BaseException as err:  # re-raised in the task, below
                events.put(("error", err))

        threading.Thread(target=build, daemon=True).start()
        while True:
            kind, value = events.get()
            if kind == "progress":
                yield {"progress": value}
            elif kind == "error":
                raise value
            else:
                adapter, build_seconds = value
                break
        generations = Path(tmp) / GENERATIONS_DIR
        metrics = score_validation(context, adapter, build_seconds, generations)
        files = read_tree(Path(adapter), ADAPTER_DIR) if adapter is not None else {}
        artifacts = {name: path.read_bytes()
                     for name, path in candidate_artifacts(variant, out_dir, Path(tmp),
                                                          context.skills).items()}
        artifacts.update(read_tree(generations, GENERATIONS_DIR))
        yield {"result": {"metrics": metrics, "files": files, "artifacts": artifacts}}


def cluster_trial(config: dict, context: TrialContext, work_options: dict,
                  node_retries: int) -> None:
    """Ray Tune function trainable (the driver): `tune.with_parameters(cluster_trial,
    context=..., work_options=..., node_retries=...)` with the driver resource. `work_options`
    are Ray task options for the work (num_cpus, num_gpus, resources)."""
    import ray  # lazy: ray

    variant = config["variant"]
    work = ray.remote(trial_work).options(scheduling_strategy="SPREAD", max_retries=0,
                                          **work_options)
    driver_node = {DRIVER_TAG: ray.get_runtime_context().get_node_id()}
    with trial_run(context, variant, tags=driver_node) as run:
        reported: dict = {"step": -1, "other": []}
        nodes: list[str] = []
        result = None
        for attempt in range(node_retries + 1):
            try:
                for ref in work.remote(context, variant):
                    event = ray.get(ref)
                    if "node" in event:
                        nodes.append(event["node"])
                        tracking.set_tags(run.run_id, {NODE_TAG: ",".join(nodes)})
                    elif "progress" in event:
                        _report_progress(run, event["progress"], reported)
                    else:
                        result = event["result"]
                break
            except node_loss_errors() as err:
                tracking.set_tags(run.run_id, {LOSS_TAG: attempt + 1})
                print(f"trial {run.name}: its work was lost with its node "
                      f"({type(err).__name__}); attempt {attempt + 2} of {node_retries + 1}",
                      flush=True)
                if attempt == node_retries:
                    raise
            except ray.exceptions.RayTaskError as err:
                raise err.as_instanceof_cause() from None
        received = run.work_dir / "received"
        write_tree(result["files"], received)
        write_tree(result["artifacts"], received / "artifacts")
        adapter = received / ADAPTER_DIR if result["files"] else None
        # Top-level names: a file, or a folder of them (the generations) logged as one.
        tops = dict.fromkeys(name.split("/")[0] for name in result["artifacts"])
        artifacts = {name: received / "artifacts" / name for name in tops}
        run.finish(result["metrics"], adapter, artifacts, {"nodes": nodes})


def _report_progress(run: TrialRun, metrics: dict, reported: dict) -> None:
    """Log and report a CAT result, unless a lost attempt already did (same step)."""
    step = progress_step(metrics)
    if step is not None:
        if step <= reported["step"]:
            return
        reported["step"] = step
    elif metrics in reported["other"]:
        return
    else:
        reported["other"].append(metrics)
    run.progress(metrics)
