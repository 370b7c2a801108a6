"""Where a study's state lives: `$SOUPS_HOME` (default `./soups_home`), one folder per study,
plus a shared `cache/` for things every study reuses (the embedded base model, datasets), and
the default MLflow store (what the study writes and `analysis/` reads)."""

from __future__ import annotations

import os
from pathlib import Path

TRACKING_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable


def soups_home() -> Path:
    return Path(os.environ.get("SOUPS_HOME", "soups_home")).resolve()


def cache_dir(kind: str) -> Path:
    return soups_home() / "cache" / kind


def default_tracking_uri(home: Path) -> str:
    """The SQLite database under `home`, at an absolute path: Ray changes the working
    directory of trials."""
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"
