"""Benchmarks: side-by-side measurements run from a checkout (`python -m benchmarks.NAME`),
each with a `--quick` mode the tests run."""

from __future__ import annotations


def quick_data(train: int, held: int = 4):
    """The generated tasks at a few rows each, for a benchmark's `--quick` mode: `train`
    training rows and `held` validation and test rows per task."""
    from soups.data.datasets import DataSettings
    from soups.data.generated import TASK_NAMES

    return DataSettings(sizes={task: {"train": train, "validation": held, "test": held}
                               for task in TASK_NAMES})
