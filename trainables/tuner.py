"""Stage 2 on Ray Tune: the trial trainable (whole where Tune places it, or a driver on the
head with its work on worker nodes when the cluster offers the driver resource), the Tuner
(search algorithm, ASHA, failure handling, progress lines), fitting or restoring it, and the
saved trials' states.

The study passes its spec sections (`search`, `cat`, `cluster`) as they are: only their
attributes are read here, so this package needs nothing of `study/`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from soups.names import CAT_EVAL_LOSS, CAT_STEP, OBJECTIVE
from trainables.placement import on_cluster
from trainables.trial_context import TrialContext

# CAT trials report held-out loss per evaluation step (for ASHA) before their final result
# with `objective`; other trials report once. Tune's strict check would reject the
# intermediate reports, and an environment variable is Tune's only switch for it.
STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


def trainable(search, cluster, context: TrialContext):
    """The trial trainable with its resources: on a cluster (the driver resource offered) a
    driver holding one unit of it, its work on worker nodes; otherwise the whole trial."""
    from ray import tune  # lazy: ray

    from trainables.cluster_trial import cluster_trial  # lazy: numpy
    from trainables.merge_trial import merge_trial  # lazy: numpy

    if on_cluster(cluster.driver_resource):
        work = {"num_cpus": search.cpus_per_trial, "num_gpus": search.gpus_per_trial,
                "resources": dict(cluster.worker_resources)}
        driver = tune.with_parameters(cluster_trial, context=context, work_options=work,
                                      node_retries=cluster.node_retries)
        return tune.with_resources(driver, {"cpu": 0, cluster.driver_resource: 1})
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(merge_trial, context=context), resources)


def build_tuner(search, cat, cluster, space, ranks: list[int], context: TrialContext,
                path: Path, progress: Callable[[str], None]):
    """A new Tuner over the space's variants; its experiment lives in the folder `path`."""
    from ray import tune  # lazy: ray
    from ray.tune.schedulers import ASHAScheduler  # lazy: ray

    from trainables.progress import StudyProgress  # lazy: ray
    from trainables.search import (  # lazy: numpy, ray
        FinalResultOptuna,
        SeedRepeater,
        optuna_define_by_run,
        param_space,
    )

    search_alg = None
    params = {}
    seeds = search.seeds  # None: no seed axis
    num_samples = search.num_samples
    if search.algorithm == "optuna":
        search_alg = FinalResultOptuna(space=optuna_define_by_run(space, ranks),
                                       metric=OBJECTIVE, mode="max", seed=search.seed)
        if seeds is not None:  # each suggestion once per seed: Tune counts every trial
            search_alg, num_samples = SeedRepeater(search_alg, seeds), num_samples * len(seeds)
    else:
        params = param_space(space, ranks, search.algorithm, seeds, search.num_samples,
                             search.seed)
        if search.algorithm == "grid" or seeds is not None:  # a grid: every point once
            num_samples = 1
    scheduler = None
    if search.scheduler == "asha":
        # ASHA ranks CAT trials by held-out loss at each evaluation step; trials that are not
        # CAT never report `cat_eval_loss` and are left alone.
        scheduler = ASHAScheduler(time_attr=CAT_STEP, metric=CAT_EVAL_LOSS, mode="min",
                                  max_t=cat.max_steps, grace_period=cat.eval_every,
                                  reduction_factor=2, stop_last_trials=False)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=search.max_concurrent_trials,
        **({} if scheduler else {"metric": OBJECTIVE, "mode": "max"}),
    )
    run_config = tune.RunConfig(
        name=path.name, storage_path=str(path.parent),
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        callbacks=[StudyProgress(progress, _total_trials(params, num_samples))], verbose=0,
    )
    return tune.Tuner(trainable(search, cluster, context), param_space=params,
                      tune_config=tune_config, run_config=run_config)


def _total_trials(params: dict, num_samples: int) -> int:
    """How many trials the search runs: each grid point num_samples times, or num_samples
    draws (random, Optuna)."""
    grid = params.get("variant")
    points = len(grid["grid_search"]) if isinstance(grid, dict) and "grid_search" in grid else 1
    return points * num_samples


@contextlib.contextmanager
def _intermediate_results_allowed():
    """Tune's strict metric check off while the search runs (each consumer - ASHA, Optuna,
    the leaderboard - looks only at results that carry its metric), as it was after."""
    before = os.environ.get(STRICT_METRIC_ENV)
    os.environ[STRICT_METRIC_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STRICT_METRIC_ENV, None)
        else:
            os.environ[STRICT_METRIC_ENV] = before


def fit(search, cat, cluster, space, ranks: list[int], context: TrialContext, path: Path,
        resume: bool, log: Callable[[str], None], progress: Callable[[str], None]):
    """Run the search (or continue the one saved in `path`); returns Tune's ResultGrid."""
    from ray import tune  # lazy: ray

    if resume and tune.Tuner.can_restore(str(path)):
        log(f"resuming the search in {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable(search, cluster, context),
                                   resume_errored=True)
    else:
        tuner = build_tuner(search, cat, cluster, space, ranks, context, path, progress)
    with _intermediate_results_allowed():
        return tuner.fit()


def trial_states(path: Path) -> dict[str, int]:
    """Trials of the Tune experiment saved in `path` by state (read from disk, no cluster)."""
    from ray.tune import ExperimentAnalysis  # lazy: ray

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
