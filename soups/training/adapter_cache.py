"""A content-addressed cache of trained adapters: train each adapter once, reuse it forever.

An entry is keyed by a hash of everything that determines the adapter (base model
fingerprint, dataset fingerprint, LoRA and training settings, seed, the trainer's code
version), given by the caller as a JSON-able mapping. `get_or_train` returns the stored
adapter or runs the training once:

- Concurrent requests for one key (threads of one process, or processes sharing the
  storage, local or NFS) wait for a single training: an in-process lock per key plus an
  `fcntl.flock` on `<root>/.locks/<key>.lock` (flock alone does not exclude threads when
  NFS emulates it with per-process POSIX locks).
- Training writes into `<root>/.tmp/<key>-<random>` and the folder is renamed into
  `<root>/<key>` only once it holds a readable adapter and its `cache_entry.json`: a rename
  is atomic within a file system, so a crashed or interrupted training never leaves a
  half-written entry, only a temporary folder that the next training of that key removes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from soups.adapters import LoraAdapter

ENTRY_FILE = "cache_entry.json"
LOCK_DIR = ".locks"
TMP_DIR = ".tmp"
_FINGERPRINT_SKIP = {".cache", ".git", "__pycache__"}


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cache key input of type {type(value).__name__} is not JSON-able: "
                    f"{value!r}")


def canonical_json(key_inputs: Mapping) -> str:
    """The key inputs as canonical JSON (sorted keys, dataclasses as dicts, tuples as lists)."""
    return json.dumps(key_inputs, sort_keys=True, separators=(",", ":"), default=_jsonable,
                      allow_nan=False)


def cache_key(key_inputs: Mapping) -> str:
    """32 hex digits (128 bits of SHA-256) of the canonical JSON of `key_inputs`."""
    return hashlib.sha256(canonical_json(key_inputs).encode()).hexdigest()[:32]


def fingerprint_files(path: str | Path) -> str:
    """SHA-256 over the relative names and contents of every file under `path` (a model
    folder: config, weights, tokenizer), so a copy elsewhere has the same fingerprint."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {root}: not a directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if _FINGERPRINT_SKIP & set(rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def fingerprint_rows(rows: Iterable[Mapping], columns: tuple[str, ...] = ("prompt", "completion")
                     ) -> str:
    """SHA-256 over the given columns of every row, in order (length-prefixed, so row
    boundaries cannot shift without changing the hash)."""
    digest = hashlib.sha256()
    count = 0
    for row in rows:
        for column in columns:
            data = str(row[column]).encode()
            digest.update(len(data).to_bytes(8, "little") + data)
        count += 1
    digest.update(count.to_bytes(8, "little"))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path  # the adapter folder (PEFT layout) plus cache_entry.json
    trained: bool  # True when this request ran the training


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(name: str) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(name, threading.Lock())


class AdapterCache:
    """Adapters stored under `root/<key>/`; `root` is a local or shared (NFS) directory."""

    def __init__(self, root: str | Path, poll_s: float = 0.2):
        self.root = Path(root).resolve()
        self.poll_s = poll_s

    def path_for(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key_inputs: Mapping) -> Path | None:
        """The stored adapter for these inputs, or None."""
        path = self.path_for(cache_key(key_inputs))
        return path if (path / ENTRY_FILE).is_file() else None

    def get_or_train(
        self,
        key_inputs: Mapping,
        train_fn: Callable[[Path], object],
        timeout_s: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> CacheEntry:
        """Return the stored adapter for `key_inputs`, or call `train_fn(tmp_dir)` once to
        write it into `tmp_dir` (a folder that does not exist yet), check it, and publish it.
        Waits (up to `timeout_s`, forever when None) while another thread or process trains
        the same key; an exception from `train_fn` propagates and stores nothing."""
        key = cache_key(key_inputs)
        path = self.path_for(key)
        if (path / ENTRY_FILE).is_file():
            return CacheEntry(key, path, trained=False)
        with _thread_lock(f"{self.root}/{key}"), self._file_lock(key, timeout_s, log):
            if (path / ENTRY_FILE).is_file():  # trained by whoever held the lock before us
                return CacheEntry(key, path, trained=False)
            self._train_into_place(key, key_inputs, train_fn, log)
        return CacheEntry(key, path, trained=True)

    def _train_into_place(self, key: str, key_inputs: Mapping, train_fn, log) -> None:
        path = self.path_for(key)
        tmp_root = self.root / TMP_DIR
        tmp_root.mkdir(parents=True, exist_ok=True)
        # We hold the key's lock, so leftovers of this key are from a dead training.
        for stale in tmp_root.glob(f"{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():  # a folder without its entry file was not written by this cache
            if log:
                log(f"adapter cache: {path} lacks {ENTRY_FILE}; moving it aside and retraining")
            path.rename(tmp_root / f"{key}-invalid-{uuid.uuid4().hex[:8]}")
        tmp = tmp_root / f"{key}-{uuid.uuid4().hex[:8]}"
        start = time.time()
        try:
            train_fn(tmp)
            LoraAdapter.open(tmp)  # refuse to publish anything that is not a readable adapter
            (tmp / ENTRY_FILE).write_text(json.dumps({
                "key": key,
                "inputs": json.loads(canonical_json(key_inputs)),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "train_seconds": round(time.time() - start, 2),
                "host": socket.gethostname(),
            }, indent=2, sort_keys=True))
            _fsync_tree(tmp)
            os.rename(tmp, path)
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename

    def _file_lock(self, key: str, timeout_s: float | None, log):
        lock_dir = self.root / LOCK_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        return _FileLock(lock_dir / f"{key}.lock", timeout_s, self.poll_s, log)


class _FileLock:
    """Exclusive `flock` on a file, polled so that a timeout is possible. The kernel drops
    the lock when its holder dies, so a killed training never blocks later requests."""

    def __init__(self, path: Path, timeout_s: float | None, poll_s: float, log):
        self.path, self.timeout_s, self.poll_s, self.log = path, timeout_s, poll_s, log
        self.handle = None

    def __enter__(self):
        self.handle = self.path.open("a+")
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if self.log and not told:
                    self.log(f"adapter cache: waiting for another training ({self.path.stem})")
                    told = True
                if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                    self.handle.close()
                    raise TimeoutError(f"adapter cache: {self.path} still locked after "
                                       f"{self.timeout_s} s") from None
                time.sleep(self.poll_s)

    def __exit__(self, *exc):
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a rename survives a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` before it is published."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)

