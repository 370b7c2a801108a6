"""Running a study end to end, as a recipe of its stages:

1. check and register the study (`study/registry.py`), open its MLflow parent run;
2. resolve its inputs (`study/resolve.py`): base model, task data, search space, ranks;
3. stage 1 (`study/stage1.py`): every skill LoRA and the DATA-MIX LoRA, through the cache;
4. stage 2 (`trainables/tuner.py`): the Ray Tune search, one trial per candidate;
5. selection (`study/selection.py`): the leaderboard (with several seeds one row per
   candidate over its seeds, `study/seeds.py`), the test split once for the best;
6. export (`study/export.py`): the best adapter as a PEFT folder, registered in MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from soups.home import TRACKING_ENV
from soups.names import (
    BEST_METHOD_TAG,
    BEST_OBJECTIVE,
    BEST_OBJECTIVE_STDERR,
    BEST_TEST_ACCURACY,
    BEST_TEST_STDERR,
    BEST_TRIAL_TAG,
    DECONTAMINATED,
    OBJECTIVE,
    ROLE_PARENT,
    WALL_SECONDS,
    data_metric,
)
from study import mlflow_links
from study.cluster import preflight
from study.console import active, say
from study.export import export_best, record_prompt_format
from study.layout import BEST_DIR, LEADERBOARD_FILE, SPEC_FILE, TUNE_DIR, study_dir
from study.mlflow_links import trials_view
from study.registry import check_study, register_study
from study.resolve import data_report, resolve_base_model, resolve_tasks, stage1_needs
from study.seeds import candidate_rows, exported_trial, shown, stderr_key
from study.selection import (
    evaluate_test_split,
    evaluate_test_split_of_all,
    leaderboard,
    print_leaderboard,
)
from study.spec import StudySpec
from study.stage1 import stage1
from trainables import tracking
from trainables.evaluator import generation_params, start_evaluators, stop_evaluators
from trainables.trial_context import TrialContext
from trainables.tuner import fit

# Library warnings and weight-loading bars of every trial process are silenced; worker
# output still reaches the driver (fine-tune loss lines and step bars).
QUIET_WORKERS = {"PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _start_ray(spec: StudySpec, tracking_uri: str) -> None:
    import ray  # lazy: ray

    if not ray.is_initialized():
        ray.init(address=spec.cluster.address,
                 runtime_env={"env_vars": {TRACKING_ENV: tracking_uri,
                                           **QUIET_WORKERS}},
                 include_dashboard=False, log_to_driver=True)
    if active() is not None:  # worker lines to the study's log, step bars to the terminal
        active().route_ray_logs()


def _log_data(parent: str, report: dict, tasks: dict, log) -> None:
    """Each task's data fingerprint and row counts to the parent run, and each role's rows
    as an MLflow dataset; decontamination said."""
    for name, data in tasks.items():
        source = data.location if data.spec.generated else data.spec.source
        for role, n in report[name]["rows"].items():
            if n:
                tracking.log_dataset(parent, name, data.rows(role), source, role)
    tracking.log_params(parent, {"data": {task: r["fingerprint"] for task, r in report.items()}})
    metrics = {}
    for task, r in report.items():
        metrics.update({data_metric(task, f"{role}_rows"): n for role, n in r["rows"].items()})
        metrics[data_metric(task, DECONTAMINATED)] = r["decontaminated"]
    tracking.log_metrics(parent, metrics)
    removed = {task: r["decontaminated"] for task, r in report.items() if r["decontaminated"]}
    if removed:
        log("decontamination: removed " + ", ".join(f"{n} {task} train rows" for task, n
                                                    in removed.items())
            + " that are target validation or test rows")


def _evaluation(spec: StudySpec) -> dict:
    """The `evaluation` section as trials read it, the evaluators' GPUs resolved."""
    evaluation = spec.evaluation.model_dump()
    if evaluation["evaluator_gpus"] is None:
        evaluation["evaluator_gpus"] = spec.search.gpus_per_trial
    return evaluation


def run_study(spec: StudySpec, resume: bool = False, log=print) -> list[dict]:
    """Run (or resume) a study end to end; returns the leaderboard rows."""
    root = study_dir(spec)
    space, uri = check_study(spec, resume)
    spec = register_study(spec, resume)
    tracking.configure(uri)
    experiment = tracking.experiment_id(spec.tracking.experiment or spec.name)
    tracking.set_experiment_tags(experiment, trials_view(spec.target_name))
    started = time.time()
    with tracking.tracked_run(experiment, f"{spec.name}:parent", spec.name, ROLE_PARENT,
                              spec.name, tags=tracking.environment_tags()) as parent:
        tracking.log_params(parent, {"study": spec.model_dump(mode="json")})
        tracking.log_artifact(parent, root / SPEC_FILE)
        tracking.log_artifact(parent, Path(space.source))
        _start_ray(spec, uri)
        preflight(spec, root, log)  # the sandbox on every node; shared storage (multi-node)

        model_dir = resolve_base_model(spec, log)
        tasks = resolve_tasks(spec, model_dir)
        record_prompt_format(tasks, root)
        _log_data(parent, data_report(tasks), tasks, log)
        ranks = space.ranks(spec.finetune.ranks)
        needs_loras, needs_data_mix = stage1_needs(space)
        adapters = (stage1(spec, model_dir, tasks, ranks, needs_data_mix, uri, experiment,
                           parent, log) if needs_loras else {})

        evaluation = _evaluation(spec)
        evaluators = (start_evaluators(spec.name, str(model_dir), tasks, evaluation,
                                       dict(spec.cluster.worker_resources),
                                       spec.cluster.driver_resource, log)
                      if spec.evaluation.resident else ())
        context = TrialContext(
            study=spec.name, experiment_id=experiment, tracking_uri=uri, parent_run_id=parent,
            model_dir=str(model_dir), skills=tuple(spec.skills), target=spec.target_name,
            tasks=tasks, adapters=adapters, evaluation=evaluation,
            cat=spec.cat.model_dump(), seed=spec.search.seed,
            stage1_seed=spec.finetune.seed, evaluators=evaluators,
            finetune_lora=spec.finetune.lora_settings(1),
            finetune_train=spec.finetune.train_settings())
        # Every task's generation and scoring settings: the same for every trial, so logged
        # once here, not on each trial run (whose parameters are what it varies).
        tracking.log_params(parent, {"task": generation_params(context)})
        try:
            results = fit(spec.search, spec.cat, spec.cluster, space, ranks, context,
                          root / TUNE_DIR, resume, log, say)
            rows = leaderboard(results)
            if len(spec.stage1_seeds) > 1:  # one row per candidate, over its seeds
                rows = candidate_rows(rows)
            best = next((r for r in rows if r[OBJECTIVE] is not None), None)
            if best is None:
                raise RuntimeError(f"study {spec.name}: no trial finished; see "
                                   f"{root / TUNE_DIR}")
            best["test"] = evaluate_test_split(spec, context, best, parent, log)
            if spec.evaluation.test_all:
                evaluate_test_split_of_all(spec, context, rows, best, log)
        finally:
            stop_evaluators(evaluators)
        exported = exported_trial(best)  # the best itself, or its best seed
        export_best(spec, exported, root, model_dir, log)
        tracking.log_metrics(parent, {BEST_OBJECTIVE: best[OBJECTIVE],
                                      BEST_TEST_ACCURACY: best["test"],
                                      WALL_SECONDS: time.time() - started})
        spread = {BEST_OBJECTIVE_STDERR: best.get(stderr_key(OBJECTIVE)),
                  BEST_TEST_STDERR: best.get(stderr_key("test"))}
        tracking.log_metrics(parent, {k: v for k, v in spread.items() if v is not None})
        tracking.set_tags(parent, {BEST_TRIAL_TAG: exported["trial"],
                                   BEST_METHOD_TAG: best["method"]})
        (root / LEADERBOARD_FILE).write_text(json.dumps(rows, indent=2, default=str))
        tracking.log_artifact(parent, root / LEADERBOARD_FILE)
    print_leaderboard(rows, spec.target_name, log)
    counted = (f"{len(rows)} candidates x {len(spec.stage1_seeds)} seeds"
               if len(spec.stage1_seeds) > 1 else f"{len(rows)} trials")
    took = f"{time.time() - started:.0f} s" + (" (this run, which resumed it)" if resume else "")
    log(f"\nstudy {spec.name}: {counted} in {took}; best "
        f"{best['candidate']} (validation {shown(best, OBJECTIVE)}, test "
        f"{shown(best, 'test')}); adapter in {root / BEST_DIR}")
    log(next_steps(spec.name, uri, experiment))
    return rows


def next_steps(name: str, uri: str, experiment: str) -> str:
    """What a user does with a finished study: the last lines `soups run` prints."""
    ui = mlflow_links.ui_base(uri)
    serve = ("" if uri.startswith(("http://", "https://"))
             else f"\n  (serve it first: {mlflow_links.ui_command(uri)})")
    steps = [(f"soups report {name}", "an HTML report of every candidate"),
             (f"soups export {name} --out DIR", "the best adapter as a PEFT folder")]
    width = max(len(command) for command, _ in steps) + 3
    lines = [f"  {command:<{width}}{what}" for command, what in steps]
    return ("\nnext:\n" + "\n".join(lines) + "\n  MLflow UI, the trials best first: "
            f"{mlflow_links.runs_table_url(ui, experiment)}{serve}")
