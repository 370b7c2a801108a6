"""Causal-LM training batches from (prompt, completion) examples.

Every dataset of this project (generated skills, the target task, or a real dataset mapped
through `soups.data.load_task_dataset`) has string columns `prompt` and `completion`. A
training sequence is `prompt + completion + eos`, truncated to `max_length` tokens. Labels
are -100 (ignored) on padding, and on the prompt when `loss_on="completion"`; the paper
trains CAT weights with the loss on the whole sequence (`loss_on="all"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soups.train_settings import LossOn

IGNORE_INDEX = -100


def encode_example(
    tokenizer, prompt: str, completion: str, max_length: int, loss_on: LossOn = "completion"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (lists of equal length <= max_length)."""
    if loss_on not in ("all", "completion"):
        raise ValueError(f"loss_on must be 'all' or 'completion', got {loss_on!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt_ids + completion_ids + [tokenizer.eos_token_id]
    n_prompt = len(bos) + len(prompt_ids)
    labels = list(ids)
    if loss_on == "completion":
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return ids[:max_length], labels[:max_length]


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into `input_ids`, `attention_mask`, `labels` (batch x len)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode_dataset(
    tokenizer, rows, max_length: int, loss_on: LossOn = "completion"
) -> list[tuple[list[int], list[int]]]:
    """Encode every row of a dataset (anything iterable of dicts with prompt/completion)."""
    return [
        encode_example(tokenizer, row["prompt"], row["completion"], max_length, loss_on)
        for row in rows
    ]


def batches(
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
):
    """Yield collated batches over one pass of `encoded` (shuffled with `generator`)."""
    order = (
        torch.randperm(len(encoded), generator=generator).tolist()
        if shuffle
        else list(range(len(encoded)))
    )
    for start in range(0, len(order), batch_size):
        yield collate([encoded[i] for i in order[start : start + batch_size]], pad_id)
