"""Reading a YAML file given by a user (a study, a search space, a cluster file): one error
of the caller's kind that names the file, for a missing file and for text that is not YAML."""

from __future__ import annotations

from pathlib import Path


def read_yaml(path: str | Path, error: type[Exception] = ValueError):
    """The YAML document in `path` (None for an empty file); raises `error` naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None
