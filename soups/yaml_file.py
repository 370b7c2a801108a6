"""Reading a YAML file given by a user (a study, a search space, a cluster file): one error
of the caller's kind that names the file, for a missing file and for text that is not YAML."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_yaml(path: str | Path, error: type[Exception] = ValueError):
    """The YAML document in `path` (None for an empty file); raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {yaml_problem(err)}") from None


def yaml_problem(err) -> str:
    """A YAML parse error in one line, with its place: `line 3, column 1: expected the node
    content, but found '<stream end>' (while parsing a flow node)` (PyYAML's own text spans
    lines and names its input `<unicode string>`)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = problem + (f" ({context})" if context else "")
    return where + " ".join(text.split())
