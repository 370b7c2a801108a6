"""What each candidate kind is, for readers of a study's results (the report's method
table): the registry of kinds (`trainables/candidates.py`) seen from outside the trials."""

from __future__ import annotations


def method_notes(groups) -> dict[str, dict[str, str]]:
    """For each comparison group (`ties`, `skill (math)`): its kind's family (reference,
    stage-1, merge, learned) and one-line summary; a name no kind has (a study run by an
    older version) gets neither."""
    from trainables.candidates import CANDIDATES  # lazy: numpy, pydantic

    notes = {}
    for group in groups:
        name = str(group).split(" (")[0]
        if name in CANDIDATES:
            kind = CANDIDATES.get(name)
            notes[group] = {"kind": kind.family, "what it is": kind.summary}
    return notes
