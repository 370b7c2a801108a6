"""Task datasets: the generated skills and target (train / validation / test, disjoint), saved
as Hugging Face `datasets`, and a loader of datasets in the same columns (a study renders
any other dataset through templates: `soups.tasks.task_data`).

Generated splits are disjoint by problem text across every split of every task (`math` and
`math_code` draw from the same problem space, so a target test problem never appears in the
math skill's training data either).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from soups.data.generated import EXAMPLE_BUILDERS, TASK_NAMES
from soups.errors import SoupsError, did_you_mean

SPLITS = ("train", "validation", "test")
COLUMNS = ("key", "prompt", "completion", "scorer", "function", "calls", "expected")
DATA_VERSION = 5  # bump when generators change, so cached datasets are rebuilt
DATA_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DatasetError(SoupsError):
    """A dataset that cannot be found, read or mapped onto the task columns, or generated
    data settings that cannot be met; the message names the dataset and the bad value."""


def _default_sizes() -> dict[str, dict[str, int]]:
    # Target training data is scarce by design (the paper's setting); skills have plenty.
    return {
        "math": {"train": 2000, "validation": 200, "test": 200},
        "code": {"train": 2000, "validation": 200, "test": 200},
        "math_code": {"train": 100, "validation": 200, "test": 300},
    }


@dataclass(frozen=True)
class DataSettings:
    seed: int = 0
    max_value: int = 20  # bound of the additive quantities in problems and exercises
    two_step_share: float = 0.0  # share of two-step problems / exercises (difficulty)
    # share of code exercises that are functions with arguments (`add(x, y)`) rather than
    # `solution()` programs; 0 by default: their answers start with `def`, not with the
    # worked line the skills share, and the code LoRA then writes `def` on the target too
    function_share: float = 0.0
    sizes: dict = field(default_factory=_default_sizes)

    def __post_init__(self):
        if self.max_value < 5:
            raise DatasetError(f"max_value must be at least 5, got {self.max_value}")
        for knob in ("two_step_share", "function_share"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise DatasetError(f"{knob} must be in [0, 1], got {getattr(self, knob)}")

    def key(self) -> str:
        blob = json.dumps({"version": DATA_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_rows(settings: DataSettings) -> dict[str, dict[str, list[dict]]]:
    """Rows per task and split; problem texts are unique across all of them."""
    for task, sizes in settings.sizes.items():
        if task not in EXAMPLE_BUILDERS:
            raise DatasetError(f"unknown task {task!r} in sizes; known: {sorted(EXAMPLE_BUILDERS)}"
                               + did_you_mean(task, EXAMPLE_BUILDERS))
        unknown = set(sizes) - set(SPLITS)
        if unknown:
            raise DatasetError(f"unknown split {sorted(unknown)[0]!r} for task {task!r}")
    rng = random.Random(settings.seed)
    seen: set[str] = set()
    out: dict[str, dict[str, list[dict]]] = {}
    for task in TASK_NAMES:
        build = EXAMPLE_BUILDERS[task]
        out[task] = {}
        for split in SPLITS:
            wanted, rows, misses = settings.sizes.get(task, {}).get(split, 0), [], 0
            while len(rows) < wanted:
                row = build(rng, settings)
                if row["key"] in seen:
                    misses += 1
                    if misses > 50 * wanted + 1000:
                        raise DatasetError(
                            f"cannot draw {wanted} distinct {task}/{split} examples with "
                            f"max_value={settings.max_value}: raise max_value or lower sizes"
                        )
                    continue
                seen.add(row["key"])
                rows.append(row)
            out[task][split] = rows
    return out


def build_task_datasets(root: str | Path, settings: DataSettings = DataSettings()) -> Path:
    """Generate and save every task as a `DatasetDict` under `root/<settings key>/<task>`;
    reuses what is there. Returns the directory holding the task folders."""
    from datasets import Dataset, DatasetDict  # lazy: datasets
    from datasets.utils.logging import disable_progress_bar  # lazy: datasets

    disable_progress_bar()  # saving a few thousand rows is instant; bars would only add noise
    out = Path(root) / settings.key()
    if (out / "settings.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for task, splits in generate_rows(settings).items():
        DatasetDict({
            split: Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in COLUMNS})
            for split, rows in splits.items()
        }).save_to_disk(str(tmp / task))
    (tmp / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash never leaves a half-written dataset behind
    return out


def load_task_dataset(source: str | Path, split: str | None = None):
    """Load a dataset that already has this project's columns (a `save_to_disk` folder such
    as the generated tasks, local data files, or a hub id) as a `Dataset`. A study renders
    any other dataset through its task's templates (`soups.tasks.task_data`)."""
    import datasets  # lazy: datasets

    path = Path(source)
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        kind = DATA_FILES.get(path.suffix)
        if kind is None:
            raise DatasetError(f"dataset {source}: unsupported file type {path.suffix!r}")
        loaded = datasets.load_dataset(kind, data_files=str(path))
    elif not path.exists() and (str(source).startswith(("/", ".")) or path.suffix in DATA_FILES):
        raise DatasetError(f"dataset {source}: no such folder or file")
    else:
        try:
            loaded = datasets.load_dataset(str(source))
        except (FileNotFoundError, ConnectionError) as err:
            raise DatasetError(f"dataset {source}: not a local folder or data file, nor a "
                               f"dataset on the Hugging Face Hub ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DatasetError(f"dataset {source}: name a split, one of {list(loaded)}")
        if split not in loaded:
            raise DatasetError(f"dataset {source}: no split {split!r}; splits: {list(loaded)}")
        loaded = loaded[split]
    missing = [c for c in ("prompt", "completion") if c not in loaded.column_names]
    if missing:
        raise DatasetError(f"dataset {source}: missing column {missing[0]!r}; a study task "
                           f"renders other columns through templates (columns: "
                           f"{loaded.column_names})")
    return loaded


def as_number(text: str):
    """Reference answers of real datasets come as text ('1,234', '#### 18', '3.0')."""
    cleaned = text.split("####")[-1].strip().replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return int(value) if value.is_integer() else value
