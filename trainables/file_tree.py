"""A folder as bytes keyed by relative path, and back: how adapters, generations and other
artifacts travel between a trial's work on one node and its driver or evaluator on another
(no shared storage needed)."""

from __future__ import annotations

from pathlib import Path


def read_tree(root: str | Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `root`, keyed by its path relative to `root` (under `prefix/`)."""
    root = Path(root)
    lead = f"{prefix}/" if prefix else ""
    return {lead + p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(files: dict[str, bytes], root: str | Path) -> None:
    """The files of `read_tree` written under `root`."""
    for name, data in files.items():
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
