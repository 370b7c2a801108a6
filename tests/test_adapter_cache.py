"""The adapter cache with a fake training (writes a tiny real adapter): a second request
trains nothing, concurrent requests (threads and processes) train once, a failed or killed
training leaves no entry, and every key input changes the key. Also the DATA-MIX sampler."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from soups.adapters import LoraAdapter, LoraModule, save_adapter
from soups.training.adapter_cache import ENTRY_FILE, TMP_DIR, AdapterCache, cache_key

pytestmark = pytest.mark.unit

INPUTS = {"model": "abc", "data": "def", "lora": {"rank": 4}, "train": {"lr": 1e-3}, "seed": 0}


def _fake_train(tmp: Path, delay: float = 0.0, marker: Path | None = None) -> None:
    if marker is not None:
        with marker.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
    time.sleep(delay)
    module = LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), scaling=1.0)
    save_adapter(tmp, {"model.layers.0.q_proj": module}, {"base_model_name_or_path": "abc"})


def test_second_request_is_served_from_the_cache(tmp_path):
    cache = AdapterCache(tmp_path)
    calls = []
    first = cache.get_or_train(INPUTS, lambda tmp: (calls.append(1), _fake_train(tmp)))
    second = cache.get_or_train(dict(INPUTS), lambda tmp: calls.append(2))
    assert first.trained and not second.trained and calls == [1]
    assert first.path == second.path == tmp_path.resolve() / cache_key(INPUTS)
    assert (first.path / ENTRY_FILE).is_file()
    assert LoraAdapter.open(first.path).module_names == ["model.layers.0.q_proj"]
    assert cache.lookup(INPUTS) == first.path


def test_concurrent_threads_train_once(tmp_path):
    cache = AdapterCache(tmp_path, poll_s=0.05)
    marker = tmp_path / "trainings.txt"
    results = []

    def request():
        results.append(cache.get_or_train(INPUTS, lambda tmp: _fake_train(tmp, 0.5, marker)))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(marker.read_text().splitlines()) == 1
    assert sum(r.trained for r in results) == 1 and len({r.path for r in results}) == 1


def _process_request(root: str, marker: str, queue) -> None:
    entry = AdapterCache(root, poll_s=0.05).get_or_train(
        INPUTS, lambda tmp: _fake_train(tmp, 1.0, Path(marker)))
    queue.put(entry.trained)


def test_concurrent_processes_train_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    marker = tmp_path / "trainings.txt"
    workers = [context.Process(target=_process_request, args=(str(tmp_path), str(marker), queue))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    trained = sorted(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join()
    assert trained == [False, False, True]
    assert len(marker.read_text().splitlines()) == 1


def test_failed_training_stores_nothing_and_the_next_request_trains(tmp_path):
    cache = AdapterCache(tmp_path)

    def broken(tmp: Path) -> None:
        _fake_train(tmp)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_train(INPUTS, broken)
    assert cache.lookup(INPUTS) is None
    assert not (tmp_path / cache_key(INPUTS)).exists()
    assert list((tmp_path / TMP_DIR).iterdir()) == []
    # A training that writes something that is not an adapter is refused as well.
    with pytest.raises(Exception, match="adapter"):
        cache.get_or_train(INPUTS, lambda tmp: tmp.mkdir())
    assert cache.lookup(INPUTS) is None
    assert cache.get_or_train(INPUTS, _fake_train).trained


def _killed_request(root: str) -> None:
    AdapterCache(root).get_or_train(INPUTS, lambda tmp: _fake_train(tmp, 60.0))


def test_killed_training_leaves_no_entry_and_does_not_block(tmp_path):
    context = multiprocessing.get_context("spawn")
    worker = context.Process(target=_killed_request, args=(str(tmp_path),))
    worker.start()
    lock = tmp_path / ".locks" / f"{cache_key(INPUTS)}.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not lock.exists():
        time.sleep(0.1)
    time.sleep(1.0)  # inside train_fn, holding the lock
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    cache = AdapterCache(tmp_path, poll_s=0.05)
    assert cache.lookup(INPUTS) is None  # no half-written entry
    entry = cache.get_or_train(INPUTS, _fake_train)  # the dead process's lock is released
    assert entry.trained and LoraAdapter.open(entry.path)
    assert list((tmp_path / TMP_DIR).iterdir()) == []  # its leftovers were removed


@pytest.mark.parametrize("path, value", [
    (("model",), "abd"), (("data",), "deg"), (("lora", "rank"), 8), (("train", "lr"), 2e-3),
    (("seed",), 1),
])
def test_every_input_changes_the_key(path, value):
    changed = {k: dict(v) if isinstance(v, dict) else v for k, v in INPUTS.items()}
    if len(path) == 1:
        changed[path[0]] = value
    else:
        changed[path[0]][path[1]] = value
    assert cache_key(changed) != cache_key(INPUTS)
    assert cache_key({**INPUTS}) == cache_key(dict(reversed(list(INPUTS.items()))))


def _rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} {i}", "completion": f"{i}"} for i in range(n)]


def test_data_mix_takes_each_share_seeded_and_shuffled():
    from soups.data.data_mix import mix_datasets

    sources = {"math": _rows("math", 40), "code": _rows("code", 20)}
    mix = mix_datasets(sources, {"math": 0.25, "code": 1.0}, seed=3)
    assert mix["source"].count("math") == 10 and mix["source"].count("code") == 20
    assert len(set(mix["prompt"])) == 30  # a share is sampled without replacement
    assert all(p.startswith(s) for p, s in zip(mix["prompt"], mix["source"], strict=True))
    assert mix.to_dict() == mix_datasets(sources, {"math": 0.25, "code": 1.0}, seed=3).to_dict()
    other = mix_datasets(sources, {"math": 0.25, "code": 1.0}, seed=4)
    assert other["prompt"] != mix["prompt"]
    twice = mix_datasets(sources, {"math": 0.0, "code": 2.0})
    assert sorted(twice["prompt"]) == sorted(2 * [r["prompt"] for r in sources["code"]])


@pytest.mark.parametrize("proportions, message", [
    ({"math": 1.0}, "no proportion given for dataset 'code'"),
    ({"math": 1.0, "code": 1.0, "bio": 1.0}, "unknown dataset 'bio'"),
    ({"math": -0.5, "code": 1.0}, "proportion of 'math' must be .* got -0.5"),
    ({"math": float("nan"), "code": 1.0}, "got nan"),
    ({"math": 0.0, "code": 0.0}, "the mix is empty"),
])
def test_data_mix_refuses_bad_proportions_by_name(proportions, message):
    from soups.data.data_mix import mix_datasets

    with pytest.raises(ValueError, match=message):
        mix_datasets({"math": _rows("math", 4), "code": _rows("code", 4)}, proportions)
