"""A small byte-level BPE tokenizer trained locally with `tokenizers`.

Byte-level so code (indentation, newlines) round-trips exactly; every integer up to
`max_number` is forced into the vocabulary as one token (with and without a leading space),
because a tiny model learns arithmetic and extraction far more easily over number tokens
than over digit sequences (design.md: the char-level probe scored 0 everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, max_number: int = 999):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast  # lazy: transformers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating each number makes BPE merge it into a single token before rarer pairs.
    numbers = [f"{n} x {n}\n" for n in range(max_number + 1)] * 4
    tok.train_from_iterator(_chain(texts, numbers), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable
