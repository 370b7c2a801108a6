"""`soups validate`: the shipped cluster.yaml passes Ray 2.60's bundled autoscaler schema, Ray's
own checks and the project's expectations; each broken variant fails with an error naming
the key; a study file is checked against the cluster. Offline and fast: nothing is launched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error
from typer.testing import CliRunner

from study.cluster_check import (
    DRIVER_RESOURCE,
    check_cluster,
    check_cluster_file,
    check_study,
    ray_schema,
)
from study.spec import load_spec, parse_model

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
STUDY = ROOT / "docs" / "cluster_study.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def errors(config: dict) -> list[str]:
    return [str(f) for f in check_cluster(config, ROOT) if f.level == "error"]


def test_schema_is_rays_bundled_one():
    import ray

    assert ray.__version__ == "2.60.0"
    schema = ray_schema()
    assert schema["additionalProperties"] is False and "available_node_types" in \
        schema["properties"]


def test_shipped_cluster_file_is_valid():
    findings = check_cluster_file(CLUSTER)
    assert [f for f in findings if f.level == "error"] == []
    # Only the account-specific values are left to the user.
    assert all("CHANGE_ME" in f.message for f in findings)
    assert {f.key for f in findings} >= {"setup_commands.0"}


def test_shipped_cluster_study_fits_the_cluster():
    findings = check_cluster_file(CLUSTER, STUDY)
    assert [f for f in findings if f.level == "error"] == []
    spec = load_spec(STUDY)
    assert spec.cluster.address == "auto" and spec.cluster.driver_resource == DRIVER_RESOURCE


def _set(path: str, value):
    def change(config):
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return change


_DELETE = object()


def _edit_commands(key: str, old: str, new: str):
    def change(config):
        config[key] = [c.replace(old, new) for c in config[key]]
    return change


def _move_after(key: str, needle: str, after: str):
    """Move the command holding `needle` to just after the one holding `after`."""
    def change(config):
        commands = config[key]
        moved = commands.pop(next(i for i, c in enumerate(commands) if needle in c))
        commands.insert(next(i for i, c in enumerate(commands) if after in c) + 1, moved)
    return change


def _drop_commands(key: str, needle: str):
    def change(config):
        config[key] = [c for c in config[key] if needle not in c]
    return change


BROKEN = [
    # Ray's schema: every violation, named by its key.
    ("typo at top level", _set("max_worker", 3), "max_worker: unknown key"),
    ("typo in a node type", _set("available_node_types.gpu_1x.min_worker", 1),
     "available_node_types.gpu_1x.min_worker: unknown key"),
    ("fractional custom resource", _set("available_node_types.head.resources.soups_driver", 0.5),
     "available_node_types.head.resources.soups_driver: 0.5 is not of type 'integer'"),
    ("negative resource", _set("available_node_types.gpu_1x.resources.GPU", -1),
     "available_node_types.gpu_1x.resources.GPU: -1 is less than the minimum of 0"),
    # Ray's own checks.
    ("unknown head type", _set("head_node_type", "cpu_head"),
     "`head_node_type` must be one of `available_node_types`"),
    ("min_workers above the global cap", _set("available_node_types.gpu_1x.min_workers", 7),
     "max_workers` is smaller than the sum of `min_workers`"),
    # The head.
    ("head without the driver resource",
     _set("available_node_types.head.resources", {"CPU": 0}),
     f"available_node_types.head.resources: the head must offer the custom resource "
     f"'{DRIVER_RESOURCE}'"),
    ("GPU head", _set("available_node_types.head.resources.GPU", 1),
     "available_node_types.head.resources: the head is a CPU node"),
    # Worker types.
    ("min above max", _set("available_node_types.gpu_4x.min_workers", 3),
     "available_node_types.gpu_4x.min_workers: min_workers 3 is above max_workers 2"),
    ("no GPU worker", lambda c: [c["available_node_types"][n]["resources"].pop("GPU")
                                 for n in ("gpu_1x", "gpu_4x")],
     "available_node_types: no worker node type offers a GPU"),
    ("driver resource on a worker", _set("available_node_types.gpu_1x.resources.soups_driver", 1),
     "available_node_types.gpu_1x.resources.soups_driver: only the head may offer"),
    ("no worker type", lambda c: [c["available_node_types"].pop(n) for n in ("gpu_1x", "gpu_4x")],
     "available_node_types: no worker node type"),
    # Shared storage, in one place, mounted everywhere.
    ("storage set twice", lambda c: c["head_setup_commands"].append(
        "export SOUPS_HOME=/data/soups_home"), "configured in one place: SOUPS_HOME is set in 2"),
    ("storage never mounted", _drop_commands("setup_commands", "mount -t nfs4"),
     "no setup command mounts the shared storage"),
    ("node type's own setup drops the storage",
     _set("available_node_types.gpu_4x.worker_setup_commands",
          ["~/venv/bin/pip install torch==2.13.0", "~/venv/bin/pip install -e ~/lora-soups"]),
     "available_node_types.gpu_4x: node type gpu_4x does not get SOUPS_HOME"),
    # Installing the project.
    ("project not installed", _drop_commands("setup_commands", "install -q -e ~/lora-soups"),
     "no setup command installs the project (pip install -e ~/lora-soups)"),
    ("project not copied", _set("file_mounts", {"~/.ray/auth_token": "~/.ray/auth_token"}),
     "file_mounts: no file mount copies this project"),
    ("torch unpinned", _edit_commands("setup_commands", "torch==2.13.0", "torch"),
     "no setup command installs a pinned torch"),
    ("torch after the project", _move_after("setup_commands", "torch==", "-e ~/lora-soups"),
     "torch is installed after the project"),
    ("no program sandbox", _edit_commands("setup_commands", "install -y -q bubblewrap",
                                          "install -y -q nothing"),
     "available_node_types.gpu_1x: node type gpu_1x: no setup command installs bubblewrap"),
    ("CPU torch on GPU nodes",
     _edit_commands("setup_commands", "$(nvidia-smi -L > /dev/null 2>&1 || echo --index-url "
                    "https://download.pytorch.org/whl/cpu)",
                    "--index-url https://download.pytorch.org/whl/cpu"),
     "node type gpu_1x has GPUs but installs the CPU build of torch"),
    # Token authentication.
    ("token not copied", _set("file_mounts", {"~/lora-soups": "."}),
     "file_mounts: the Ray auth token must reach every node"),
    ("token auth disabled", _edit_commands("worker_start_ray_commands", "RAY_AUTH_MODE=token",
                                           "RAY_AUTH_MODE=disabled"),
     "worker_start_ray_commands.1: token authentication is disabled"),
    ("worker without token mode",
     lambda c: _edit_commands("setup_commands", "'export RAY_AUTH_MODE=token'", "")(c) or
     _edit_commands("worker_start_ray_commands", "RAY_AUTH_MODE=token ", "")(c),
     "worker_start_ray_commands.1: ray start without RAY_AUTH_MODE=token"),
    # Nothing open to the world.
    ("dashboard on every interface",
     _edit_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1",
                    "--dashboard-host=0.0.0.0"),
     "head_start_ray_commands.1: --dashboard-host 0.0.0.0 binds a service to every interface"),
    ("MLflow on every interface",
     _edit_commands("head_start_ray_commands", "--host 127.0.0.1", "--host 0.0.0.0"),
     "head_start_ray_commands.2: --host 0.0.0.0 binds a service to every interface"),
    ("security group rule open to the world",
     _set("provider.security_group", {"GroupName": "x", "IpPermissions": [
         {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
          "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
     "provider.security_group.IpPermissions.0: opens a port to the whole internet"),
    ("Ray-made security group", _set("available_node_types.gpu_1x.node_config.SecurityGroupIds",
                                     _DELETE),
     "available_node_types.gpu_1x.node_config: no SecurityGroupIds"),
    # The MLflow server.
    ("no MLflow server", _drop_commands("head_start_ray_commands", "mlflow server"),
     "head_start_ray_commands: no `mlflow server` on the head"),
    ("MLflow file store", _edit_commands("head_start_ray_commands",
                                         "sqlite:///$HOME/mlflow/mlflow.db", "./mlruns"),
     "mlflow server needs --backend-store-uri with a database"),
    ("MLflow artifacts on the head's disk",
     _edit_commands("head_start_ray_commands", "$SOUPS_SHARED/mlflow/artifacts",
                    "/home/ubuntu/mlartifacts"),
     "mlflow server needs --artifacts-destination on the shared storage"),
]


@pytest.mark.parametrize("change, message", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_cluster_file_fails_naming_the_key(config, change, message):
    change(config)
    found = errors(config)
    assert any(message in e for e in found), found


def test_every_schema_violation_is_reported_not_only_the_first(config):
    config["max_worker"] = 1
    config["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
    found = errors(config)
    assert sorted(found) == [
        "available_node_types.gpu_1x.resources.GPU: 0.5 is not of type 'integer'",
        "max_worker: unknown key (not in Ray's autoscaler schema)"]


STUDY_MISMATCHES = [
    ({"tracking": {"uri": "sqlite:////tmp/mlflow.db"}}, "study.tracking.uri: a cluster study "
     "logs to the head's MLflow server (http://127.0.0.1:5000)"),
    ({"tracking": {"uri": "http://127.0.0.1:5001"}}, "study.tracking.uri: port 5001 is not"),
    ({"cluster": {"driver_resource": "head"}}, "study.cluster.driver_resource: the head does "
     "not offer 'head'"),
    ({"cluster": {"worker_resources": {"tpu": 1}}}, "study.cluster.worker_resources.tpu: no "
     "worker node type offers this resource"),
    ({"search": {"gpus_per_trial": 8}}, "study.search.gpus_per_trial: 8.0 GPUs per trial, but "
     "no worker node has more than 4"),
    ({"finetune": {"use_gpu": True, "num_workers": 20, "cpus_per_worker": 1}},
     "study.finetune.num_workers: 20 GPU workers but the cluster has at most 12 GPUs"),
    ({"finetune": {"cpus_per_worker": 64}}, "study.finetune.cpus_per_worker: 64 CPUs per worker"),
    ({"storage": "relative/dir"}, "study.storage: a relative path"),
]


@pytest.mark.parametrize("override, message", STUDY_MISMATCHES)
def test_study_that_does_not_fit_the_cluster_is_named(config, override, message):
    from study.spec import StudySpec, load_yaml

    data = load_yaml(STUDY)
    for key, value in override.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    spec = parse_model(StudySpec, data, "s.yaml")
    found = [str(f) for f in check_study(spec, config) if f.level == "error"]
    assert any(message in f for f in found), found


def test_study_without_address_or_cpus_per_worker_gets_warnings(config):
    from study.spec import StudySpec

    spec = parse_model(StudySpec, {"tracking": {"uri": "http://127.0.0.1:5000"}}, "s.yaml")
    findings = check_study(spec, config)
    assert {f.key for f in findings if f.level == "warning"} == {
        "study.cluster.address", "study.finetune.cpus_per_worker"}
    assert not [f for f in findings if f.level == "error"]


def test_cli_reports_errors_with_exit_status_1(tmp_path):
    from study.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["validate", str(CLUSTER), "--study", str(STUDY)])
    assert done.exit_code == 0, done.output
    assert "valid (4 warnings); study" in done.output
    bad = tmp_path / "cluster.yaml"
    broken = yaml.safe_load(CLUSTER.read_text())
    broken["available_node_types"]["gpu_1x"]["max_worker"] = 2
    bad.write_text(yaml.safe_dump(broken))
    done = runner.invoke(app, ["validate", str(bad)])
    assert done.exit_code == 1
    assert "error: " in done.output and "available_node_types.gpu_1x.max_worker: unknown key" \
        in done.output
    # A file that is not there (or not YAML) is bad input, as for every command: status 2.
    missing = runner.invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_yaml_anchors_keep_node_configs_in_step(config):
    nodes = config["available_node_types"]
    assert len({n["node_config"]["ImageId"] for n in nodes.values()}) == 1
    assert len({tuple(n["node_config"]["SecurityGroupIds"]) for n in nodes.values()}) == 1
    assert copy.deepcopy(config) == config


def test_storage_probe_and_verdict(tmp_path):
    """A node that reads the driver's token and whose answer the driver sees is sharing the
    folder; one that cannot read it, or whose answer stays invisible, is named."""
    from trainables.shared_storage import PROBE_DIR, probe, unshared

    shared, other = tmp_path / "shared", tmp_path / "elsewhere"
    (shared / PROBE_DIR / "t0").mkdir(parents=True)
    (shared / PROBE_DIR / "t0" / "token").write_text("t0")
    answers = {"node-a": probe([str(shared)], "t0", "node-a")}
    assert answers["node-a"] == {str(shared): "ok"}
    assert unshared([str(shared)], answers, "t0") == []
    # node-b mounts something else at that path: it cannot read the token.
    answers["node-b"] = {str(shared): probe([str(other)], "t0", "node-b")[str(other)]}
    # node-c read the token but wrote its answer to a disk the driver does not see.
    answers["node-c"] = {str(shared): "ok"}
    problems = unshared([str(shared)], answers, "t0")
    assert len(problems) == 2
    assert problems[0].startswith(f"node node-b: {shared}: cannot read")
    assert problems[1] == (f"node node-c: {shared}: what it wrote there is not visible to "
                           "the driver (a local folder, not shared storage)")


def test_cli_study_file_that_is_not_there_is_a_one_line_error(tmp_path):
    assert_user_error(["validate", CLUSTER, "--study", tmp_path / "absent.yaml"],
                      tmp_path / "absent.yaml", "no such file")
