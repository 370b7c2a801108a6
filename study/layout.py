"""Where a study's state lives: `$SOUPS_HOME/<name>/` (or `<storage>/<name>/`) holds
`study.yaml` (the resolved spec), `tune/` (Ray Tune's experiment, restorable),
`leaderboard.json`, `prompt_format.json` (how each task's prompts were written: the exported
model card says it), `best_adapter/` and `logs/study.log`."""

from __future__ import annotations

from pathlib import Path

from soups.home import cache_dir, soups_home

SPEC_FILE = "study.yaml"
TUNE_DIR = "tune"
LEADERBOARD_FILE = "leaderboard.json"
BEST_DIR = "best_adapter"
PROMPTS_FILE = "prompt_format.json"


def study_dir(spec) -> Path:
    return Path(spec.storage).resolve() / spec.name if spec.storage else soups_home() / spec.name


def spec_files(spec) -> list[Path]:
    """Where a study's spec is saved: its folder, and $SOUPS_HOME/NAME when that differs
    (so every command finds a study by name wherever its storage is)."""
    files = [study_dir(spec) / SPEC_FILE]
    if spec.storage:
        files.append(soups_home() / spec.name / SPEC_FILE)
    return files


def adapter_cache_dir(spec) -> Path:
    """Stage-1 adapters: beside the study on shared storage, else under $SOUPS_HOME/cache."""
    return study_dir(spec).parent / "adapter_cache" if spec.storage else cache_dir("adapters")
