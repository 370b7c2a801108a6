"""Load on one MLflow tracking server: many short Ray Tune trials logging concurrently, each
through the study's own tracking code (`trainables.tracking`: a run found or created by its
key, params, a metric batch per step, FINISHED at the end), then every run and every metric
point counted back from the server.

    python -m benchmarks.mlflow_load --tracking-uri http://127.0.0.1:5000 \
        [--address auto] [--trials 60] [--steps 10] [--concurrency 12] [--out load.json]
    python -m benchmarks.mlflow_load --tracking-uri sqlite:////tmp/load.db --quick
        # under a minute: 4 trials of 2 steps, 2 at a time (the tests run it)

Prints (and writes with --out) one JSON object: expected and counted runs, finished runs,
metric points, duplicated run keys, wall time and logging throughput. Trials hold one unit of
`--resource` when given (the head's `soups_driver` on a cluster, like real trial drivers).
"""

from __future__ import annotations

import argparse
import json
import time

from soups.names import KEY_TAG, ROLE_TRIAL

METRICS = ("loss", "accuracy", "step_seconds")


def load_trial(config: dict) -> None:
    """One Tune trial: a tracked run with params and `steps` metric batches."""
    from trainables import tracking

    tracking.configure(config["uri"])
    key = f"{config['study']}:load:{config['index']}"
    with tracking.tracked_run(config["experiment"], key, f"load-{config['index']}", ROLE_TRIAL,
                              config["study"], tags={"index": str(config["index"])}) as run_id:
        tracking.log_params(run_id, {"index": config["index"], "steps": config["steps"]})
        for step in range(config["steps"]):
            start = time.perf_counter()
            tracking.log_metrics(run_id, {"loss": 1.0 / (step + 1), "accuracy": step / 10,
                                          "step_seconds": time.perf_counter() - start},
                                 step=step)
    from ray import tune

    tune.report({"done": 1})


def run_load(uri: str, trials: int, steps: int, concurrency: int, study: str,
             address: str | None = None, resource: str | None = None,
             storage: str | None = None) -> dict:
    import ray
    from ray import tune

    from trainables import tracking

    tracking.configure(uri)
    experiment = tracking.experiment_id(study)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = {"cpu": 0, resource: 1} if resource else {"cpu": 0.01}
    tuner = tune.Tuner(
        tune.with_resources(load_trial, resources),
        param_space={"index": tune.grid_search(list(range(trials))), "uri": uri,
                     "steps": steps, "study": study, "experiment": experiment},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=study, verbose=0, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    start = time.time()
    results = tuner.fit()
    wall = time.time() - start
    counted = count_runs(uri, experiment)
    return {"trials": trials, "steps": steps, "concurrency": concurrency,
            "trial_errors": sum(1 for r in results if r.error), "wall_seconds": round(wall, 1),
            "expected_runs": trials, "expected_metric_points": trials * steps * len(METRICS),
            **counted,
            "metric_points_per_second": round(counted["metric_points"] / wall, 1)}


def count_runs(uri: str, experiment: str) -> dict:
    """Runs, finished runs, distinct run keys and metric points of the experiment, read back
    from the server (the full metric history of every run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    points = sum(len(client.get_metric_history(r.info.run_id, name))
                 for r in runs for name in METRICS)
    keys = [r.data.tags.get(KEY_TAG) for r in runs]
    return {"runs": len(runs), "finished_runs": sum(r.info.status == "FINISHED" for r in runs),
            "duplicated_keys": len(keys) - len(set(keys)), "metric_points": points}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--address", default=None, help="Ray address (default: ray.init())")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--study", default=f"mlflow-load-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--resource", default=None, help="custom resource each trial holds")
    parser.add_argument("--storage", default=None, help="Tune storage (shared on a cluster)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="4 trials of 2 steps, 2 at once")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.steps, args.concurrency = 4, 2, 2
    report = run_load(args.tracking_uri, args.trials, args.steps, args.concurrency, args.study,
                      args.address, args.resource, args.storage)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
