"""Adapter folders the evaluators accept besides a PEFT LoRA.

A stage above evaluation that saves another kind of folder (the mixture of LoRA experts of
`soups.compose.moe`: routers and several LoRAs, not one LoRA) registers it here by the file
that marks such a folder and the functions, named as `module:function` entry points, that
put one on a loaded base model. `load_model` and the resident evaluator look a folder up here
and import the functions the first time a folder of that kind arrives: evaluation never
imports the stage that made it. `soups/__init__.py` registers the kinds the core ships, so
every entry point sees them; registering loads nothing but this module.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdapterKind:
    name: str
    marker: str  # the file in the folder that makes it of this kind
    # `module:function(model, folder)`: installs the folder on a loaded model in place,
    # checking that it fits (its errors name the folder), for as long as the model lives.
    install_entry: str
    # `module:function(model, folder)`: the same as a context manager; on exit, normal or
    # not, the model is as it was.
    installed_entry: str

    def matches(self, folder: str | Path) -> bool:
        return (Path(folder) / self.marker).is_file()

    def install(self, model: Any, folder: str | Path) -> object:
        return _resolve(self.install_entry)(model, Path(folder))

    def installed(self, model: Any, folder: str | Path) -> AbstractContextManager:
        return _resolve(self.installed_entry)(model, Path(folder))


def _resolve(entry: str):
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> None:
    _KINDS[kind.name] = kind


def registered() -> dict[str, AdapterKind]:
    return dict(_KINDS)


def kind_of(folder: str | Path | None) -> AdapterKind | None:
    """The registered kind of `folder`; None for a PEFT LoRA, a missing folder or None."""
    if folder is None:
        return None
    return next((kind for kind in _KINDS.values() if kind.matches(folder)), None)
