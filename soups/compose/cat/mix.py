"""The skill mix: a small share of every skill's training data, plus held-out rows (CAT's
training mix, and LoraHub's few-shot examples).

LoRA Soups (https://arxiv.org/abs/2410.13025) trains the CAT weights on about 5% of skill 1 +
skill 2 (not on target data) and picks the checkpoint with the lowest loss on 120 held-out
examples. Here the held-out rows come from the same skills and are disjoint from the mix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from soups.compose.cat.settings import CatError


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def skill_mix(
    skills: Sequence[Sequence[dict]],
    fraction: float | None = 0.05,
    count: int | None = None,
    held_out: int = 120,
    seed: int = 0,
    label: str = "skill",
) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each a list of {"prompt", "completion"} dicts.

    Training takes round(fraction * len(skill)) rows of every skill (at least one), or, with
    `count`, `count` rows in all split evenly over the skills. `held_out` rows, split evenly
    over the skills, come from rows not used for training (CAT and the MoE routers need some
    to pick their best weights; LoraHub, which only draws few-shot examples, asks for none).
    Seeded. `label` names the run in messages.
    """
    if not skills:
        raise CatError(f"{label} mix: no skill datasets given")
    if (fraction is None) == (count is None):
        raise CatError(f"{label} mix: give exactly one of fraction and count, got "
                       f"fraction={fraction}, count={count}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise CatError(f"{label} mix: fraction must be in (0, 1], got {fraction}")
    if count is not None and count < len(skills):
        raise CatError(f"{label} mix: count must be at least the number of skills "
                       f"({len(skills)}), got {count}")
    if held_out < 0:
        raise CatError(f"{label} mix: held_out must be at least 0, got {held_out}")
    sizes = ([max(1, round(fraction * len(s))) for s in skills] if fraction is not None
             else _split_evenly(count, len(skills)))
    held = _split_evenly(held_out, len(skills))
    rng = random.Random(seed)
    train, evaluation = [], []
    for index, (skill, n_train, n_held) in enumerate(zip(skills, sizes, held, strict=True)):
        if n_train + n_held > len(skill):
            raise CatError(f"{label} mix: skill {index} has {len(skill)} rows, fewer than the "
                           f"{n_train} training + {n_held} held-out rows asked for")
        order = list(range(len(skill)))
        rng.shuffle(order)
        rows = [{"prompt": skill[i]["prompt"], "completion": skill[i]["completion"]}
                for i in order[: n_train + n_held]]
        train += rows[:n_train]
        evaluation += rows[n_train:]
    rng.shuffle(train)
    return train, evaluation
