"""`soups methods`: every kind of candidate a study can search, from the one registry of
candidate kinds (`trainables/candidates.py`): what it is, what it needs (stage-1 adapters,
training on the skill mix) and each parameter with its type, range and default.

    soups methods             # every kind
    soups methods ties lorahub  # just these
"""

from __future__ import annotations

import typer


def methods(names: list[str] = typer.Argument(None, help="Kinds to show (default: all).")
            ) -> None:
    """List the candidate kinds a search space may name (merge methods, CAT, LoraHub, the
    mixture of LoRA experts, DATA-MIX, single skill LoRAs, the base model) and their
    parameters."""
    from trainables.candidates import CANDIDATES, describe  # lazy: numpy, pydantic

    for kind in [CANDIDATES.get(n) for n in names] if names else CANDIDATES.kinds():
        typer.echo("\n".join(describe(kind)))
