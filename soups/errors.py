"""The project's one error type. Every error class of the project subclasses `SoupsError`
(`SpecError`, `SearchSpaceError`, `MergeError`, `AdapterError`, `DatasetError`, ...), so the
`soups` command line has one handler (study/cli.py): it prints `error: <message>` and exits
with status 2, without a traceback. Any other exception is a bug and keeps its traceback.

Standard library only: every package may import this module.
"""

from __future__ import annotations

import difflib


class SoupsError(ValueError):
    """Bad input or a state the user can fix; the message names the bad value (and how to
    fix it where that is not obvious). A ValueError, as the project's errors were before."""


def did_you_mean(word, choices) -> str:
    """`; did you mean 'x'?` for the choice closest to a misspelt `word`, else "": appended to
    the message of an unknown key, method, task or study name."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
