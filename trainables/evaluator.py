"""The resident evaluators of a study: long-lived Ray actors, one per evaluation slot, each
holding the base model and tokenizer once (`soups.evaluation.resident.ResidentModel`). Trials (and
the test-split evaluation) send them candidates; candidates that arrive together and ask for the
same split are evaluated side by side, rows of one batch using different adapters.

A candidate travels as its adapter's files (bytes), so an evaluator on another node needs no
shared storage. An evaluator that dies (its node lost, its process killed) is restarted by
Ray, which loads the base again and reruns the calls it had in hand; the trial logs its
metrics after the call returns, so nothing is scored twice in MLflow.

A trial scores its candidate through `evaluate_candidate` / `score_validation` (below): by
these evaluators, or in the trial's own process when the study runs none.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from soups.evaluation.evaluate import records_jsonl
from soups.names import BUILD_SECONDS, EVAL_SECONDS, OBJECTIVE, VALIDATION, task_metric
from trainables.file_tree import read_tree, write_tree
from trainables.placement import on_cluster
from trainables.trial_context import TrialContext

ACTOR_PREFIX = "soups-evaluator"
# How long an evaluator waits for more candidates before it starts a batch: trials that
# finish building at nearly the same time share one pass over the prompts.
GATHER_SECONDS = 0.5
# The driver holds each evaluator's handle while the study runs: a named actor that is not
# detached lives as long as a handle of its creator does (and dies with the driver).
_HANDLES: dict[str, object] = {}


@dataclass(frozen=True)
class Candidate:
    """What a trial asks an evaluator: this adapter (None: the base model alone) on these
    tasks at this split, the first `limit` rows of each."""

    files: dict[str, bytes] | None  # relative path -> content of the adapter folder
    split: str
    tasks: tuple[str, ...]
    limit: int | None

    @property
    def batch_key(self) -> tuple:
        return self.split, self.tasks, self.limit


def adapter_files(adapter: str | Path | None) -> dict[str, bytes] | None:
    return read_tree(adapter) if adapter is not None else None


class Evaluator:
    """The actor (`ray.remote(Evaluator)`, see `start_evaluators`): `evaluate(candidate)`
    returns `{"metrics": {...}, "records": {task: jsonl}}` for that candidate."""

    def __init__(self, model_dir: str, tasks: dict, evaluation: dict):
        from soups.evaluation.resident import ResidentModel  # lazy: torch

        self.tasks, self.evaluation = tasks, evaluation
        self.resident = ResidentModel(model_dir, evaluation["device"], evaluation["dtype"])
        self.side_by_side = int(evaluation["side_by_side"])
        self.pending: list[tuple[Candidate, asyncio.Future]] = []
        self.draining = False
        self.in_progress = 0
        self.evaluated = 0

    async def evaluate(self, candidate: Candidate) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((candidate, future))
        if not self.draining:
            self.draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def info(self) -> dict:
        """For monitoring and tests: the process, its load time, the work in hand."""
        return {"pid": os.getpid(), "load_seconds": self.resident.load_seconds,
                "in_progress": self.in_progress, "pending": len(self.pending),
                "evaluated": self.evaluated}

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await asyncio.sleep(GATHER_SECONDS)
                key = self.pending[0][0].batch_key
                batch = [p for p in self.pending if p[0].batch_key == key][:self.side_by_side]
                for item in batch:
                    self.pending.remove(item)
                self.in_progress = len(batch)
                try:
                    results = await loop.run_in_executor(
                        None, self._evaluate_together, [c for c, _ in batch])
                except Exception as err:  # every candidate of the batch gets the error
                    for _, future in batch:
                        future.set_exception(err)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        future.set_result(result)
                    self.evaluated += len(batch)
                finally:
                    self.in_progress = 0
        finally:
            self.draining = False

    def _evaluate_together(self, candidates: list[Candidate]) -> list[dict]:
        return evaluate_together(self.resident, self.tasks, self.evaluation, candidates)


def evaluate_together(resident, tasks: dict, evaluation: dict,
                      candidates: list[Candidate]) -> list[dict]:
    """Candidates (same split, tasks and limit) side by side on `resident`, task by task:
    one `{"metrics", "records"}` per candidate."""
    from soups.evaluation.resident import evaluate_side_by_side  # lazy: torch

    first = candidates[0]
    out = [{"metrics": {}, "records": {}} for _ in candidates]
    with tempfile.TemporaryDirectory(prefix="soups-candidates-") as tmp:
        adapters = [_write_adapter(c.files, Path(tmp) / str(i))
                    for i, c in enumerate(candidates)]
        for task in first.tasks:
            data = tasks[task]
            rows = data.rows(first.split, first.limit)
            if not rows:
                continue  # a skill without rows at this split
            scores = evaluate_side_by_side(
                resident, adapters, task, rows, data.eval_prompts(rows),
                data.generation(evaluation), data.scorer(), evaluation["sandbox"])
            for result, score in zip(out, scores, strict=True):
                result["metrics"].update(score.metrics(first.split))
                result["metrics"][task_metric(first.split, task, EVAL_SECONDS)] = score.seconds
                result["records"][task] = records_jsonl(score.records)
    return out


def _write_adapter(files: dict[str, bytes] | None, folder: Path) -> str | None:
    if files is None:
        return None
    write_tree(files, folder)
    return str(folder)


def evaluator_names(study: str, count: int) -> tuple[str, ...]:
    return tuple(f"{ACTOR_PREFIX}-{study}-{i}" for i in range(count))


def start_evaluators(study: str, model_dir: str, tasks: dict, evaluation: dict,
                     worker_resources: dict[str, float] | None = None,
                     driver_resource: str = "", log=print) -> tuple[str, ...]:
    """Start the study's evaluators (named actors, alive while this driver is) and wait
    until each holds the base model; returns their names, for the trials."""
    import ray  # lazy: ray

    names = evaluator_names(study, int(evaluation["evaluators"]))
    cpus = evaluation["evaluator_cpus"]
    if on_cluster(driver_resource):
        cpus = max(cpus, 1)  # the head offers no CPU (cluster.yaml): never there
    actor = ray.remote(Evaluator)
    options = {"num_cpus": cpus, "num_gpus": evaluation["evaluator_gpus"],
               "resources": dict(worker_resources or {}), "max_restarts": -1,
               "max_task_retries": -1, "max_concurrency": 64, "get_if_exists": True}
    start = time.perf_counter()
    handles = [actor.options(name=name, **options).remote(model_dir, tasks, evaluation)
               for name in names]
    _HANDLES.update(zip(names, handles, strict=True))
    infos = ray.get([h.info.remote() for h in handles])
    log(f"evaluators: {len(names)} holding the base model (loaded in "
        f"{max(i['load_seconds'] for i in infos):.1f} s; ready in "
        f"{time.perf_counter() - start:.0f} s)")
    return names


def stop_evaluators(names: tuple[str, ...]) -> None:
    import ray  # lazy: ray

    for name in names:
        handle = _HANDLES.pop(name, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)


def evaluate_remote(names: tuple[str, ...], key: str, adapter: str | Path | None,
                    split: str, tasks, limit: int | None) -> dict:
    """A candidate evaluated by one of the study's evaluators (chosen by `key`, so a
    trial's retries go to the same one)."""
    import ray  # lazy: ray

    index = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(names)
    handle = ray.get_actor(names[index])
    candidate = Candidate(adapter_files(adapter), split, tuple(tasks), limit)
    return ray.get(handle.evaluate.remote(candidate))


# A trial's candidate scored ------------------------------------------------------------

def evaluate_candidate(ctx: TrialContext, adapter: str | None, split: str, tasks,
                       limit: int | None, records_dir: Path | None = None) -> dict[str, float]:
    """Scores of base model + adapter on `tasks` (names) at `split`, as flat metrics, by one
    of the study's resident evaluators (above), or in this process when
    the study has none. Each task's answers go to `records_dir/<split>/<task>.jsonl` when
    given; a task with no rows at `split` (a skill without validation rows) is left out."""
    if ctx.evaluators:
        result = evaluate_remote(ctx.evaluators, f"{split}:{adapter}", adapter, split,
                                 tasks, limit)
    else:
        result = _evaluate_here(ctx, adapter, split, tasks, limit)
    if records_dir is not None:
        for task, lines in result["records"].items():
            out = Path(records_dir) / split / f"{task}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(lines)
    return result["metrics"]


def _evaluate_here(ctx: TrialContext, adapter: str | None, split: str, tasks,
                   limit: int | None) -> dict:
    """The evaluators' work for one candidate, in this process (the base loaded here)."""
    from soups.evaluation.resident import ResidentModel  # lazy: torch

    resident = ResidentModel(ctx.model_dir, ctx.evaluation["device"], ctx.evaluation["dtype"])
    candidate = Candidate(adapter_files(adapter), split, tuple(tasks), limit)
    return evaluate_together(resident, ctx.tasks, ctx.evaluation, [candidate])[0]


def generation_params(ctx: TrialContext) -> dict:
    """Every task's generation and scoring settings, for the trial's MLflow parameters."""
    return {task: {"generation": data.generation(ctx.evaluation).params(),
                   "scorer": asdict(data.scorer())} for task, data in ctx.tasks.items()}


def score_validation(ctx: TrialContext, adapter: str | None, build_seconds: float,
                     records_dir: Path | None = None) -> dict:
    """The trial's metrics: validation scores on the target (the objective) and, unless
    turned off, on every skill (retention), plus the time it took to build the candidate."""
    tasks = [ctx.target, *(ctx.skills if ctx.evaluation["skills"] else ())]
    metrics = evaluate_candidate(ctx, adapter, VALIDATION, tasks,
                                 ctx.evaluation["validation_limit"], records_dir)
    metrics[OBJECTIVE] = metrics[task_metric(VALIDATION, ctx.target)]
    metrics[BUILD_SECONDS] = build_seconds
    return metrics
