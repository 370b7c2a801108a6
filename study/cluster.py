"""A study on a Ray cluster: the pre-flight checks (the program sandbox on every node,
shared storage; the `cluster` section of the spec, docs/cluster.md). On one machine the
storage check is a no-op; the sandbox is checked here too. The trial drivers that a cluster
gets are chosen in `trainables/tuner.py`."""

from __future__ import annotations

from pathlib import Path

from soups.evaluation.sandbox import UNSAFE
from soups.home import soups_home
from study.spec import SpecError, StudySpec
from trainables.every_node import check_sandbox_on_nodes
from trainables.shared_storage import check_shared_storage


def storage_folders(spec: StudySpec, root: Path) -> list[Path]:
    """Folders every node reads or writes: the study (Tune, fine-tune checkpoints, trial
    checkpoints), the adapter cache, and `$SOUPS_HOME/cache` (base model, datasets); a local
    base model folder too."""
    folders = [root, root.parent / "adapter_cache" if spec.storage else soups_home() / "cache"]
    if spec.storage:
        folders.append(soups_home() / "cache")
    base = Path(spec.base_model)
    if base.is_dir():
        folders.append(base)
    return folders


def preflight(spec: StudySpec, root: Path, log=print) -> None:
    """Before anything is trained: every node can run the program sandbox (when a task is
    scored by running programs), and every node sees the storage folders (on a multi-node
    cluster; one node always sees its own disk)."""
    import ray  # lazy: ray

    check_sandbox(spec, log)
    if not spec.cluster.check_storage or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    folders = storage_folders(spec, root)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    count = check_shared_storage(folders)  # StorageNotShared: a SoupsError the CLI prints
    log(f"shared storage: {len(folders)} folders seen by all {count} nodes")


def check_sandbox(spec: StudySpec, log=print) -> None:
    """Every alive node can run generated programs in `evaluation.sandbox` (SpecError
    naming each node that cannot, and how to fix it)."""
    if not any(task.scorer == "program" for task in spec.tasks().values()):
        return
    if spec.evaluation.sandbox == UNSAFE:
        log(f"WARNING: evaluation.sandbox is {UNSAFE}: generated programs run without "
            "isolation on every node")
        return
    problems = check_sandbox_on_nodes(spec.evaluation.sandbox)
    if problems:
        raise SpecError("generated programs cannot run in the sandbox "
                        f"({spec.evaluation.sandbox}) on every node:\n  " + "\n  ".join(problems))
    log(f"program sandbox: {spec.evaluation.sandbox} works on every node")
