"""Offline checks of a `ray up` cluster file (`soups validate cluster.yaml`).

Three layers, each finding naming the key it is about:
1. Ray 2.60's bundled autoscaler schema (`ray/autoscaler/ray-schema.json`): every violation,
   not only the first (typos such as `max_worker`, non-integer custom resources, ...);
2. Ray's own config checks (`prepare_config` + `validate_config`, a private API: the head
   node type exists, the global `max_workers` covers the node types' `min_workers`);
3. this project's expectations of a study cluster: a CPU head that offers the trial drivers'
   resource and runs the MLflow server (database backend, artifacts on shared storage, bound
   to loopback), GPU worker types with sane autoscaling bounds, shared storage mounted on
   every node and configured in one place, setup that installs a pinned torch and then this
   project on every node, token authentication on every node, and no port open to the world.
Optionally a study spec is checked against the cluster (`--study`): MLflow over HTTP, the
driver resource on the head, worker resources and GPU requests that some node type offers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from soups.yaml_file import read_yaml
from study.spec import SpecError, load_spec

DRIVER_RESOURCE = "soups_driver"  # cluster.yaml's head resource; study.spec.Cluster's default
TOKEN_PATH = "~/.ray/auth_token"
PLACEHOLDER = "CHANGE_ME"
DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")
EVERY_INTERFACE = {"0.0.0.0", "::", "[::]"}
BWRAP_INSTALL = re.compile(r"\binstall\b.*\bbubblewrap\b")
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
MOUNT = re.compile(r"\bmount\b[^;&|]*\s-t\s|\bmount\.(nfs4?|efs)\b|\bmount-s3\b|\bs3fs\b"
                   r"|\bgcsfuse\b")


@dataclass(frozen=True)
class Finding:
    key: str  # dotted path into the cluster file ("" for the whole file)
    message: str
    level: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.key or '(top level)'}: {self.message}"


def check_cluster_file(path: str | Path, study: str | Path | None = None) -> list[Finding]:
    """Every finding about the cluster file at `path` (and the study file, if given)."""
    path = Path(path)
    try:
        config = read_yaml(path, SpecError)
    except SpecError as err:
        return [Finding("", str(err))]
    if not isinstance(config, dict):
        return [Finding("", f"{path}: a cluster file is a mapping of keys")]
    findings = check_cluster(config, path.resolve().parent)
    if study is not None and not any(f.level == "error" for f in findings):
        findings += check_study(load_spec(study), config)
    return findings


def check_cluster(config: dict, base_dir: Path) -> list[Finding]:
    """Schema, Ray's own checks, then the project's expectations (skipped when the file does
    not even have the shape the schema asks for)."""
    findings = schema_findings(config)
    if findings:
        return findings
    findings = ray_findings(config)
    if findings:
        return findings
    return project_findings(config, base_dir)


def ray_schema() -> dict:
    """Ray's bundled autoscaler schema, read without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ray is not installed: cannot read its autoscaler schema")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def schema_findings(config: dict) -> list[Finding]:
    import jsonschema  # lazy: jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    findings = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        key = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "additionalProperties" and "(" in error.message:
            for name in re.findall(r"'([^']+)'", error.message.split("(", 1)[1]):
                findings.append(Finding(_join(key, name), "unknown key (not in Ray's "
                                        "autoscaler schema)"))
        else:
            findings.append(Finding(key, error.message))
    return findings


def ray_findings(config: dict) -> list[Finding]:
    """Ray's own validation of the filled-in config, as `ray up` runs it."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # lazy: ray

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # Ray raises ValueError, RuntimeError, jsonschema errors
        return [Finding("", f"Ray rejects the config: {err}")]
    return []


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _commands(config: dict, key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


def node_setup(config: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node of this type, in order."""
    head = node_type == config["head_node_type"]
    own = config["available_node_types"][node_type]
    if head:
        return _commands(config, "setup_commands") + _commands(config, "head_setup_commands")
    if "worker_setup_commands" in own:  # a node type's own list replaces both global ones
        return [str(c) for c in own["worker_setup_commands"] or []]
    return _commands(config, "setup_commands") + _commands(config, "worker_setup_commands")


def _all_commands(config: dict) -> list[tuple[str, str]]:
    """(key, command) for every command anywhere in the file."""
    out = [(f"{k}.{i}", str(c)) for k in COMMAND_KEYS for i, c in enumerate(config.get(k) or [])]
    for name, node in config["available_node_types"].items():
        for k in ("initialization_commands", "worker_setup_commands"):
            out += [(f"available_node_types.{name}.{k}.{i}", str(c))
                    for i, c in enumerate(node.get(k) or [])]
    return out


def project_findings(config: dict, base_dir: Path) -> list[Finding]:
    return (_head_findings(config) + _worker_findings(config) + _storage_findings(config)
            + _install_findings(config, base_dir) + _sandbox_findings(config)
            + _auth_findings(config)
            + _exposure_findings(config) + _mlflow_findings(config)
            + _placeholder_findings(config))


def _head_findings(config: dict) -> list[Finding]:
    name = config["head_node_type"]
    key = f"available_node_types.{name}.resources"
    resources = config["available_node_types"][name].get("resources", {})
    findings = []
    if resources.get(DRIVER_RESOURCE, 0) < 1:
        findings.append(Finding(key, f"the head must offer the custom resource "
                                f"{DRIVER_RESOURCE!r} (trial drivers run there, next to the "
                                "MLflow server)"))
    if resources.get("GPU", 0) > 0:
        findings.append(Finding(key, "the head is a CPU node: GPU work belongs on worker "
                                "node types"))
    if resources.get("CPU", None) != 0:
        findings.append(Finding(f"{key}.CPU", "the head advertises CPUs, so fine-tunes and "
                                "trial work may be scheduled next to the driver and MLflow; "
                                "set CPU: 0", "warning"))
    return findings


def _worker_findings(config: dict) -> list[Finding]:
    head = config["head_node_type"]
    workers = {n: t for n, t in config["available_node_types"].items() if n != head}
    if not workers:
        return [Finding("available_node_types", "no worker node type: the study's fine-tunes "
                        "and trials need GPU workers")]
    findings = []
    for name, node in workers.items():
        key = f"available_node_types.{name}"
        low, high = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
        if low > high:
            findings.append(Finding(f"{key}.min_workers", f"min_workers {low} is above "
                                    f"max_workers {high}"))
        if high == 0:
            findings.append(Finding(f"{key}.max_workers", "max_workers is 0: this node type "
                                    "is never launched", "warning"))
        if node.get("resources", {}).get(DRIVER_RESOURCE, 0) > 0:
            findings.append(Finding(f"{key}.resources.{DRIVER_RESOURCE}", "only the head may "
                                    "offer the trial drivers' resource (they talk to MLflow "
                                    "on the head's loopback)"))
    if not any(n.get("resources", {}).get("GPU", 0) >= 1 for n in workers.values()):
        findings.append(Finding("available_node_types", "no worker node type offers a GPU"))
    return findings


def _storage_findings(config: dict) -> list[Finding]:
    """Shared storage: set in exactly one command, mounted by every node before Ray starts."""
    homes = [k for k, c in _all_commands(config) if re.search(r"\bSOUPS_HOME=", c)]
    if len(homes) != 1:
        where = ", ".join(homes) or "nowhere"
        return [Finding("setup_commands", "shared storage must be configured in one place: "
                        f"SOUPS_HOME is set in {len(homes)} commands ({where})")]
    findings = []
    for name in config["available_node_types"]:
        setup = node_setup(config, name)
        key = f"available_node_types.{name}"
        if not any(re.search(r"\bSOUPS_HOME=", c) for c in setup):
            findings.append(Finding(key, f"node type {name} does not get SOUPS_HOME ({homes[0]})"
                                    ": its setup commands replace the global ones"))
        if not any(MOUNT.search(c) for c in setup):
            findings.append(Finding(key, f"node type {name}: no setup command mounts the "
                                    "shared storage (NFS, EFS, S3 or GCS FUSE)"))
    return findings


def _project_mount(config: dict, base_dir: Path) -> str | None:
    """The remote path that file_mounts copies this project to (source '.' or this folder)."""
    for remote, local in (config.get("file_mounts") or {}).items():
        source = (base_dir / Path(str(local)).expanduser()).resolve()
        if (source / "pyproject.toml").is_file() and (source / "study").is_dir():
            return str(remote).rstrip("/")
    return None


def _install_findings(config: dict, base_dir: Path) -> list[Finding]:
    remote = _project_mount(config, base_dir)
    if remote is None:
        return [Finding("file_mounts", "no file mount copies this project to the nodes "
                        "(e.g. \"~/lora-soups\": \".\")")]
    findings = []
    for name, node in config["available_node_types"].items():
        setup = node_setup(config, name)
        key = f"available_node_types.{name}"
        project = [i for i, c in enumerate(setup)
                   if re.search(r"\bpip\b.*\binstall\b", c) and remote in c]
        torch = [i for i, c in enumerate(setup) if re.search(r"\btorch==\d", c)]
        if not project:
            findings.append(Finding(key, f"node type {name}: no setup command installs the "
                                    f"project (pip install -e {remote})"))
        if not torch:
            findings.append(Finding(key, f"node type {name}: no setup command installs a "
                                    "pinned torch (torch==X.Y.Z) before the project"))
        elif project and torch[0] > project[0]:
            findings.append(Finding(key, f"node type {name}: torch is installed after the "
                                    "project, whose deepspeed would already have pulled one"))
        gpu = node.get("resources", {}).get("GPU", 0) > 0
        if gpu and torch and "whl/cpu" in setup[torch[0]] and "nvidia-smi" not in setup[torch[0]]:
            findings.append(Finding(key, f"node type {name} has GPUs but installs the CPU "
                                    "build of torch"))
    return findings


def _sandbox_findings(config: dict) -> list[Finding]:
    """Every node runs generated programs in bubblewrap (docs/sandbox.md), so every node
    type's setup installs it; the study checks on each node before it starts."""
    findings = []
    for name in config["available_node_types"]:
        if not any(BWRAP_INSTALL.search(c) for c in node_setup(config, name)):
            findings.append(Finding(f"available_node_types.{name}", f"node type {name}: no "
                                    "setup command installs bubblewrap (the sandbox of "
                                    "generated programs: apt-get install -y bubblewrap)"))
    return findings


def _auth_findings(config: dict) -> list[Finding]:
    findings = []
    mounts = {str(k) for k in (config.get("file_mounts") or {})}
    commands = _all_commands(config)
    if TOKEN_PATH not in mounts and not any("RAY_AUTH_TOKEN" in c for _, c in commands):
        findings.append(Finding("file_mounts", f"the Ray auth token must reach every node: "
                                f"mount {TOKEN_PATH} (made by `ray get-auth-token --generate`)"))
    for key, command in commands:
        if "RAY_AUTH_MODE=disabled" in command:
            findings.append(Finding(key, "token authentication is disabled: anyone who can "
                                    "reach the cluster could run code on it"))
    # Exported by a global setup command (every node runs those before `ray start`).
    exported = any("RAY_AUTH_MODE=token" in c for k, c in commands
                   if k.split(".")[0] in ("setup_commands", "initialization_commands"))
    for key, command in commands:
        if "ray start" in command and "RAY_AUTH_MODE=token" not in command and not exported:
            findings.append(Finding(key, "ray start without RAY_AUTH_MODE=token: nodes must "
                                    "all use token authentication"))
    return findings


def _option(command: str, name: str) -> list[str]:
    """Values of `--name V` / `--name=V` in a shell command."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    values = []
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith(name + "="):
            values.append(word.split("=", 1)[1])
    return values


def _exposure_findings(config: dict) -> list[Finding]:
    findings = []
    for key, command in _all_commands(config):
        for option in ("--dashboard-host", "--host", "-h"):
            for value in _option(command, option):
                if value in EVERY_INTERFACE:
                    findings.append(Finding(key, f"{option} {value} binds a service to every "
                                            "interface; bind 127.0.0.1 and use port forwarding"))
    group = config["provider"].get("security_group") or {}
    for i, rule in enumerate(group.get("IpPermissions") or []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(ranges):
            findings.append(Finding(f"provider.security_group.IpPermissions.{i}",
                                    "opens a port to the whole internet"))
    if config["provider"]["type"] == "aws":
        for name, node in config["available_node_types"].items():
            node_config = node.get("node_config", {})
            if "SecurityGroupIds" not in node_config and "NetworkInterfaces" not in node_config:
                findings.append(Finding(f"available_node_types.{name}.node_config",
                                        "no SecurityGroupIds: Ray would create a security "
                                        "group with SSH open to 0.0.0.0/0"))
    return findings


def mlflow_server(config: dict) -> str | None:
    """The head command that starts `mlflow server`, if any."""
    head = _commands(config, "head_start_ray_commands") + _commands(config, "head_setup_commands")
    return next((c for c in head if "mlflow server" in c), None)


def _mlflow_findings(config: dict) -> list[Finding]:
    command = mlflow_server(config)
    key = "head_start_ray_commands"
    if command is None:
        return [Finding(key, "no `mlflow server` on the head: studies need a tracking server")]
    findings = []
    backend = _option(command, "--backend-store-uri")
    if not backend or not backend[0].startswith(DATABASE_SCHEMES):
        findings.append(Finding(key, "mlflow server needs --backend-store-uri with a database "
                                f"({', '.join(DATABASE_SCHEMES)}), got {backend or 'none'}"))
    artifacts = _option(command, "--artifacts-destination")
    shared = ("$SOUPS_SHARED", "${SOUPS_SHARED}", "$SOUPS_HOME", "${SOUPS_HOME}", "s3://", "gs://")
    if not artifacts or not artifacts[0].startswith(shared):
        findings.append(Finding(key, "mlflow server needs --artifacts-destination on the "
                                "shared storage ($SOUPS_SHARED/...) or an object store, got "
                                f"{artifacts or 'none'}"))
    return findings


def _placeholder_findings(config: dict) -> list[Finding]:
    found: list[str] = []

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, _join(path, str(k)))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, _join(path, str(i)))
        elif isinstance(value, str) and PLACEHOLDER in value:
            found.append(path)

    walk(config, "")
    return [Finding(k, f"still holds a {PLACEHOLDER} placeholder", "warning") for k in found]


def mlflow_port(config: dict) -> int | None:
    command = mlflow_server(config)
    ports = _option(command, "--port") if command else []
    return int(ports[0]) if ports and ports[0].isdigit() else (5000 if command else None)


def check_study(spec, config: dict) -> list[Finding]:
    """A study spec (`study.spec.StudySpec`) against a cluster file that passed its checks.
    Keys are prefixed `study.`."""
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]].get("resources", {})
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    findings = []
    if spec.cluster.address is None:
        findings.append(Finding("study.cluster.address", "not set: a study started where no "
                                "cluster runs would start a local Ray instance; use 'auto'",
                                "warning"))
    uri = spec.tracking.uri or ""
    if not uri.startswith(("http://", "https://")):
        findings.append(Finding("study.tracking.uri", "a cluster study logs to the head's "
                                f"MLflow server (http://127.0.0.1:{mlflow_port(config)}), got "
                                f"{uri or 'the default SQLite file'}"))
    elif urlparse(uri).hostname in ("127.0.0.1", "localhost") and \
            urlparse(uri).port != mlflow_port(config):
        findings.append(Finding("study.tracking.uri", f"port {urlparse(uri).port} is not the "
                                f"MLflow server's ({mlflow_port(config)})"))
    if head.get(spec.cluster.driver_resource, 0) < 1:
        findings.append(Finding("study.cluster.driver_resource", "the head does not offer "
                                f"{spec.cluster.driver_resource!r}: trials would run whole on "
                                "worker nodes, which cannot reach MLflow on the head's loopback"))
    for name in spec.cluster.worker_resources:
        if not any(n.get("resources", {}).get(name, 0) > 0 for n in workers):
            findings.append(Finding(f"study.cluster.worker_resources.{name}", "no worker node "
                                    "type offers this resource: the work would never start"))
    gpus = [n.get("resources", {}).get("GPU", 0) for n in workers]
    cpus = [n.get("resources", {}).get("CPU", 0) for n in workers]
    total_gpus = sum(n.get("resources", {}).get("GPU", 0) * n.get("max_workers", 0)
                     for n in workers)
    ft = spec.finetune
    if ft.use_gpu and ft.num_workers > total_gpus:
        findings.append(Finding("study.finetune.num_workers", f"{ft.num_workers} GPU workers "
                                f"but the cluster has at most {total_gpus} GPUs"))
    if ft.cpus_per_worker is None:
        findings.append(Finding("study.finetune.cpus_per_worker", "not set: the default "
                                "divides the driver machine's cores (the head's), not a GPU "
                                "node's", "warning"))
    elif ft.cpus_per_worker > max(cpus, default=0):
        findings.append(Finding("study.finetune.cpus_per_worker", f"{ft.cpus_per_worker} CPUs "
                                f"per worker, but no worker node has more than {max(cpus)}"))
    if spec.search.gpus_per_trial > max(gpus, default=0):
        findings.append(Finding("study.search.gpus_per_trial", f"{spec.search.gpus_per_trial} "
                                f"GPUs per trial, but no worker node has more than {max(gpus)}"))
    if spec.search.cpus_per_trial > max(cpus, default=0):
        findings.append(Finding("study.search.cpus_per_trial", f"{spec.search.cpus_per_trial} "
                                f"CPUs per trial, but no worker node has more than {max(cpus)}"))
    if spec.storage is not None and not Path(spec.storage).is_absolute():
        findings.append(Finding("study.storage", "a relative path means a different folder "
                                "for every process; use $SOUPS_HOME (the default) or an "
                                "absolute path on the shared storage"))
    return findings
