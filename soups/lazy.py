"""A module imported when first used: cheap commands (`soups merge --list`) import the
modules that name torch without paying torch's seconds of import."""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module `name`; the first attribute read imports it."""

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.__name__), attribute)


def lazy(name: str) -> LazyModule:
    return LazyModule(name)
