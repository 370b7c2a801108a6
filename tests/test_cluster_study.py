"""Cluster studies on one machine, with real processes: a Ray cluster started as cluster.yaml
starts it (`ray start --head` with the `soups_driver` resource and no CPU, two or three
`ray start --address` worker nodes whose `soups_worker` resource stands in for a GPU, token
authentication) and an `mlflow server` on loopback with a SQLite database.

- a smoke study runs across the nodes: trial drivers on the head, their work and the
  fine-tune workers on worker nodes, every run in the server's database;
- a study survives losing a worker node during a fine-tune and another during the trials,
  and a restart of the MLflow server: it finishes, lost work is redone, no run is left
  RUNNING or duplicated, every cached adapter is whole;
- storage that a node does not share stops a study before it starts, with a clear error;
- 60 short Tune trials log concurrently to the one server: every run and metric arrives.

Lean on purpose (2 cores): a tiny random model, 4 fine-tune steps, 4 validation examples.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from local_cluster import WORKER_RESOURCE, LocalRayCluster, MlflowServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SOUPS = [sys.executable, "-m", "study.cli"]
DRIVER_RESOURCE = "soups_driver"
# cat_learned first: it runs longest, so it is in flight when the fault test kills its node.
SPACE = """\
methods:
  cat_learned: {}
  linear: {weights: {grid: [[1.0, 1.0], [0.5, 0.5], [0.8, 0.2]]}}
  ties: {density: {grid: [0.5, 0.9]}}
"""
TRIALS = 6
CAT_STEPS = 400


@dataclass
class Env:
    root: Path
    home: Path
    cluster: LocalRayCluster
    mlflow: MlflowServer
    model: str

    def process_env(self) -> dict[str, str]:
        return {**self.cluster.env, "SOUPS_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cluster")
    server = MlflowServer(root / "mlflow")
    cluster = LocalRayCluster()
    try:
        server.launch()
        cluster.start_head({DRIVER_RESOURCE: 1000})
        # One node at a time: nodes starting together on one machine can race for ports.
        cluster.add_worker("w1")
        cluster.add_worker("w2")
        server.wait_ready()
        yield Env(root, root / "soups_home", cluster, server, tiny_model_dir)
    finally:
        cluster.stop()
        server.stop()


def _study_file(env: Env, name: str, **extra) -> Path:
    space = env.root / "space.yaml"
    space.write_text(SPACE)
    sizes = {"train": 64, "validation": 8, "test": 8}
    study = {
        "name": name, "base_model": env.model,
        "generated": {"sizes": {"math": sizes, "code": sizes,
                                "math_code": {**sizes, "train": 8}}},
        "finetune": {"ranks": [4], "max_steps": 4, "micro_batch_size": 8, "max_length": 96,
                     "cpus_per_worker": 1},
        "cat": {"max_steps": 10, "eval_every": 5, "held_out": 8, "micro_batch_size": 8,
                "warmup_steps": 2},
        "search": {"space": str(space), "max_concurrent_trials": 2, "cpus_per_trial": 1},
        "evaluation": {"validation_limit": 4, "test_limit": 4, "max_new_tokens": 8,
                       "batch_size": 4, "skills": False},
        "tracking": {"uri": env.mlflow.uri},
        "cluster": {"address": env.cluster.address,
                    "worker_resources": {WORKER_RESOURCE: 1}},
    }
    for key, value in extra.items():
        study[key] = {**study.get(key, {}), **value} if isinstance(value, dict) else value
    path = env.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


class Driver:
    """`soups run` in the background; its output collected line by line."""

    def __init__(self, env: Env, *args: str):
        self.lines: list[str] = []
        self.log = (env.root / f"driver-{int(time.time())}.log").open("w")
        self.process = subprocess.Popen([*SOUPS, *args], cwd=ROOT, env=env.process_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, what: str, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = predicate()
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"the study ended before {what}:\n{self.output[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def _client(env: Env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env.mlflow.uri)


def _runs(env: Env, experiment: str, role: str | None = None) -> list:
    client = _client(env)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if role is None or r.data.tags.get("soups.role") == role]


def _server_rows(env: Env, experiment: str) -> int:
    """Runs of `experiment` in the server's own database file (not through its API)."""
    with sqlite3.connect(env.mlflow.database) as db:
        return db.execute("SELECT COUNT(*) FROM runs JOIN experiments USING (experiment_id) "
                          "WHERE experiments.name = ?", (experiment,)).fetchone()[0]


def _node_of_pid(env: Env, pid: int) -> str | None:
    """The name of the node a Ray worker process belongs to: the `ray start` process among
    its ancestors (raylet -> worker), or the process group it leads."""
    starts = {p.pid: name for name, p in env.cluster.nodes.items()}
    while pid > 1:
        try:
            if pid in starts or os.getpgid(pid) in starts:
                return starts.get(pid) or starts[os.getpgid(pid)]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (ProcessLookupError, FileNotFoundError):
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
    return None


def test_smoke_study_runs_across_the_nodes(env):
    driver = Driver(env, "run", str(_study_file(env, "cl_smoke")))
    assert driver.finish() == 0, driver.output[-4000:]
    out = driver.output
    rows = json.loads((env.home / "cl_smoke" / "leaderboard.json").read_text())
    assert len(rows) == TRIALS and all(r["status"] == "finished" for r in rows)
    assert "shared storage: 3 folders seen by all 3 nodes" in out
    # Fine-tune workers asked for the worker nodes' resource (the head offers none of it):
    # Ray Train says so in its lines, which go to the study's log, not to the terminal.
    log = (env.home / "cl_smoke" / "logs" / "study.log").read_text(errors="replace")
    assert f"'{WORKER_RESOURCE}': 1.0" in log and f"'{WORKER_RESOURCE}'" not in out
    runs = _runs(env, "cl_smoke")
    roles = sorted(r.data.tags["soups.role"] for r in runs)
    assert roles == ["finetune"] * 2 + ["parent"] + ["trial"] * TRIALS
    assert all(r.info.status == "FINISHED" for r in runs)
    # Every run reached the server over HTTP: it is a row of the server's database, and the
    # study kept no local store.
    assert _server_rows(env, "cl_smoke") == len(runs)
    assert not (env.home / "mlflow.db").exists()
    names = env.cluster.node_names()
    trials = [r for r in runs if r.data.tags["soups.role"] == "trial"]
    drivers = {names[r.data.tags["soups.driver_node"]] for r in trials}
    workers = [names[n] for r in trials for n in r.data.tags["soups.work_nodes"].split(",")]
    assert drivers == {"head"}
    assert "head" not in workers and len(set(workers)) == 2, workers
    assert (env.home / "cl_smoke" / "best_adapter" / "adapter_config.json").is_file()


def test_program_sandbox_is_checked_on_every_node(env):
    """Every node runs a test program in bubblewrap; a node where bubblewrap is missing
    (w2, made so) is named with the fix, and the others are not."""
    code = """
import ray
from trainables import every_node
ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
print("ALL:", every_node.check_sandbox_on_nodes("bwrap"))
w2 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_w2" in n["Resources"])
real = every_node.sandbox_problem
def problem(sandbox, node):
    if node == w2:
        from soups.evaluation.sandbox import bwrap, run
        bwrap.find_bwrap = lambda: None
        run._probe_bwrap.cache_clear()
    return real(sandbox, node)
every_node.sandbox_problem = problem
print("W2:", w2)
print("MISSING:", every_node.check_sandbox_on_nodes("bwrap"))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env.process_env(),
                          capture_output=True, text=True, timeout=180)
    assert "MISSING:" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "ALL: []" in done.stdout
    w2 = done.stdout.split("W2: ")[1].split()[0]
    missing = done.stdout.split("MISSING: ")[1]
    assert missing.count("node ") == 1 and f"node {w2}: bubblewrap (bwrap) is not installed" \
        in missing and "apt-get install bubblewrap" in missing


def test_storage_not_shared_by_a_node_stops_the_study_before_it_starts(env, tmp_path):
    """Node w2 is made to see another disk at the study's paths (its probe looks elsewhere):
    the check names the node and the folder, and nothing is trained."""
    code = f"""
import sys
import ray
from trainables import shared_storage
from trainables.shared_storage import StorageNotShared, check_shared_storage
ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
w2 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_w2" in n["Resources"])
real = shared_storage.probe
def probe(folders, token, node):
    if node == w2:  # a disk of its own, mounted at the same path
        seen = real(["{tmp_path}" + f for f in folders], token, node)
        return dict(zip(folders, seen.values()))
    return real(folders, token, node)
shared_storage.probe = probe
try:
    check_shared_storage(["{tmp_path / 'study'}"])
except StorageNotShared as err:
    print("ERROR:", err)
    print("W2:", w2)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env.process_env(),
                          capture_output=True, text=True, timeout=180)
    assert "ERROR:" in done.stdout, done.stdout + done.stderr[-3000:]
    w2 = done.stdout.split("W2: ")[1].strip()
    message = done.stdout.split("ERROR: ")[1]
    assert "not shared by every node" in message and f"node {w2}:" in message
    assert f"{tmp_path / 'study'}: cannot read" in message
    assert message.count("node ") == 1 + message.count("every node")  # only w2 is named


def test_study_survives_lost_nodes_and_an_mlflow_restart(env):
    """Kill the worker node running the first fine-tune, add a replacement node, then kill
    the node running the CAT trial's work and restart the MLflow server meanwhile."""
    # New fine-tune inputs (seed), so stage 1 trains again; CAT long enough (~10 s) to be
    # caught in flight.
    study = _study_file(env, "cl_fault", finetune={"seed": 1},
                        cat={"max_steps": CAT_STEPS, "eval_every": 20})
    cache = env.home / "cache" / "adapters"
    cached_before = {p.name for p in cache.glob("[!.]*")}
    driver = Driver(env, "run", str(study))

    # 1. A fine-tune's training worker starts on a worker node: kill that node. Ray Train
    # names it in a line of its own, which goes to the study's log.
    log = env.home / "cl_fault" / "logs" / "study.log"

    def train_worker():
        text = log.read_text(errors="replace") if log.is_file() else ""
        found = re.search(r"\(ip=[^,]+, pid=(\d+)\) world_rank=0", text)
        return _node_of_pid(env, int(found.group(1))) if found else None

    first = driver.wait_for(train_worker, "the first fine-tune's worker", timeout=240)
    assert first in ("w1", "w2")
    time.sleep(2)
    runs_at_first_kill = len(_runs(env, "cl_fault"))
    env.cluster.kill(first)
    env.cluster.add_worker("w3")
    names = env.cluster.node_names()

    # 2. The CAT trial reported a held-out loss early in its training: kill the node doing
    # its work, and restart the tracking server while the trials go on.
    client = _client(env)

    def cat_node():
        for run in _runs(env, "cl_fault", "trial"):
            if run.data.tags.get("method") == "cat_learned" and \
                    "cat_eval_loss" in run.data.metrics:
                steps = client.get_metric_history(run.info.run_id, "cat_eval_loss")
                if max(m.step for m in steps) > CAT_STEPS // 2:
                    raise AssertionError("the CAT trial ran too fast to be interrupted")
                return names[run.data.tags["soups.work_nodes"].split(",")[-1]]
        return None

    second = driver.wait_for(cat_node, "the CAT trial's first evaluation", timeout=300)
    assert second not in ("head", first)
    runs_at_second_kill = _runs(env, "cl_fault")
    env.cluster.kill(second)
    env.mlflow.stop()
    time.sleep(3)
    env.mlflow.start()

    assert driver.finish() == 0, driver.output[-4000:]
    # Ray Train restarted the fine-tune's worker group without the lost node.
    assert "[FailurePolicy] RETRY" in log.read_text(errors="replace")
    rows = json.loads((env.home / "cl_fault" / "leaderboard.json").read_text())
    assert len(rows) == TRIALS and all(r["status"] == "finished" for r in rows)
    runs = _runs(env, "cl_fault")
    keys = [r.data.tags["soups.run_key"] for r in runs]
    assert len(keys) == len(set(keys)) == 1 + 2 + TRIALS  # none duplicated, none lost
    assert all(r.info.status == "FINISHED" for r in runs)
    assert _server_rows(env, "cl_fault") == len(runs)
    trials = [r for r in runs if r.data.tags["soups.role"] == "trial"]
    assert all("objective" in r.data.metrics for r in trials)
    cat = next(r for r in trials if r.data.tags["method"] == "cat_learned")
    assert cat.data.tags["soups.node_losses"] == "1"
    work = cat.data.tags["soups.work_nodes"].split(",")
    assert len(work) == 2 and names[work[0]] == second
    steps = [m.step for m in _client(env).get_metric_history(cat.info.run_id, "cat_eval_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == CAT_STEPS  # each step once
    # Every cached adapter is whole: an entry file and a readable adapter; no half-written
    # folder left behind.
    from soups.adapters import LoraAdapter
    from soups.training.adapter_cache import ENTRY_FILE

    entries = list(cache.glob("[!.]*"))
    assert len(entries) == len(cached_before) + 2
    for entry in entries:
        assert (entry / ENTRY_FILE).is_file()
        LoraAdapter.open(entry)
    assert not list((cache / ".tmp").glob("*"))
    print(f"\nfault test: killed {first} during a fine-tune ({runs_at_first_kill} runs then), "
          f"killed {second} during the CAT trial ({len(runs_at_second_kill)} runs then), "
          f"restarted MLflow; after: {len(runs)} runs, all FINISHED; CAT work nodes "
          f"{[names.get(n, n) for n in work]}")


def test_sixty_trials_log_concurrently_to_one_server(env):
    """60 Tune trials on the cluster, 12 at a time, each a run with 10 metric batches; the
    server is restarted while they log. Every run and metric point is counted back."""
    out = env.root / "load.json"
    load = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mlflow_load", "--tracking-uri", env.mlflow.uri,
         "--address", env.cluster.address, "--trials", "60", "--steps", "10",
         "--concurrency", "12", "--resource", DRIVER_RESOURCE, "--study", "cl_load",
         "--storage", str(env.root / "tune_load"), "--out", str(out)],
        cwd=ROOT, env=env.process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline = time.time() + 300
    while _server_rows(env, "cl_load") < 15 and load.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    runs_at_restart = _server_rows(env, "cl_load")
    env.mlflow.stop()
    time.sleep(3)
    env.mlflow.start()
    output = load.communicate(timeout=600)[0]
    assert load.returncode == 0, output[-4000:]
    report = json.loads(out.read_text())
    print(f"\nload test: MLflow restarted with {runs_at_restart} of 60 runs created; {report}")
    assert 0 < runs_at_restart < 60
    assert report["trial_errors"] == 0
    assert report["runs"] == report["finished_runs"] == 60
    assert report["duplicated_keys"] == 0
    assert report["metric_points"] == report["expected_metric_points"] == 60 * 10 * 3
    assert _server_rows(env, "cl_load") == 60
