"""A study on a Ray cluster: the pre-flight storage check and the trial drivers (the
`cluster` section of the spec; docs/cluster.md). On one machine both are no-ops."""

from __future__ import annotations

from pathlib import Path

from study.spec import SpecError, StudySpec
from trainables.merge_trial import TrialContext


def is_cluster(spec: StudySpec) -> bool:
    """True when the connected Ray instance offers the spec's trial-driver resource."""
    import ray

    resource = spec.cluster.driver_resource
    return bool(resource) and ray.cluster_resources().get(resource, 0) > 0


def storage_folders(spec: StudySpec, root: Path) -> list[Path]:
    """Folders every node reads or writes: the study (Tune, fine-tune checkpoints, trial
    checkpoints), the adapter cache, and `$SOUPS_HOME/cache` (base model, datasets); a local
    base model folder too."""
    from soups.home import soups_home

    folders = [root, root.parent / "adapter_cache" if spec.storage else soups_home() / "cache"]
    if spec.storage:
        folders.append(soups_home() / "cache")
    base = Path(spec.base_model)
    if base.is_dir():
        folders.append(base)
    return folders


def preflight(spec: StudySpec, root: Path, log=print) -> None:
    """Before anything is trained: every node must see the storage folders (on a
    multi-node cluster; one node always sees its own disk)."""
    import ray

    if not spec.cluster.check_storage or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    from trainables.shared_storage import StorageNotShared, check_shared_storage

    folders = storage_folders(spec, root)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        count = check_shared_storage(folders)
    except StorageNotShared as err:
        raise SpecError(str(err)) from None  # the CLI prints it as an error, no traceback
    log(f"shared storage: {len(folders)} folders seen by all {count} nodes")


def cluster_trainable(spec: StudySpec, context: TrialContext):
    """The Tune trainable of a cluster study (a driver holding one unit of the driver
    resource, its work on worker nodes), or None when not on such a cluster."""
    if not is_cluster(spec):
        return None
    from ray import tune

    from trainables.cluster_trial import cluster_trial

    work = {"num_cpus": spec.search.cpus_per_trial, "num_gpus": spec.search.gpus_per_trial,
            "resources": dict(spec.cluster.worker_resources)}
    trainable = tune.with_parameters(cluster_trial, context=context, work_options=work,
                                     node_retries=spec.cluster.node_retries)
    return tune.with_resources(trainable, {"cpu": 0, spec.cluster.driver_resource: 1})
