"""Learned CAT weights (`cat_weights.json`) as a heat map: one panel per LoRA, layers down,
module types across, the weight a_i^m in each cell (blank where LoRA i lacks module m)."""

from __future__ import annotations

import json
import re
from pathlib import Path

LAYER = re.compile(r"\.(\d+)\.")


def weight_grid(record: dict) -> tuple[list[int], list[str], list[list[list[float | None]]]]:
    """(layers, module types, grid[lora][layer][module]) from a `cat_weights.json` record."""
    cells: dict[tuple[int, str], list[float | None]] = {}
    for module, weights in record["weights"].items():
        found = LAYER.search(module)
        layer = int(found.group(1)) if found else -1
        cells[(layer, module.rsplit(".", 1)[-1])] = weights
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells})
    grid = [[[cells.get((layer, kind), [None] * len(record["adapters"]))[i] for kind in kinds]
             for layer in layers] for i in range(len(record["adapters"]))]
    return layers, kinds, grid


def cat_weights_figure(record: dict, names: list[str] | None = None, figure_class=None):
    """The heat map as a matplotlib Figure (of `figure_class`, default Figure); `names`
    labels the LoRAs (default: their folder names)."""
    import numpy as np  # lazy: numpy
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    layers, kinds, grid = weight_grid(record)
    names = names or [Path(a).name for a in record["adapters"]]
    values = np.array(grid, dtype=float)  # None -> nan: drawn blank
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    size = (1.1 * len(kinds) * len(grid) + 1.5, 0.45 * len(layers) + 1.6)
    fig = (figure_class or Figure)(figsize=size)
    axes = fig.subplots(1, len(grid), squeeze=False)
    for i, ax in enumerate(axes[0]):
        image = ax.imshow(values[i], vmin=min(0.0, np.nanmin(values)), vmax=top, cmap="viridis",
                          aspect="auto")
        ax.set_title(f"LoRA: {names[i]}")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("module")
        if i == 0:
            ax.set_ylabel("layer")
        for (row, col), value in np.ndenumerate(values[i]):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * top else "black")
    settings = record.get("settings", {})
    fig.suptitle(f"Learned CAT weights a_i (granularity {settings.get('granularity')}, "
                 f"normalisation {settings.get('normalisation')}, init {settings.get('init')})",
                 fontsize=9, y=1.03)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="weight")
    return fig


def plot_cat_weights(cat_weights_json: str | Path, out_png: str | Path,
                     names: list[str] | None = None) -> Path:
    """Write the heat map of a `cat_weights.json` file as a PNG."""
    fig = cat_weights_figure(json.loads(Path(cat_weights_json).read_text()), names)
    out = Path(out_png)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
