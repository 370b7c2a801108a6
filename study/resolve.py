"""A study's inputs, resolved before anything is trained: the base model folder (the
embedded one is built once, cached), each task's data, the search space and its ranks."""

from __future__ import annotations

from dataclasses import replace

from study.spec import EMBEDDED, CatTraining, SpecError, StudySpec
from trainables.merge_trial import TaskData


def method_parameters(name: str) -> set[str] | None:
    """Parameters a trial kind or merge method declares (the search-space check)."""
    from dataclasses import fields

    from soups.cat.settings import CatSettings
    from soups.merge import method_parameters as merge_parameters
    from trainables.merge_trial import CANDIDATES

    if name == "cat_learned":  # the shape of its weights and any key of the `cat` section
        shape = {f.name for f in fields(CatSettings) if f.name != "seed"}
        return shape | set(CatTraining.model_fields)
    if name in CANDIDATES:
        return set(CANDIDATES[name].parameters)
    return merge_parameters(name)


def stage1_needs(space) -> tuple[bool, bool]:
    """Whether the space's candidates need stage 1 at all, and the DATA-MIX LoRA."""
    from trainables.merge_trial import candidate_kind

    kinds = [candidate_kind(m) for m in space.methods]
    return (any(k.uses_stage1 for k in kinds),
            any("data_mix" in k.needs for k in kinds))


def load_search_space(spec: StudySpec):
    from search_spaces import load_space

    return load_space(spec.search.space, method_parameters)


def resolve_base_model(spec: StudySpec, log=print) -> str:
    if spec.base_model != EMBEDDED:
        return spec.base_model
    from soups.base_model import BaseModelSettings, build_base_model
    from soups.home import cache_dir

    settings = BaseModelSettings(seed=spec.base_model_seed)
    if spec.base_model_steps:
        settings = replace(settings, steps=spec.base_model_steps)
    return str(build_base_model(cache_dir("base_models"), settings, log=log))


def resolve_tasks(spec: StudySpec) -> dict[str, TaskData]:
    generated = {n: t for n, t in spec.tasks().items() if t.source == "generated"}
    out: dict[str, TaskData] = {}
    if generated:
        from soups.data import build_task_datasets
        from soups.home import cache_dir
        from soups.tasks import TASK_NAMES

        data_dir = build_task_datasets(cache_dir("datasets"), spec.generated.settings())
        for name in generated:
            if not (data_dir / name).exists():
                raise SpecError(f"task {name!r} has source 'generated' but the generator "
                                f"makes only {', '.join(TASK_NAMES)}")
    for name, task in spec.tasks().items():
        if task.source == "generated":
            out[name] = TaskData(str(data_dir / name), dict(task.splits))
        else:
            mapping = {"prompt": task.prompt, "completion": task.completion,
                       "expected": task.expected, "scorer": task.scorer}
            out[name] = TaskData(task.source, dict(task.splits), mapping)
    return out
