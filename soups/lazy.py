"""A module imported when first used: cheap commands (`soups merge --list`) import the
modules that name torch without paying torch's seconds of import. `lazy_exports` does the
same for a package's public names (`soups.compose.cat`, `soups.compose.lorahub`,
`soups.compose.moe`)."""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module `name`; the first attribute read imports it."""

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.__name__), attribute)


def lazy(name: str) -> LazyModule:
    return LazyModule(name)


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's module `__getattr__`: each public name in `exports` (name -> submodule)
    is imported from its submodule on first use."""
    def __getattr__(name: str):  # noqa: N807 (the module hook's own name)
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    return __getattr__
