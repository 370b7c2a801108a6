"""DATA-MIX: one training set built from several skill datasets in given proportions.

The paper's DATA-MIX baseline (Prabhakar et al., 2024, arXiv 2410.13025, section 4) trains
one LoRA on 100% of both skill datasets; CAT's weights are trained on a small share of each
(about 5%). Both are `mix_datasets` with different proportions. The mix is a pure function
of (datasets, proportions, seed): the same inputs give the same rows in the same order, so
the adapter cache can fingerprint it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

MIX_COLUMNS = ("prompt", "completion")


def mix_counts(sizes: Mapping[str, int], proportions: Mapping[str, float]) -> dict[str, int]:
    """Rows taken from each source: round(proportion * size). A proportion above 1
    repeats the source (2.0 = every row twice); a source missing from `proportions` is an
    error, not a silent 0."""
    missing = sorted(set(sizes) - set(proportions))
    extra = sorted(set(proportions) - set(sizes))
    if missing:
        raise ValueError(f"no proportion given for dataset {missing[0]!r}")
    if extra:
        raise ValueError(f"proportion given for unknown dataset {extra[0]!r}; "
                         f"datasets: {sorted(sizes)}")
    counts = {}
    for name, share in proportions.items():
        if not (isinstance(share, int | float) and math.isfinite(share) and share >= 0):
            raise ValueError(f"proportion of {name!r} must be a finite number >= 0, got {share!r}")
        counts[name] = round(share * sizes[name])
    if not any(counts.values()):
        raise ValueError(f"the mix is empty: proportions {dict(proportions)} of sizes "
                         f"{dict(sizes)}")
    return counts


def mix_indices(sizes: Mapping[str, int], proportions: Mapping[str, float],
                seed: int = 0) -> list[tuple[str, int]]:
    """(source, row index) pairs of the mix, shuffled. Each source contributes a seeded
    sample without replacement (whole passes first when the proportion exceeds 1)."""
    counts = mix_counts(sizes, proportions)
    rng = random.Random(seed)
    picked: list[tuple[str, int]] = []
    for name in sorted(counts):  # sorted: the result must not depend on dict order
        size, want = sizes[name], counts[name]
        if want and not size:
            raise ValueError(f"dataset {name!r} is empty")
        full, rest = divmod(want, size) if size else (0, 0)
        order = list(range(size))
        rows = order * full
        rng.shuffle(order)
        rows += sorted(order[:rest])  # sorted: a 5% share keeps the source's order of rows
        picked += [(name, i) for i in rows]
    rng.shuffle(picked)
    return picked


def mix_datasets(datasets: Mapping[str, object], proportions: Mapping[str, float],
                 seed: int = 0):
    """A `datasets.Dataset` with columns prompt, completion, source: `proportions[name]` of
    each dataset (1.0 = all of it), shuffled deterministically with `seed`.

    `datasets` maps a source name to a `datasets.Dataset` (or a list of dicts) having at
    least the columns prompt and completion.
    """
    from datasets import Dataset  # lazy: datasets

    for name, rows in datasets.items():
        columns = rows.column_names if hasattr(rows, "column_names") else (
            list(rows[0]) if len(rows) else list(MIX_COLUMNS))
        lacking = [c for c in MIX_COLUMNS if c not in columns]
        if lacking:
            raise ValueError(f"dataset {name!r} lacks column {lacking[0]!r} (has {columns})")
    sizes = {name: len(rows) for name, rows in datasets.items()}
    picked = mix_indices(sizes, proportions, seed)
    columns = {name: _columns(rows) for name, rows in datasets.items()}
    return Dataset.from_dict({
        "prompt": [columns[name]["prompt"][i] for name, i in picked],
        "completion": [columns[name]["completion"][i] for name, i in picked],
        "source": [name for name, _ in picked],
    })


def _columns(rows) -> dict[str, list[str]]:
    if hasattr(rows, "column_names"):
        return rows.select_columns(list(MIX_COLUMNS)).to_dict()
    return {c: [row[c] for row in rows] for c in MIX_COLUMNS}
