"""Where a study's state lives: `$SOUPS_HOME` (default `./soups_home`), one folder per study,
plus a shared `cache/` for things every study reuses (the embedded base model, datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def soups_home() -> Path:
    return Path(os.environ.get("SOUPS_HOME", "soups_home")).resolve()


def cache_dir(kind: str) -> Path:
    return soups_home() / "cache" / kind
