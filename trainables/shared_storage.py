"""Pre-flight check of a multi-node study: every node sees the study's storage folders.

Ray Train checkpoints, Tune's experiment, the adapter cache, the base model and the datasets
are plain folders that workers on any node read and write, so they must be one shared file
system (NFS, EFS, ...) mounted at the same path everywhere. A folder that only exists on the
head would make a worker node fail minutes later with a confusing error, or worse, write
checkpoints nobody else sees. The check round-trips a token both ways: the driver writes a
file into each folder, a task pinned to every alive node reads it and writes its own answer
there, and the driver reads the answers back.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

from soups.errors import SoupsError
from trainables.every_node import on_every_node

PROBE_DIR = ".soups-shared-check"


class StorageNotShared(SoupsError, RuntimeError):
    """Some node does not see a storage folder the study needs (message names both)."""


def probe(folders: list[str], token: str, node: str) -> dict[str, str]:
    """On one node: for each folder, "ok" or what is wrong; leaves an answer file."""
    out = {}
    for folder in folders:
        probe_dir = Path(folder) / PROBE_DIR / token
        try:
            seen = (probe_dir / "token").read_text()
        except OSError as err:
            out[folder] = f"cannot read {probe_dir / 'token'} ({err.strerror or err})"
            continue
        if seen != token:
            out[folder] = f"{probe_dir / 'token'} holds another token"
            continue
        try:
            (probe_dir / f"answer-{node}").write_text(socket.gethostname())
        except OSError as err:
            out[folder] = f"cannot write into {probe_dir} ({err.strerror or err})"
            continue
        out[folder] = "ok"
    return out


def unshared(folders: list[str], answers: dict[str, dict[str, str]], token: str
             ) -> list[str]:
    """Problems found from the nodes' answers and the answer files the driver can read."""
    problems = []
    for node, seen in answers.items():
        for folder in folders:
            if seen.get(folder) != "ok":
                problems.append(f"node {node}: {folder}: {seen.get(folder, 'no answer')}")
            elif not (Path(folder) / PROBE_DIR / token / f"answer-{node}").is_file():
                problems.append(f"node {node}: {folder}: what it wrote there is not visible "
                                "to the driver (a local folder, not shared storage)")
    return problems


def check_shared_storage(folders: list[str | Path], timeout_s: float = 120) -> int:
    """Raise `StorageNotShared` unless every alive Ray node sees every folder (created here
    if missing). Returns the number of nodes checked. Needs `ray.init()` first."""
    names = sorted({str(Path(f).resolve()) for f in folders})
    token = uuid.uuid4().hex
    for folder in names:
        probe_dir = Path(folder) / PROBE_DIR / token
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / "token").write_text(token)
    try:
        answers = {node: answer if isinstance(answer, dict) else
                   {f: f"the check could not run there ({type(answer).__name__})"
                    for f in names}
                   for node, answer in on_every_node(probe, names, token,
                                                     timeout_s=timeout_s).items()}
        problems = unshared(names, answers, token)
    finally:
        for folder in names:
            shutil.rmtree(Path(folder) / PROBE_DIR / token, ignore_errors=True)
            try:
                (Path(folder) / PROBE_DIR).rmdir()  # unless another check is running
            except OSError:
                pass
    if problems:
        raise StorageNotShared(
            "the study's storage is not shared by every node of the Ray cluster:\n  "
            + "\n  ".join(problems) + "\nput SOUPS_HOME (or the study's `storage`) on a file "
            "system mounted at the same path on every node (cluster.yaml: SOUPS_SHARED), "
            "or set cluster.check_storage: false if you know better")
    return len(answers)
