"""Where a task's data comes from and how it is shaped before training.

- `load_source`: a local data file, a `save_to_disk` folder, a folder of data files or a
  Hugging Face hub id, always as a `DatasetDict`; raw text files (.txt, .md) become one row
  per file with a column `text`.
- `source_fingerprint`: what identifies the data (file hashes or the hub id and revision),
  for MLflow.
- `carve_rows`: deterministic train / validation / test splits carved from one list of rows,
  leak-free (rows with the same key never straddle two splits).
- `filter_rows`: keep the rows a Jinja2 expression over their columns accepts.
- `normalise_key` / `decontaminate`: drop rows whose text is one of another task's
  evaluation texts, up to case and whitespace.
- `chunk_text`: raw text cut into blocks of tokens that fit the training length.

Never imports ray or mlflow; `datasets` is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from soups.data.datasets import DATA_FILES, DatasetError

TEXT_FILES = (".txt", ".md")  # raw text: one row per file, column `text`
SUPPORTED_SUFFIXES = (*DATA_FILES, *TEXT_FILES)
CARVE_ORDER = ("validation", "test", "train")  # evaluation rows first: they stay put
REST = "rest"
HASH_CHUNK = 1 << 20  # 1 MiB: large data files are hashed without reading them whole
PATH_PREFIXES = ("/", ".", "~")


# --- loading -------------------------------------------------------------------------------

def load_source(source: str, name: str | None = None, revision: str | None = None,
                data_files: list[str] | dict | None = None):
    """Load `source` as a `datasets.DatasetDict` (a single `Dataset` becomes {"train": ds}).

    `source` is a local data file (.json, .jsonl, .csv, .parquet, or raw .txt / .md), a
    folder written by `save_to_disk`, a folder of data files (`data_files` relative to it,
    or every supported file in it), or a hub id loaded with `name`, `revision` and
    `data_files`. Raises `DatasetError` naming the source when it cannot be loaded."""
    import datasets  # lazy: datasets

    path = local_path(source)
    if path is None:
        return _as_dataset_dict(_load_hub(source, name, revision, data_files))
    if path.is_file():
        if data_files is not None:
            raise DatasetError(f"dataset {source}: data_files {data_files!r} only apply to a "
                               f"folder or a hub id, not to a single file")
        return _load_files(source, {"train": [path]})
    if _is_saved_dataset(path):
        return _as_dataset_dict(datasets.load_from_disk(str(path)))
    return _load_files(source, _folder_files(source, path, data_files))


def local_path(source: str) -> Path | None:
    """The local path `source` names, or None for a hub id. A path-looking string (starts
    with / . ~, or ends in a data-file suffix) that does not exist is an error rather than
    a hub lookup, whose failure would only say the hub has no such dataset."""
    path = Path(str(source)).expanduser()
    if path.exists():
        return path
    if str(source).startswith(PATH_PREFIXES) or path.suffix in SUPPORTED_SUFFIXES:
        raise DatasetError(f"dataset {source}: no such folder or file")
    return None


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file()
               for marker in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _folder_files(source: str, folder: Path, data_files) -> dict[str, list[Path]]:
    """Split name -> files of a folder of data files: `data_files` (a list, for "train",
    or a dict split -> file or files) relative to the folder, else every supported file."""
    if data_files is None:
        found = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
                       and not p.name.startswith("."))
        if not found:
            raise DatasetError(f"dataset {source}: folder has no data files "
                               f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
        return {"train": found}
    by_split = data_files if isinstance(data_files, dict) else {"train": data_files}
    out = {}
    for split, names in by_split.items():
        names = [names] if isinstance(names, str | Path) else list(names)
        files = [folder / name for name in names]
        for file in files:
            if not file.is_file():
                raise DatasetError(f"dataset {source}: data file {file.name!r} of split "
                                   f"{split!r} not found in {folder}")
        out[str(split)] = files
    return out


def _load_files(source: str, files: dict[str, list[Path]]):
    """Data files of one kind (all json, csv, parquet or raw text) as a `DatasetDict`."""
    import datasets  # lazy: datasets

    kinds = set()
    for file in (f for split_files in files.values() for f in split_files):
        if file.suffix not in SUPPORTED_SUFFIXES:
            raise DatasetError(f"dataset {source}: unsupported file type {file.suffix!r} "
                               f"({file.name}); supported: {', '.join(SUPPORTED_SUFFIXES)}")
        kinds.add("text" if file.suffix in TEXT_FILES else DATA_FILES[file.suffix])
    if len(kinds) > 1:
        raise DatasetError(f"dataset {source}: data files of different kinds "
                           f"{sorted(kinds)}; name files of one kind with data_files")
    if kinds == {"text"}:
        return datasets.DatasetDict({
            split: datasets.Dataset.from_dict({"text": [_read_text(source, f) for f in fs]})
            for split, fs in files.items()
        })
    return datasets.load_dataset(
        kinds.pop(), data_files={split: [str(f) for f in fs] for split, fs in files.items()})


def _read_text(source: str, file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"dataset {source}: {file.name} is not UTF-8 text ({err})") from None


def _load_hub(source: str, name, revision, data_files):
    import datasets  # lazy: datasets

    try:
        return datasets.load_dataset(source, name, revision=revision, data_files=data_files)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DatasetError(f"dataset {source}: not a local folder or data file, nor a "
                           f"dataset on the Hugging Face Hub ({err})") from None


def _as_dataset_dict(loaded):
    import datasets  # lazy: datasets

    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    return datasets.DatasetDict({"train": loaded})


# --- fingerprints --------------------------------------------------------------------------

def source_fingerprint(source: str, name: str | None = None, revision: str | None = None,
                       data_files: list[str] | dict | None = None, loaded=None) -> dict:
    """What identifies the data of `source`, for MLflow: a local file's or folder's sha256
    (a folder's over its sorted relative paths and file hashes), or a hub id with the
    requested name and revision and, given the `loaded` DatasetDict, its split fingerprints
    (what `datasets` derives from the files it resolved)."""
    path = local_path(source)
    if path is None:
        record = {"kind": "hub", "id": source, "name": name, "revision": revision or "main"}
        if data_files is not None:
            record["data_files"] = data_files
        if loaded is not None:
            record["fingerprint"] = ",".join(
                f"{split}:{dataset._fingerprint}" for split, dataset in loaded.items())
        return record
    if path.is_file():
        return {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    record = {"kind": "folder", "path": str(path.resolve()), "sha256": folder_sha256(path)}
    if data_files is not None:
        record["data_files"] = data_files
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash over every file below `folder`: a renamed, added, removed or changed file
    changes it, where the folder was moved does not."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


# --- carving -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Carve:
    """Splits carved from one list of rows. `sizes` maps train / validation / test to a row
    count, a fraction in (0, 1) of all rows (rounded down) or "rest" (at most one split);
    rows no split takes are dropped. `key` names the column whose value identifies a row
    (rows sharing it stay in one split); without it the whole row does."""

    sizes: dict[str, int | float | str]
    seed: int = 0
    key: str | None = None


def carve_rows(rows: list[dict], carve: Carve, what: str) -> dict[str, list[dict]]:
    """Split `rows` as `carve` says; `what` (e.g. "task gsm_hard") names them in errors.

    Rows are ranked by sha256(f"{seed}:{key value}") (ties by the row's json), so the result
    does not depend on the input order, and assigned in the order validation, test, train:
    validation and test rows do not move when the train size changes. A group of rows with
    one key value that a split boundary would cut moves whole to the later split (the
    earlier split is then that many rows short): no key is in two splits."""
    counts = _split_counts(carve, len(rows), what)
    _check_key(rows, carve.key, what)
    ranked = sorted(((_rank(row, carve), _row_json(row), row) for row in rows),
                    key=lambda item: item[:2])
    ranks = [rank for rank, _, _ in ranked]
    carved, start, end = {}, 0, 0
    for split in CARVE_ORDER:
        if split not in counts:
            continue
        end += counts[split]
        stop = _group_start(ranks, end)
        carved[split] = [row for _, _, row in ranked[start:stop]]
        start = stop
    return carved


def carve_record(carved: dict[str, list], carve: Carve) -> dict:
    """What a carve did, for MLflow: its seed, key and the row count of each split."""
    return {"seed": carve.seed, "key": carve.key,
            "sizes": {split: len(rows) for split, rows in carved.items()}}


def _split_counts(carve: Carve, total: int, what: str) -> dict[str, int]:
    if not carve.sizes:
        raise DatasetError(f"{what}: carve sizes are empty; give a size for at least one of "
                           f"{list(CARVE_ORDER)}")
    counts, rest = {}, []
    for split, size in carve.sizes.items():
        if split not in CARVE_ORDER:
            raise DatasetError(f"{what}: unknown split {split!r} in carve sizes; "
                               f"known: {list(CARVE_ORDER)}")
        if size == REST:
            rest.append(split)
            continue
        counts[split] = _size_count(size, total, split, what)
    if len(rest) > 1:
        raise DatasetError(f"{what}: more than one split says {REST!r} ({rest}); "
                           f"at most one may take the remaining rows")
    wanted = sum(counts.values())
    if wanted > total:
        raise DatasetError(f"{what}: carve sizes {carve.sizes} ask for {wanted} rows, but "
                           f"there are only {total} rows")
    if rest:
        counts[rest[0]] = total - wanted
    return counts


def _size_count(size, total: int, split: str, what: str) -> int:
    """Rows a split's size asks for: a count, or a fraction of `total` rounded down."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise DatasetError(f"{what}: size {size!r} of split {split!r} must be a row count, "
                           f"a fraction in (0, 1) or {REST!r}")
    if isinstance(size, int):
        if size < 0:
            raise DatasetError(f"{what}: size {size} of split {split!r} is negative")
        return size
    if not 0.0 < size < 1.0:
        raise DatasetError(f"{what}: fraction {size} of split {split!r} must be in (0, 1)")
    # Exact decimal arithmetic: 0.29 * 100 in floats is 28.999..., which would round to 28.
    return math.floor(Fraction(repr(size)) * total)


def _check_key(rows: list[dict], key: str | None, what: str) -> None:
    if key is None:
        return
    for row in rows:
        if key not in row:
            raise DatasetError(f"{what}: carve key {key!r} is not a column "
                               f"(columns: {sorted(row)})")


def _row_json(row: dict) -> str:
    # default=str: values json cannot write (dates, ...) still give a stable text
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def _rank(row: dict, carve: Carve) -> str:
    value = _row_json(row) if carve.key is None else str(row[carve.key])
    return hashlib.sha256(f"{carve.seed}:{value}".encode()).hexdigest()


def _group_start(ranks: list[str], boundary: int) -> int:
    """`boundary`, moved back to the first row of the group of equal ranks it would cut."""
    while 0 < boundary < len(ranks) and ranks[boundary - 1] == ranks[boundary]:
        boundary -= 1
    return boundary


# --- row filter ----------------------------------------------------------------------------

def filter_rows(rows: list[dict], expression: str, what: str) -> list[dict]:
    """The rows for which the Jinja2 expression `expression` over their columns is true,
    e.g. "type.startswith('GSM')" or "answer | float > 0". It runs in Jinja2's immutable
    sandbox (it cannot change rows or reach Python internals); an undefined name is an
    error, not a silently false test."""
    import jinja2  # lazy: jinja2
    from jinja2 import meta  # lazy: jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # lazy: jinja2

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    try:
        test = env.compile_expression(expression)
        names = meta.find_undeclared_variables(env.parse("{{ " + expression + " }}"))
    except jinja2.TemplateSyntaxError as err:
        raise DatasetError(f"{what}: row filter {expression!r} is not a valid expression "
                           f"({err})") from None
    names -= set(env.globals)
    kept = []
    for row in rows:
        missing = sorted(names - set(row))
        if missing:
            raise DatasetError(f"{what}: row filter {expression!r} uses {missing[0]!r}, "
                               f"which is not a column (columns: {sorted(row)})")
        if _evaluate(test, row, expression, what):
            kept.append(row)
    return kept


def _evaluate(test, row: dict, expression: str, what: str) -> bool:
    import jinja2  # lazy: jinja2

    try:
        return bool(test(**row))
    except (jinja2.UndefinedError, jinja2.exceptions.SecurityError, TypeError,
            ValueError) as err:
        raise DatasetError(f"{what}: row filter {expression!r} fails on a row ({err}); "
                           f"row: {_row_json(row)[:200]}") from None


# --- decontamination -----------------------------------------------------------------------

def normalise_key(text: str) -> str:
    """`text` as decontamination compares it: unicode NFKC, case-folded, each run of
    whitespace one space, stripped. Punctuation stays: it can change a problem."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def decontaminate(rows: list[dict], banned: set[str],
                  key_of: Callable[[dict], str]) -> tuple[list[dict], int]:
    """The rows whose normalised `key_of(row)` is not in `banned` (normalised keys, e.g. the
    evaluation problems of every task), and how many were removed."""
    kept = [row for row in rows if normalise_key(key_of(row)) not in banned]
    return kept, len(rows) - len(kept)


# --- raw text ------------------------------------------------------------------------------

def chunk_text(tokenizer, texts: list[str], max_length: int) -> list[str]:
    """`texts` joined (by the tokenizer's EOS text, else a blank line) and cut into
    consecutive blocks of `max_length - 2` tokens, leaving room for the BOS and EOS the
    training encoder adds; each block decoded back to text. The blocks joined are the
    joined text: a cut that would split a multi-byte character moves back a token or
    three, so a block may be a little shorter."""
    if max_length < 3:
        raise DatasetError(f"raw text: max_length {max_length} leaves no room for text "
                           f"beside BOS and EOS; use at least 3")
    texts = [text for text in texts if text]  # an empty document would add only a separator
    if not texts:
        return []
    separator = getattr(tokenizer, "eos_token", None) or "\n\n"
    ids = tokenizer.encode(separator.join(texts), add_special_tokens=False)
    block, blocks, start = max_length - 2, [], 0
    while start < len(ids):
        end = min(start + block, len(ids))
        text = _decode(tokenizer, ids[start:end])
        # Byte-level tokens can hold part of a character; a block cut there would end in
        # U+FFFD. A UTF-8 character has at most 4 bytes, so 3 steps back reach its start.
        for _ in range(3):
            if end == len(ids) or end - start == 1 or not text.endswith("\ufffd"):
                break
            end -= 1
            text = _decode(tokenizer, ids[start:end])
        blocks.append(text)
        start = end
    return blocks


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
