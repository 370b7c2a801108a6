"""A study's inputs, resolved before anything is trained: the base model folder (the
embedded one is built once, cached), each task's data, the search space and its ranks."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from functools import partial

from search_spaces import load_space
from soups.data.datasets import build_task_datasets
from soups.data.generated import TASK_NAMES
from soups.errors import did_you_mean
from soups.home import cache_dir, soups_home
from soups.tasks.task_data import TaskData
from soups.training.gguf_base import is_gguf_base, resolve_gguf_base
from study.spec import EMBEDDED, SpecError, StudySpec


def method_parameters(name: str, skills: Collection[str] | None = None):
    """What a candidate kind takes (the search-space check, from the registry of kinds
    `trainables/candidates.py`), or None for an unknown name. `skills`: the study's skills,
    the values `skill` may take (None: any name)."""
    from trainables.candidates import parameter_checks  # lazy: numpy

    return parameter_checks(name, skills)


def stage1_needs(space) -> tuple[bool, bool]:
    """Whether the space's candidates need stage 1 at all, and the DATA-MIX LoRA."""
    from trainables.candidates import DATA_MIX, candidate_kind  # lazy: numpy

    kinds = [candidate_kind(m) for m in space.methods]
    return any(k.stage1 for k in kinds), any(DATA_MIX in k.needs for k in kinds)


def load_search_space(spec: StudySpec):
    from trainables.candidates import CANDIDATES  # lazy: numpy

    return load_space(spec.search.space, partial(method_parameters, skills=tuple(spec.skills)),
                      CANDIDATES.names())


def resolve_base(name: str | None, settings=None, log=print) -> str:
    """The folder (or hub id) every stage loads a base from, as a user names it (a study's
    `base_model`, `--model` of a command): None or `embedded` the embedded model built once
    (`settings`: its BaseModelSettings, default the shipped build's), a .gguf file or a named
    real base dequantized once (soups.training.gguf_base), else the folder or hub id as given."""
    if name is not None and is_gguf_base(name):
        return str(resolve_gguf_base(name, soups_home() / "cache", log=log))
    if name is not None and name != EMBEDDED:
        return name
    from soups.training.base_model import BaseModelSettings, build_base_model  # lazy: torch

    return str(build_base_model(cache_dir("base_models"), settings or BaseModelSettings(),
                                log=log))


def resolve_base_model(spec: StudySpec, log=print) -> str:
    """The study's base (`resolve_base`), the embedded one built with the study's seed and
    pretraining steps."""
    from soups.training.base_model import BaseModelSettings  # lazy: torch

    settings = BaseModelSettings(seed=spec.base_model_seed)
    if spec.base_model_steps:
        settings = replace(settings, steps=spec.base_model_steps)
    return resolve_base(spec.base_model, settings, log=log)


def resolve_tasks(spec: StudySpec, model_dir: str | None = None) -> dict[str, TaskData]:
    """Every task's data, ready to be read in any process: generated tasks built (cached),
    the target's validation and test rows checked, and their keys left out of every train
    split (decontamination: `TaskData.removed_overlap` says how many rows that removed)."""
    generated = [n for n, t in spec.tasks().items() if t.generated]
    data_dir = None
    if generated:
        data_dir = build_task_datasets(cache_dir("datasets"), spec.generated.settings())
        for name in generated:
            if not (data_dir / name).exists():
                raise SpecError(f"task {name!r} has source 'generated' but the generator "
                                f"makes only {', '.join(TASK_NAMES)}"
                                + did_you_mean(name, TASK_NAMES))
    tasks = {name: TaskData(name, task, str(data_dir / name) if task.generated else task.source,
                            model_dir=model_dir, max_length=spec.finetune.max_length)
             for name, task in spec.tasks().items()}
    target = tasks[spec.target_name]
    evaluated = {role: target.keys(role) for role in ("validation", "test")}
    for role, keys in evaluated.items():
        if not keys:
            raise SpecError(f"target {spec.target_name!r} has no {role} rows: name its "
                            f"{role} split (splits) or carve it from one split (carve)")
    shared = evaluated["validation"] & evaluated["test"]
    if shared:
        raise SpecError(f"target {spec.target_name!r}: {len(shared)} validation rows are also "
                        f"test rows (same key, e.g. {sorted(shared)[0][:80]!r}): the search "
                        "would select on the rows it is tested on")
    banned = frozenset(evaluated["validation"] | evaluated["test"])
    return {name: replace(data, exclude=banned) for name, data in tasks.items()}


def data_report(tasks: dict[str, TaskData]) -> dict[str, dict]:
    """Per task: the data fingerprint, the rows of each role, and the train rows the
    decontamination removed (logged with the study, printed by `soups data preview`)."""
    return {name: {"fingerprint": data.fingerprint(),
                   "rows": {role: len(data.rows(role)) for role in ("train", "validation",
                                                                    "test")},
                   "decontaminated": data.removed_overlap()}
            for name, data in tasks.items()}
