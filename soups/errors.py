"""The project's one error type. Every error class of the project subclasses `SoupsError`
(`SpecError`, `SearchSpaceError`, `MergeError`, `AdapterError`, `DatasetError`, ...), so the
`soups` command line has one handler (study/cli.py): it prints `error: <message>` and exits
with status 2, without a traceback. Any other exception is a bug and keeps its traceback.

Standard library only: every package may import this module.
"""

from __future__ import annotations


class SoupsError(ValueError):
    """Bad input or a state the user can fix; the message names the bad value (and how to
    fix it where that is not obvious). A ValueError, as the project's errors were before."""
