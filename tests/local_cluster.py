"""A multi-node Ray cluster and an MLflow tracking server on this machine, as real processes,
for the cluster tests (tests/test_cluster_study.py).

The nodes are started the way cluster.yaml starts them (`ray start --head`, `ray start
--address`, token authentication), each in its own session so that one node can be killed
alone (SIGKILL of its process group: raylet, object store, workers). Custom resources stand
in for the head's `soups_driver` and the GPU workers. Everything is isolated from other Ray
instances on the machine: its own temp dir (so `ray.init()` elsewhere never finds it), free
ports, and a token passed in the environment (`~/.ray/auth_token` is left alone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
WORKER_RESOURCE = "soups_worker"  # stands in for a GPU on the worker nodes
OBJECT_STORE = 150 * 1024 * 1024  # bytes per node: the tests move only small objects


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


class LocalRayCluster:
    """Head (CPU 0, `soups_driver`) plus named worker nodes with custom resources."""

    def __init__(self, env: dict[str, str] | None = None):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="soups-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex,
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": self.address}
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = self.temp_dir / f"{name}.log"
        self.nodes[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
             f"--object-store-memory={OBJECT_STORE}",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True, stdin=subprocess.DEVNULL)

    def wait_started(self, name: str, timeout: float = 120) -> None:
        """Until `ray start --block` says the node runs (it has joined the cluster)."""
        log = self.temp_dir / f"{name}.log"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "will now block forever" in log.read_text(errors="replace"):
                return
            if self.nodes[name].poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"ray node {name} did not start: {log.read_text()[-3000:]}")

    def start_head(self, resources: dict[str, int]) -> None:
        self._start("head", ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                             "--num-cpus=0", f"--resources={json.dumps(resources)}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"])
        self.wait_started("head")

    def add_worker(self, name: str, cpus: int = 2, wait: bool = True) -> None:
        resources = {WORKER_RESOURCE: 100, f"node_{name}": 1}
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}",
                           f"--resources={json.dumps(resources)}"])
        if wait:
            self.wait_started(name)

    def kill(self, name: str) -> None:
        """The node dies at once: its raylet, object store and worker processes."""
        process = self.nodes.pop(name)
        _kill_group(process)
        process.wait(timeout=30)

    def nodes_info(self) -> list[dict]:
        """`ray.nodes()` as seen by a short-lived driver (this process stays unconnected)."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR', "
                "log_to_driver=False); print('NODES=' + json.dumps(ray.nodes()))")
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                              text=True, timeout=120)
        for line in done.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"cannot list nodes: {done.stderr[-2000:]}")

    def node_names(self) -> dict[str, str]:
        """Ray node id -> our name ("head", or the worker name), for every node ever seen."""
        out = {}
        for node in self.nodes_info():
            names = [k[len("node_"):] for k in node["Resources"] if k.startswith("node_")
                     and not k.startswith("node:")]
            out[node["NodeID"]] = names[0] if names else "head"
        return out

    def stop(self) -> None:
        """Kill every node (their process groups) and remove the temp dir."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                _kill_group(self.nodes[name])
        for process in self.nodes.values():
            process.wait(timeout=30)
        self.nodes.clear()
        # Ray workers lead process groups of their own and exit once their raylet is gone,
        # possibly still writing logs here: try again after a moment.
        for _ in range(3):
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            if not self.temp_dir.exists():
                break
            time.sleep(1)


class MlflowServer:
    """`mlflow server` on loopback with a SQLite database and an artifacts folder, as
    cluster.yaml runs it on the head; restartable on the same port and database."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.database = root / "mlflow.db"
        self.workers = workers
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--backend-store-uri",
             f"sqlite:///{self.database}", "--artifacts-destination",
             str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not start in {timeout} s: see {self.root}")

    def stop(self) -> None:
        """A clean stop (SIGTERM to the server and its workers), as a restart does."""
        if self.process is None:
            return
        _kill_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
            self.process.wait()
        self.process = None
