"""Running a study: resolve the base model and tasks, stage 1 (skill and DATA-MIX LoRAs via
the adapter cache), stage 2 (Ray Tune trials), selection, one test evaluation, export.

All state lives under `$SOUPS_HOME/<name>/` (or `storage`): `study.yaml` (the resolved
spec), `tune/` (Ray Tune's experiment, restorable), `leaderboard.json`, `best_adapter/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from study.spec import EMBEDDED, SpecError, StudySpec
from trainables import tracking
from trainables.merge_trial import ADAPTER_DIR, TRIAL_FILE, TaskData, TrialContext

SPEC_FILE = "study.yaml"
TUNE_DIR = "tune"
LEADERBOARD_FILE = "leaderboard.json"
BEST_DIR = "best_adapter"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
ADAPTER_METHODS_NEED = {"skill", "data_mix", "cat_learned"}  # plus every merge method


def study_dir(spec: StudySpec) -> Path:
    from soups.home import soups_home

    return Path(spec.storage).resolve() / spec.name if spec.storage else soups_home() / spec.name


def tracking_uri(spec: StudySpec) -> str:
    """Where the study logs, by precedence: its `tracking.uri`, else $MLFLOW_TRACKING_URI
    (MLflow's own convention), else an SQLite database under $SOUPS_HOME."""
    from soups.home import soups_home
    from study.spec import Tracking, parse_model

    if spec.tracking.uri:
        return spec.tracking.uri
    env = os.environ.get(TRACKING_ENV)
    if env:  # checked as a study's own uri would be (a relative sqlite path is refused)
        return parse_model(Tracking, {"uri": env}, f"${TRACKING_ENV}").uri
    home = soups_home()
    home.mkdir(parents=True, exist_ok=True)
    return tracking.default_tracking_uri(home)


def register_study(spec: StudySpec, resume: bool = False) -> StudySpec:
    """Save the study's resolved spec in its folder, and, when its `storage` lies
    elsewhere, under $SOUPS_HOME/NAME too, so every command finds the study by name. The
    tracking URI chosen now (`tracking_uri`) is written into the saved spec: a resume, a
    status or a report reads the same store whatever its environment. Returns the spec as
    saved."""
    files = _spec_files(spec)
    if not resume:
        _refuse_taken(spec)
        if not spec.tracking.uri:
            pinned = spec.tracking.model_copy(update={"uri": tracking_uri(spec)})
            spec = spec.model_copy(update={"tracking": pinned})
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    return spec


def method_parameters(name: str) -> set[str] | None:
    """Parameters a trial kind or merge method declares (the search-space check)."""
    from soups.merge import method_parameters as merge_parameters

    trial_kinds = {
        "base": set(), "skill": {"skill"}, "data_mix": set(),
        "cat_learned": {"granularity", "normalisation", "init", "init_values", "learning_rate",
                        "max_steps", "micro_batch_size", "warmup_steps", "eval_every",
                        "fraction", "held_out"},
    }
    if name in trial_kinds:
        return trial_kinds[name]
    return merge_parameters(name)


def load_search_space(spec: StudySpec):
    from search_spaces import load_space

    return load_space(spec.search.space, method_parameters)


def resolve_base_model(spec: StudySpec, log=print) -> str:
    if spec.base_model != EMBEDDED:
        return spec.base_model
    from soups.base_model import BaseModelSettings, build_base_model
    from soups.home import cache_dir

    settings = BaseModelSettings(seed=spec.base_model_seed)
    if spec.base_model_steps:
        settings = replace(settings, steps=spec.base_model_steps)
    return str(build_base_model(cache_dir("base_models"), settings, log=log))


def resolve_tasks(spec: StudySpec) -> dict[str, TaskData]:
    generated = {n: t for n, t in spec.tasks().items() if t.source == "generated"}
    out: dict[str, TaskData] = {}
    if generated:
        from soups.data import DataSettings, build_task_datasets
        from soups.home import cache_dir

        settings = spec.generated.model_dump(exclude_none=True)
        data_dir = build_task_datasets(cache_dir("datasets"), DataSettings(**settings))
        for name in generated:
            if not (data_dir / name).exists():
                raise SpecError(f"task {name!r} has source 'generated' but the generator "
                                "makes only math, code and math_code")
    for name, task in spec.tasks().items():
        if task.source == "generated":
            out[name] = TaskData(str(data_dir / name), dict(task.splits))
        else:
            mapping = {"prompt": task.prompt, "completion": task.completion,
                       "expected": task.expected, "scorer": task.scorer}
            out[name] = TaskData(task.source, dict(task.splits), mapping)
    return out


def needed_ranks(spec: StudySpec, space) -> list[int]:
    from search_spaces import Domain

    if space.rank is None:
        return list(spec.finetune.ranks)
    if isinstance(space.rank, Domain):
        if space.rank.kind not in ("grid", "choice"):
            raise SpecError(f"{space.source}: rank must be a constant, grid or choice (stage 1 "
                            "trains every rank before the search)")
        return [int(r) for r in space.rank.values]
    return [int(space.rank)]


def stage1(spec: StudySpec, model_dir: str, tasks: dict[str, TaskData], ranks: list[int],
           need_data_mix: bool, experiment: str, parent_run_id: str, log=print
           ) -> dict[str, dict[str, str]]:
    """Every (skill, rank) LoRA and the DATA-MIX LoRA per rank, through the adapter cache:
    trained once, reused by every trial and every later study with the same inputs."""
    from soups.data import FieldMapping, load_task_dataset
    from soups.data_mix import mix_datasets
    from soups.home import cache_dir
    from soups.train_settings import LoraSettings, TrainSettings
    from trainables.finetune import DeepSpeedSettings, ScalingSettings, cached_finetune

    ft = spec.finetune

    def rows(name: str, split: str):
        task = tasks[name]
        mapping = FieldMapping(**task.mapping) if task.mapping else None
        return load_task_dataset(task.source, task.splits[split], mapping)

    train_sets = {s: rows(s, "train") for s in spec.skills}
    eval_sets = {s: rows(s, "validation").select(range(min(64, len(rows(s, "validation")))))
                 for s in spec.skills}
    if need_data_mix:
        train_sets["data_mix"] = mix_datasets({s: train_sets[s] for s in spec.skills},
                                              {s: 1.0 for s in spec.skills}, seed=ft.seed)
        eval_sets["data_mix"] = mix_datasets({s: eval_sets[s] for s in spec.skills},
                                             {s: 1.0 for s in spec.skills}, seed=ft.seed)
    adapters: dict[str, dict[str, str]] = {}
    for rank in ranks:
        lora = LoraSettings(rank=rank, alpha=ft.alpha_ratio * rank, dropout=ft.dropout,
                            target_modules=tuple(ft.target_modules))
        train = TrainSettings(learning_rate=ft.learning_rate, epochs=ft.epochs,
                              max_steps=ft.max_steps, micro_batch_size=ft.micro_batch_size,
                              grad_accumulation=ft.grad_accumulation, max_length=ft.max_length,
                              seed=ft.seed)
        adapters[str(rank)] = {}
        for name, dataset in train_sets.items():
            log(f"stage 1: LoRA {name} rank {rank} ({len(dataset)} examples)")
            entry, result = cached_finetune(
                Path(study_dir(spec)).parent / "adapter_cache" if spec.storage
                else cache_dir("adapters"),
                model_dir, dataset, lora, train, eval_sets[name],
                DeepSpeedSettings(zero_stage=ft.zero_stage),
                ScalingSettings(num_workers=ft.num_workers, use_gpu=ft.use_gpu,
                                cpus_per_worker=ft.cpus_per_worker
                                or max(1, (os.cpu_count() or 1) // ft.num_workers),
                                custom_resources=dict(spec.cluster.worker_resources)),
                storage_path=study_dir(spec) / "finetunes",
                env={"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "")},
            )
            adapters[str(rank)][name] = str(entry.path)
            if result is None:
                log(f"  cached: {entry.path}")
            else:
                held = f", held-out loss {result.eval_loss:.3f}" if result.eval_loss else ""
                log(f"  trained {result.steps} steps in {result.wall_seconds:.0f} s: train loss "
                    f"{result.train_loss:.3f}{held}")
            _log_finetune(spec, experiment, parent_run_id, name, rank, entry, result,
                          asdict(lora), asdict(train))
    return adapters


def _log_finetune(spec, experiment, parent_run_id, name, rank, entry, result, lora, train):
    """One MLflow child run per fine-tune (found again by its cache key, never duplicated)."""
    key = f"{spec.name}:finetune:{entry.key}"
    if tracking.find_run(experiment, key) is not None:
        return
    with tracking.tracked_run(experiment, key, f"finetune-{name}-r{rank}", "finetune",
                              spec.name, parent_run_id,
                              tags={"skill": name, "cache_key": entry.key}) as run_id:
        tracking.log_params(run_id, {"skill": name, "rank": rank, "lora": lora,
                                     "train": train, "adapter_dir": str(entry.path),
                                     "cached": result is None})
        history_file = Path(entry.path) / "finetune_history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        for record in history:
            tracking.log_metrics(run_id, {k: v for k, v in record.items()
                                          if k in ("train_loss", "eval_loss", "epoch")},
                                 step=int(record.get("step", 0)))
        if result is not None:
            tracking.log_metrics(run_id, {"wall_seconds": result.wall_seconds,
                                          "tokens": result.tokens})


def _trainable(spec: StudySpec, context: TrialContext):
    from ray import tune

    from study.cluster import cluster_trainable
    from trainables.merge_trial import merge_trial

    clustered = cluster_trainable(spec, context)  # on a cluster: driver on the head
    if clustered is not None:
        return clustered
    resources = {"cpu": spec.search.cpus_per_trial, "gpu": spec.search.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(merge_trial, context=context), resources)


def _tuner(spec: StudySpec, space, ranks: list[int], context: TrialContext, root: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study.console import say
    from study.progress import StudyProgress
    from trainables.search import FinalResultOptuna, optuna_define_by_run, param_space

    algorithm = spec.search.algorithm
    search_alg = None
    params = {}
    if algorithm == "optuna":
        search_alg = FinalResultOptuna(space=optuna_define_by_run(space, ranks),
                                       metric="objective", mode="max", seed=spec.search.seed)
    else:
        params = param_space(space, ranks, algorithm)
    scheduler = None
    if spec.search.scheduler == "asha":
        # ASHA ranks CAT trials by held-out loss at each evaluation step; trials that are not
        # CAT never report `cat_eval_loss` and are left alone.
        scheduler = ASHAScheduler(time_attr="cat_step", metric="cat_eval_loss", mode="min",
                                  max_t=spec.cat.max_steps, grace_period=spec.cat.eval_every,
                                  reduction_factor=2, stop_last_trials=False)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler,
        num_samples=spec.search.num_samples if algorithm != "grid" else 1,
        max_concurrent_trials=spec.search.max_concurrent_trials,
        **({} if scheduler else {"metric": "objective", "mode": "max"}),
    )
    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=str(root),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        callbacks=[StudyProgress(say)], verbose=0,
    )
    return tune.Tuner(_trainable(spec, context), param_space=params, tune_config=tune_config,
                      run_config=run_config)


def leaderboard(results) -> list[dict]:
    """One row per trial, best objective first; failed and early-stopped trials last."""
    from study.progress import describe

    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        variant = config.get("variant", {})
        status = "failed" if result.error else (
            "finished" if "objective" in metrics else "stopped early")
        rows.append({
            "trial": metrics.get("trial_id") or Path(result.path).name,
            "candidate": describe(config), "method": variant.get("method"),
            "rank": variant.get("rank"), "params": variant.get("params", {}),
            "status": status, "objective": metrics.get("objective"),
            "metrics": {k: v for k, v in metrics.items()
                        if k.startswith("validation/") or k.endswith("seconds")},
            "run_id": metrics.get("mlflow_run_id"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    rows.sort(key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0)))
    return rows


def print_leaderboard(rows: list[dict], target: str, print_fn=print) -> None:
    print_fn(f"\n{'#':>2}  {'candidate':<44} {'val ' + target:>14} {'test':>6}  "
             f"{'skills (val)':<24} {'time':>6}")
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        skills = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in m.items()
                          if k.endswith("/accuracy") and f"/{target}/" not in k)
        objective = f"{row['objective']:.3f}" if row["objective"] is not None else row["status"]
        test = row.get("test")
        seconds = sum(v for k, v in m.items() if k.endswith("seconds"))
        print_fn(f"{i:>2}  {row['candidate'][:44]:<44} {objective:>14} "
                 f"{(f'{test:.3f}' if test is not None else '-'):>6}  {skills:<24} "
                 f"{seconds:>5.0f}s")


def _spec_files(spec: StudySpec) -> list[Path]:
    """Where a study's spec is saved: its folder, and $SOUPS_HOME/NAME when that differs."""
    from soups.home import soups_home

    files = [study_dir(spec) / SPEC_FILE]
    if spec.storage:
        files.append(soups_home() / spec.name / SPEC_FILE)
    return files


def _refuse_taken(spec: StudySpec) -> None:
    taken = [path for path in _spec_files(spec) if path.exists()]
    if taken:
        raise SpecError(f"study {spec.name!r} already exists ({taken[0]}): use `soups resume "
                        f"{spec.name}` or another --name")


def check_study(spec: StudySpec, resume: bool = False):
    """What can fail before anything exists (a new study's name taken, its search space,
    its tracking store): raises SpecError / SearchSpaceError, writes nothing. Returns the
    search space and the tracking URI."""
    if not resume:
        _refuse_taken(spec)
    return load_search_space(spec), tracking_uri(spec)


def run_study(spec: StudySpec, resume: bool = False, log=print) -> list[dict]:
    """Run (or resume) a study end to end; returns the leaderboard rows."""
    import ray

    root = study_dir(spec)
    spec_file = root / SPEC_FILE
    space, uri = check_study(spec, resume)
    spec = register_study(spec, resume)
    tracking.configure(uri)
    experiment = tracking.experiment_id(spec.tracking.experiment or spec.name)
    started = time.time()
    with tracking.tracked_run(experiment, f"{spec.name}:parent", spec.name, "parent",
                              spec.name, tags=tracking.environment_tags()) as parent:
        tracking.log_params(parent, {"study": spec.model_dump(mode="json")})
        tracking.log_artifact(parent, spec_file)
        tracking.log_artifact(parent, Path(space.source))
        if not ray.is_initialized():
            # Worker output reaches the driver (fine-tune loss lines and step bars); library
            # warnings and weight-loading bars of every trial process are silenced.
            quiet = {"PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            ray.init(address=spec.cluster.address,
                     runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri, **quiet}},
                     include_dashboard=False, log_to_driver=True)
        from study.console import active

        if active() is not None:  # worker lines to the study's log, step bars to the terminal
            active().route_ray_logs()
        from study.cluster import preflight

        preflight(spec, root, log)  # every node sees the storage (multi-node only)
        model_dir = resolve_base_model(spec, log)
        tasks = resolve_tasks(spec)
        ranks = needed_ranks(spec, space)
        adapter_methods = [m for m in space.methods if m != "base"]
        adapters = (stage1(spec, model_dir, tasks, ranks, "data_mix" in space.methods,
                           experiment, parent, log) if adapter_methods else {})
        context = TrialContext(
            study=spec.name, experiment_id=experiment, tracking_uri=uri, parent_run_id=parent,
            model_dir=str(model_dir), skills=tuple(spec.skills), target=spec.target_name,
            tasks=tasks, adapters=adapters, evaluation=spec.evaluation.model_dump(),
            cat=spec.cat.model_dump(), seed=spec.search.seed)
        results = _fit(spec, space, ranks, context, root, resume, log)
        rows = leaderboard(results)
        best = next((r for r in rows if r["objective"] is not None), None)
        if best is None:
            raise RuntimeError(f"study {spec.name}: no trial finished; see {root / TUNE_DIR}")
        best["test"] = _test_best(spec, context, best, parent, log)
        _export_best(spec, best, root, log)
        tracking.log_metrics(parent, {"best/validation_objective": best["objective"],
                                      "best/test_accuracy": best["test"],
                                      "wall_seconds": time.time() - started})
        tracking.set_tags(parent, {"best_trial": best["trial"], "best_method": best["method"]})
        (root / LEADERBOARD_FILE).write_text(json.dumps(rows, indent=2, default=str))
        tracking.log_artifact(parent, root / LEADERBOARD_FILE)
    print_leaderboard(rows, spec.target_name, log)
    log(f"\nstudy {spec.name}: {len(rows)} trials in {time.time() - started:.0f} s; best "
        f"{best['candidate']} (validation {best['objective']:.3f}, test {best['test']:.3f}); "
        f"adapter in {root / BEST_DIR}")
    return rows


def _fit(spec, space, ranks, context, root: Path, resume: bool, log):
    from ray import tune

    # CAT trials report their held-out loss at each evaluation step (for ASHA) before the
    # final result with `objective`; other trials report once. Tune's strict check would
    # reject the intermediate reports, so the check is off and each consumer (ASHA, Optuna,
    # the leaderboard) looks only at results that carry its metric.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    path = root / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(path)):
        log(f"resuming the search in {path}")
        tuner = tune.Tuner.restore(str(path), trainable=_trainable(spec, context),
                                   resume_errored=True)
    else:
        tuner = _tuner(spec, space, ranks, context, root)
    return tuner.fit()


def _test_best(spec: StudySpec, context: TrialContext, best: dict, parent: str, log) -> float:
    """The test split, evaluated once, for the selected trial only."""
    from trainables.merge_trial import evaluate_candidate

    adapter = _checkpoint_adapter(best)
    metrics = evaluate_candidate(context, adapter, "test", [context.target],
                                 spec.evaluation.test_limit)
    score = metrics[f"test/{context.target}/accuracy"]
    if best["run_id"]:
        tracking.log_metrics(best["run_id"], metrics)
    tracking.log_metrics(parent, {f"best/{k}": v for k, v in metrics.items()})
    log(f"test split of {context.target}: {score:.3f} for {best['candidate']}")
    return score


def _checkpoint_adapter(row: dict) -> str | None:
    if not row["checkpoint"]:
        raise RuntimeError(f"trial {row['trial']} has no checkpoint")
    adapter = Path(row["checkpoint"]) / ADAPTER_DIR
    return str(adapter) if adapter.is_dir() else None


def _export_best(spec: StudySpec, best: dict, root: Path, log) -> None:
    """Copy the best adapter to `<study>/best_adapter`, log it to the best trial's run and
    register it with alias `champion` (the base model alone has nothing to export)."""
    adapter = _checkpoint_adapter(best)
    if adapter is None:
        log("the best candidate is the base model without adapter: nothing to export")
        return
    export_adapter(best, root / BEST_DIR, spec)
    if best["run_id"]:
        tracking.log_artifact(best["run_id"], root / BEST_DIR, "adapter")
        name = spec.tracking.register_model or f"{spec.name}-champion"
        version = tracking.register_champion(best["run_id"], "adapter", name)
        log(f"registered {name} version {version} as models:/{name}@champion")


def export_adapter(row: dict, out: Path, spec: StudySpec) -> Path:
    """Write a trial's adapter as a PEFT folder with a model card."""
    adapter = _checkpoint_adapter(row)
    if adapter is None:
        raise SpecError(f"trial {row['trial']} is the base model alone: no adapter to export")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    trial = json.loads((Path(row["checkpoint"]) / TRIAL_FILE).read_text())
    (tmp / "README.md").write_text(_model_card(spec, row, trial))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _model_card(spec: StudySpec, row: dict, trial: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(trial["metrics"].items())
                        if isinstance(v, float))
    return (f"# {spec.name}: {row['candidate']}\n\nA LoRA adapter made by study `{spec.name}` "
            f"(LoRA Soups skill composition).\nSkills: {', '.join(spec.skills)}; target: "
            f"{spec.target_name}; base model: `{spec.base_model}`.\n\n"
            "Load it with `PeftModel.from_pretrained(base_model, this_folder)`.\n\n"
            f"Method `{row['method']}`, rank {row['rank']}, parameters "
            f"`{json.dumps(row['params'], default=str)}`.\n\n"
            f"| metric | value |\n|---|---|\n{metrics}\n"
            + (f"| test/{spec.target_name}/accuracy | {row['test']:.4f} |\n"
               if row.get("test") is not None else ""))


def trial_states(root: Path) -> dict[str, int]:
    """Trials of the study's Tune experiment by state (from its saved state, no cluster)."""
    from ray.tune import ExperimentAnalysis

    path = root / TUNE_DIR
    if not path.is_dir():
        return {}
    try:
        analysis = ExperimentAnalysis(str(path))
    except (ValueError, FileNotFoundError):
        return {}
    counts: dict[str, int] = {}
    for trial in analysis.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return counts
