"""The fine-tune's adapter-cache key (`trainables.finetune.finetune_key_inputs`) and the
study file's `keep_best` / `held_out` keys. The held-out evaluation (`eval_every`,
`held_out`, the held-out rows) changes what is reported, not what is trained, so it stays
out of the key, and so does `keep_best: false`, which keeps every key of the adapters
trained before these fields existed. With `keep_best` the held-out loss picks the adapter:
all of it is in the key."""

from __future__ import annotations

import dataclasses

import pytest

from soups.training.adapter_cache import cache_key
from soups.training.train_settings import LoraSettings, TrainSettings
from study.spec import SpecError, load_spec
from trainables.finetune import finetune_key_inputs

pytestmark = pytest.mark.unit

ROWS = [{"prompt": f"{a} plus 1?", "completion": f"{a + 1}"} for a in range(4)]
HELD_OUT = [{"prompt": "9 plus 1?", "completion": "10"}]
OTHER_HELD_OUT = [{"prompt": "8 plus 1?", "completion": "9"}]
# Fields that did not exist, or were not hashed, before keep_best.
EVALUATION_FIELDS = {"eval_every", "held_out", "keep_best"}


def _key_inputs(train: TrainSettings, eval_rows=HELD_OUT) -> dict:
    # Not a folder: the base model enters the key as its hub id, no files are read.
    return finetune_key_inputs("org/no-such-model", ROWS, LoraSettings(), train,
                               eval_dataset=eval_rows)


def test_default_settings_hash_the_fields_they_hashed_before_keep_best():
    train = TrainSettings()
    inputs = _key_inputs(train)
    assert not train.keep_best
    assert inputs["train"] == {k: v for k, v in dataclasses.asdict(train).items()
                               if k not in EVALUATION_FIELDS}
    assert "eval_dataset" not in inputs


def test_without_keep_best_the_held_out_evaluation_leaves_the_key_alone():
    key = cache_key(_key_inputs(TrainSettings()))
    for changed in (TrainSettings(eval_every=3), TrainSettings(held_out=8),
                    TrainSettings(held_out=0)):
        assert cache_key(_key_inputs(changed)) == key, changed
    assert cache_key(_key_inputs(TrainSettings(), OTHER_HELD_OUT)) == key
    assert cache_key(_key_inputs(TrainSettings(), None)) == key


def test_with_keep_best_every_part_of_the_held_out_evaluation_is_in_the_key():
    best = TrainSettings(keep_best=True)
    inputs = _key_inputs(best)
    assert inputs["train"] == dataclasses.asdict(best)
    assert {"keep_best", "eval_every", "held_out"} <= set(inputs["train"])
    key = cache_key(inputs)
    assert key != cache_key(_key_inputs(TrainSettings()))
    variants = [_key_inputs(dataclasses.replace(best, eval_every=3)),
                _key_inputs(dataclasses.replace(best, held_out=8)),
                _key_inputs(best, OTHER_HELD_OUT)]
    keys = {cache_key(v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


@pytest.mark.parametrize(("n_examples", "settings", "world", "expected"), [
    (32, TrainSettings(micro_batch_size=4, epochs=2), 2, {4, 8}),  # epoch ends
    (32, TrainSettings(micro_batch_size=4, epochs=2, eval_every=3), 1, {3, 6, 9, 12, 15, 16}),
    # 8 micro-batches an epoch, 3 a step: epoch 1 ends inside step 3, epoch 2 with step 6.
    (32, TrainSettings(micro_batch_size=4, grad_accumulation=3, epochs=2), 1, {3, 6}),
    (32, TrainSettings(micro_batch_size=4, max_steps=5), 1, {5}),  # fewer steps than an epoch
])
def test_eval_steps_are_each_epoch_end_or_every_eval_every_and_the_last(
        n_examples, settings, world, expected):
    assert settings.eval_steps(n_examples, world) == expected


def test_study_file_keys_reach_the_train_settings():
    spec = load_spec(None, {"finetune": {"keep_best": True, "held_out": 8}})
    train = spec.finetune.train_settings()
    assert train.keep_best and train.held_out == 8
    assert load_spec().finetune.train_settings() == TrainSettings()


def test_keep_best_without_held_out_rows_is_a_spec_error_naming_both_keys():
    with pytest.raises(SpecError) as raised:
        load_spec(None, {"finetune": {"keep_best": True, "held_out": 0}})
    assert "keep_best" in str(raised.value) and "held_out" in str(raised.value)
    with pytest.raises(SpecError, match="finetune.held_out"):
        load_spec(None, {"finetune": {"held_out": -1}})
