"""Causal-LM training batches from (prompt, completion) examples.

Every dataset of this project (generated skills, the target task, or a real dataset mapped
through `soups.data.datasets.load_task_dataset`) has string columns `prompt` and `completion`. A
training sequence is `bos + prompt + completion + eos`, tokenized as one text and truncated
to `max_length` tokens. Labels are -100 (ignored) on padding, and on the prompt's tokens
when `loss_on="completion"`; the paper trains CAT weights with the loss on the whole
sequence (`loss_on="all"`). `prompt_ids` encodes a generation prompt with the same BOS rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soups.errors import SoupsError
from soups.training.train_settings import LossOn

IGNORE_INDEX = -100


def encode_example(
    tokenizer, prompt: str, completion: str, max_length: int, loss_on: LossOn = "completion"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (lists of equal length <= max_length).

    `prompt + completion` is tokenized as ONE text, so the ids are those the model meets
    at generation time even where a token spans the boundary (prompt "The ans", completion
    "wer"): tokenizing the two parts apart would train on a split no tokenizer produces.
    With `loss_on="completion"` the labels of tokens whose character span ends at or before
    the end of the prompt are -100; a token straddling the boundary carries the loss (it
    holds completion text). A slow tokenizer has no character offsets: the two parts are
    then tokenized apart, as before.

    BOS comes first unless the tokenizer has none, the text already starts with it (as a
    chat template may write it) or it opens chat turns (`_bos`); EOS comes last unless the
    tokenizer has none or the completion already ends with it, trailing whitespace aside
    (a chat turn's `</s>\n`)."""
    if loss_on not in ("all", "completion"):
        raise ValueError(f"loss_on must be 'all' or 'completion', got {loss_on!r}")
    text = prompt + completion
    if getattr(tokenizer, "is_fast", False):
        ids, in_prompt = _joint_ids(tokenizer, text, len(prompt))
    else:
        ids, in_prompt = _separate_ids(tokenizer, prompt, completion)
    bos = _bos(tokenizer, text)
    eos = [tokenizer.eos_token_id] if _needs_eos(tokenizer, completion) else []
    ids = bos + ids + eos
    labels = list(ids)
    if loss_on == "completion":
        masked = [True] * len(bos) + in_prompt + [False] * len(eos)
        labels = [IGNORE_INDEX if is_prompt else token
                  for token, is_prompt in zip(ids, masked, strict=True)]
    return ids[:max_length], labels[:max_length]


def _joint_ids(tokenizer, text: str, prompt_chars: int) -> tuple[list[int], list[bool]]:
    """Ids of `text` and, per token, whether it lies wholly in its first `prompt_chars`
    characters (its span ends at or before them)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    in_prompt = [end <= prompt_chars for _, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), in_prompt


def _separate_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """The fallback without offsets: prompt ids then completion ids, tokenized apart."""
    prompt_part = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_part = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_part + completion_part, [True] * len(prompt_part) + [False] * len(
        completion_part)


def _bos(tokenizer, text: str) -> list[int]:
    """[BOS id] to put before `text`, or [] when the tokenizer has none, the text already
    starts with it (chat templates often write it themselves: it must not come twice), or
    the BOS token is a chat turn's opener (SmolLM2's `<|im_start|>`, written by its chat
    template before a role): before a plain prompt it would announce a role that never comes."""
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or (bos and text.startswith(bos)):
        return []
    template = getattr(tokenizer, "chat_template", None)
    if bos and isinstance(template, str) and bos in template:
        return []
    return [tokenizer.bos_token_id]


def _needs_eos(tokenizer, completion: str) -> bool:
    """Whether to append EOS: not when the tokenizer has none, nor when the completion
    already ends with it, trailing whitespace aside (chat templates close a turn with it
    and often a newline: `...</s>\n`)."""
    if tokenizer.eos_token_id is None:
        return False
    return not (tokenizer.eos_token and completion.rstrip().endswith(tokenizer.eos_token))


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Ids of a generation prompt, with the BOS rule of `encode_example`, so a model sees a
    prompt at generation as it saw it in training."""
    return _bos(tokenizer, text) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token's, or EOS's when the tokenizer has no pad token
    (many causal LMs). Padding is masked by the attention mask either way, and on the right
    in training (`collate`) and on the left for generation, so its id never matters to the
    result; it only has to be a valid id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise SoupsError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad "
                     f"nor an EOS token to pad batches with")


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
