"""The study spec: one YAML file, validated at the boundary (unknown keys are errors).

Every error names the file, the key path and the bad value. The objective must be a
validation split: the test split is evaluated once, after selection, never searched on.
"""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from soups.data.datasets import DataSettings
from soups.errors import SoupsError, did_you_mean
from soups.evaluation.evaluate import BATCH_SIZE, MAX_NEW_TOKENS
from soups.tasks.task_spec import TaskSpec
from soups.training.train_settings import LoraSettings, LossOn, TrainSettings
from soups.yaml_file import read_yaml, yaml_problem
from study.shipped import shipped_studies, study_file
from trainables.finetune_settings import DeepSpeedSettings, ScalingSettings
from trainables.learned_settings import CatTraining

EMBEDDED = "embedded"
# The core settings whose defaults the spec's sections repeat by reference, never by value.
_DATA, _LORA, _TRAIN = DataSettings(), LoraSettings(), TrainSettings()
_DEEPSPEED, _SCALING = DeepSpeedSettings(), ScalingSettings()


class SpecError(SoupsError):
    """A study or search-space file that is not valid; the message names file, key, value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneratedData(Strict):
    """The embedded default's generated tasks: `soups.data.datasets.DataSettings`, whose defaults
    these are."""

    seed: int = _DATA.seed
    max_value: int = Field(_DATA.max_value, ge=5)  # the problems need room below it
    two_step_share: float = Field(_DATA.two_step_share, ge=0, le=1)
    function_share: float = Field(_DATA.function_share, ge=0, le=1)
    # examples per task per split; None: DataSettings' sizes
    sizes: dict[str, dict[str, Annotated[int, Field(ge=0)]]] | None = None

    def settings(self) -> DataSettings:
        return DataSettings(**self.model_dump(exclude_none=True))


class Objective(Strict):
    task: str = "math_code"
    split: str = "validation"
    metric: str = "accuracy"

    @field_validator("split")
    @classmethod
    def _validation_only(cls, split: str) -> str:
        if split != "validation":
            raise ValueError(f"the objective must use the validation split, got {split!r}: the "
                             "test split is evaluated once, after selection")
        return split


class Finetune(Strict):
    """Stage 1: one LoRA per (skill, rank), plus DATA-MIX, through the adapter cache. The
    LoRA and optimiser keys are `soups.training.train_settings.LoraSettings` / `TrainSettings`
    (their defaults are these); the rest say where and how the fine-tunes run
    (`trainables/finetune_settings.py`)."""

    ranks: list[int] = Field(default_factory=lambda: [_LORA.rank])
    alpha_ratio: float = Field(_LORA.alpha / _LORA.rank, gt=0)  # lora_alpha = alpha_ratio * rank
    dropout: float = Field(_LORA.dropout, ge=0, lt=1)  # 1 would drop every input
    target_modules: list[str] = Field(default_factory=lambda: list(_LORA.target_modules))
    learning_rate: float = Field(_TRAIN.learning_rate, gt=0)
    epochs: float = Field(_TRAIN.epochs, gt=0)
    max_steps: int | None = Field(_TRAIN.max_steps, ge=1)  # None: `epochs` decides
    micro_batch_size: int = Field(_TRAIN.micro_batch_size, ge=1)
    grad_accumulation: int = Field(_TRAIN.grad_accumulation, ge=1)
    max_length: int = Field(_TRAIN.max_length, ge=8)  # room for a prompt and an answer
    warmup_steps: int = Field(_TRAIN.warmup_steps, ge=0)
    weight_decay: float = Field(_TRAIN.weight_decay, ge=0)
    max_grad_norm: float = Field(_TRAIN.max_grad_norm, ge=0)  # 0: no clipping
    loss_on: LossOn = _TRAIN.loss_on
    # steps between held-out losses; 0: once per epoch
    eval_every: int = Field(_TRAIN.eval_every, ge=0)
    held_out: int = Field(default=_TRAIN.held_out, ge=0)  # validation rows per skill; 0: none
    keep_best: bool = _TRAIN.keep_best  # the adapter of the lowest held-out loss, not the last
    zero_stage: Literal[0, 1, 2, 3] = _DEEPSPEED.zero_stage
    num_workers: int = Field(_SCALING.num_workers, ge=1)
    # CPU cores (and torch threads) per training worker; None: this machine's cores divided
    # among the workers (set it explicitly on a cluster, whose worker nodes may differ).
    cpus_per_worker: int | None = Field(None, ge=1)
    use_gpu: bool = _SCALING.use_gpu
    data_mix: bool = True
    seed: int = _TRAIN.seed

    def lora_settings(self, rank: int) -> LoraSettings:
        return LoraSettings(rank=rank, alpha=self.alpha_ratio * rank, dropout=self.dropout,
                            target_modules=tuple(self.target_modules))

    def train_settings(self) -> TrainSettings:
        names = {f.name for f in fields(TrainSettings)}
        return TrainSettings(**{k: v for k, v in self.model_dump().items() if k in names})

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: list[int]) -> list[int]:
        bad = [r for r in ranks if r <= 0]
        if not ranks or bad:
            raise ValueError(f"ranks must be positive integers, got {ranks}")
        return ranks

    @model_validator(mode="after")
    def _best_needs_held_out(self) -> Finetune:
        if self.keep_best and self.held_out == 0:
            raise ValueError("keep_best: true picks the adapter by its held-out loss, but "
                             "held_out: 0 holds out no rows; set held_out > 0 or keep_best: "
                             "false")
        return self


class Search(Strict):
    space: str = "paper"  # a name in search_spaces/ or a path to a YAML file
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["none", "asha"] = "none"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)  # a trial's driver needs some CPU
    gpus_per_trial: float = Field(0.0, ge=0)  # fractions share a GPU
    max_failures: int = Field(1, ge=0)
    seed: int = 0  # the search algorithm's (Optuna; the draws of seeded random search)
    # The seed axis (study/seeds.py): every candidate runs once per seed, on that seed's
    # stage-1 adapters (fine-tuned with it instead of `finetune.seed`) and with it for its
    # CAT training; the leaderboard gives each candidate's mean and standard error. None:
    # one run per candidate, stage 1 on `finetune.seed`, CAT on `seed` (no seed axis).
    seeds: list[int] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        if not seeds:
            raise ValueError("seeds must name at least one seed, or be left out")
        negative = [s for s in seeds if s < 0]
        if negative:
            raise ValueError(f"seeds must be non-negative integers, got {negative[0]}")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds must be distinct, got {repeated[0]} more than once")
        return seeds


class Evaluation(Strict):
    validation_limit: int | None = Field(200, ge=1)  # examples per task in trials; None = all
    test_limit: int | None = Field(None, ge=1)
    # The test split of every finished candidate too, not only of the selected one: a
    # comparison of methods on held-out data (selection still uses validation only).
    test_all: bool = False
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    batch_size: int = Field(BATCH_SIZE, ge=1)
    skills: bool = True  # also score every skill's validation split (retention)
    # Where model-generated programs run (docs/sandbox.md): `bwrap`, a kernel sandbox per
    # program; `unsafe_subprocess` runs them with no isolation at all, only for users who
    # run the whole study inside a throw-away container of their own.
    sandbox: Literal["bwrap", "unsafe_subprocess"] = "bwrap"
    # Where candidates are evaluated: `auto` is the GPU Tune gave the trial (CUDA), else the
    # CPU; `auto` dtype is bfloat16 on a GPU that has it, float32 on the CPU.
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Resident evaluators (trainables/evaluator.py): long-lived actors that hold the base
    # model once and evaluate the trials' candidates, side by side when they arrive
    # together. false: each trial loads the base model itself.
    resident: bool = True
    evaluators: int = Field(1, ge=1)  # evaluation slots (one per GPU on a GPU cluster)
    side_by_side: int = Field(8, ge=1)  # candidates evaluated in one pass at most
    # Ray resources each evaluator holds. CPUs 0: it works while the trials that hold CPUs
    # wait for it; GPUs None: the trial's (search.gpus_per_trial).
    evaluator_cpus: float = Field(0.0, ge=0)
    evaluator_gpus: float | None = Field(None, ge=0)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device


class Tracking(Strict):
    uri: str | None = None  # default: sqlite database under $SOUPS_HOME
    experiment: str | None = None  # default: the study name
    register_model: str | None = None  # registry name of the exported champion

    @field_validator("uri")
    @classmethod
    def _absolute_uri(cls, uri: str | None) -> str | None:
        if uri is not None and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            raise ValueError(f"tracking uri {uri!r} is relative: Ray changes the working "
                             "directory of trials; use sqlite:////absolute/path or http://")
        return uri


class Cluster(Strict):
    """Where the study runs (docs/cluster.md). The defaults run it on this machine."""

    # Ray address: None does what `ray.init()` does ($RAY_ADDRESS, else a cluster started
    # with `ray start` on this machine, else a new local instance); "auto" or "host:port"
    # requires a running cluster.
    address: str | None = None
    # When the cluster offers this resource (cluster.yaml: the head only), each trial is a
    # driver holding one unit of it (MLflow run, Tune reports, checkpoint) and its work
    # (merge, CAT, evaluation) runs as a task on a worker node, restarted elsewhere when that
    # node is lost. Otherwise a trial runs whole where Tune places it.
    driver_resource: str = "soups_driver"
    # Custom resources each fine-tune worker and each trial's work also needs, to keep them
    # on worker nodes (a GPU request does that by itself).
    worker_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    node_retries: int = Field(default=3, ge=0)  # restarts of a trial's work after node loss
    check_storage: bool = True  # before starting, every node must see the study's storage


class StudySpec(Strict):
    name: str = "default"
    # `embedded`, a save_pretrained folder, a hub id, a .gguf file or a named real base
    # (soups.training.gguf_base.NAMED_BASES: smollm2-135m-instruct)
    base_model: str = EMBEDDED
    base_model_seed: int = 0
    base_model_steps: int | None = None  # embedded model pretraining steps (None: its default)
    generated: GeneratedData = GeneratedData()
    # Each task's schema (source, carve, templates, few-shot, generation, scorer) lives in
    # the core library, which carries it into every trial: soups/tasks/task_spec.py.
    skills: dict[str, TaskSpec] = Field(
        default_factory=lambda: {"math": TaskSpec(), "code": TaskSpec(scorer="program")})
    target: dict[str, TaskSpec] = Field(
        default_factory=lambda: {"math_code": TaskSpec(scorer="program")})
    objective: Objective = Objective()
    finetune: Finetune = Finetune()
    cat: CatTraining = CatTraining()
    search: Search = Search()
    evaluation: Evaluation = Evaluation()
    tracking: Tracking = Tracking()
    storage: str | None = None  # default: $SOUPS_HOME/<name>; shared storage on a cluster
    cluster: Cluster = Cluster()

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_model_given(cls, base_model):
        if base_model is None or base_model == "":
            raise ValueError("set base_model: a save_pretrained folder, a hub id, a .gguf "
                             f"file, smollm2-135m-instruct, or {EMBEDDED!r} (e.g. --set "
                             "base_model=/models/llama)")
        return base_model

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if len(self.target) != 1:
            raise ValueError(f"target must name exactly one task, got {sorted(self.target)}")
        if len(self.skills) < 2:
            raise ValueError(f"skills must name at least two tasks, got {sorted(self.skills)}")
        both = set(self.skills) & set(self.target)
        if both:
            raise ValueError(f"task {sorted(both)[0]!r} is both a skill and the target")
        if self.target[self.target_name].scorer.kind == "loss":
            raise ValueError(f"target {self.target_name!r} is scored by its loss: the search "
                             "needs a score to maximise (number, program, exact_match)")
        if self.objective.task not in self.target:
            raise ValueError(f"objective.task {self.objective.task!r} is not the target task "
                             f"{sorted(self.target)[0]!r}")
        return self

    @property
    def target_name(self) -> str:
        return next(iter(self.target))

    @property
    def stage1_seeds(self) -> list[int]:
        """The seeds stage 1 fine-tunes every adapter with: `search.seeds`, else
        `finetune.seed`."""
        return list(self.search.seeds) if self.search.seeds is not None else [self.finetune.seed]

    def tasks(self) -> dict[str, TaskSpec]:
        return {**self.skills, **self.target}


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where `loc`'s last part stands (the fields of the model that holds
    it; through mappings of models such as `skills`), or [] where that cannot be told."""
    current, parts = model, list(loc[:-1])
    while parts:
        field = current.model_fields.get(parts.pop(0)) if isinstance(current, type) else None
        if field is None:
            return []
        annotation, current = field.annotation, None
        for candidate in (annotation, *typing.get_args(annotation)):
            args = typing.get_args(candidate)
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
            elif typing.get_origin(candidate) is dict and args and isinstance(args[-1], type) \
                    and issubclass(args[-1], BaseModel) and parts:
                parts.pop(0)  # the mapping's key (a task name)
                current = args[-1]
            if current is not None:
                break
        if current is None:
            return []
    return list(current.model_fields)


def _describe(error: dict, model: type[BaseModel] | None = None) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(error["loc"])) if model is not None else []
        return f"unknown key {path!r}" + did_you_mean(error["loc"][-1], known)
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{path}: {error['msg']}{shown}"


def parse_model(model: type[BaseModel], data, source: str):
    """Validate `data` into `model`, turning pydantic errors into one SpecError that names
    the source file, each bad key and its value."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e, model) for e in err.errors()]
        raise SpecError(f"{source}: " + "; ".join(lines)) from None


def load_yaml(path: str | Path):
    return read_yaml(path, SpecError) or {}


def overlay(base: dict, extra: dict, defaults: dict | None = None) -> dict:
    """`base` with `extra` put over it, mapping by mapping (`{"cat": {"max_steps": 20}}`
    changes one key of the `cat` section). Where `base` lacks a mapping that `extra` changes
    a key of, it is taken from `defaults` first (the study as parsed): `--set
    target.math_code.chat_template=tokenizer` changes that one key of the default target,
    not a new target entry holding that key alone."""
    out = dict(base)
    for key, value in extra.items():
        if not isinstance(value, dict):
            out[key] = value
            continue
        default = (defaults or {}).get(key)
        default = default if isinstance(default, dict) else None
        below = out.get(key)
        out[key] = overlay(below if isinstance(below, dict) else default or {}, value, default)
    return out


def assignments(items: list[str] | None) -> dict:
    """`--set` options (`finetune.learning_rate=3e-4`, `skills.math.source=/data/m.jsonl`)
    as a nested mapping to `overlay`; each value is read as YAML (numbers, lists, null)."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item!r}: the value is not YAML: {yaml_problem(err)}"
                            ) from None
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {part!r} is already set to a value")
        node[last] = parsed
    return out


def study_data(path: str | Path | None) -> dict:
    """The mapping in a study file (None: the embedded default, `{}`), not yet validated;
    `study_path` first turns a shipped study's bare name into its file."""
    data = load_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a study is a mapping of keys, got {type(data).__name__}")
    return data


def study_path(given: str | Path) -> Path:
    """`study.shipped.study_file`, with the shipped names suggested for a file not found."""
    path = study_file(given)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        names = sorted(shipped_studies())
        raise SpecError(f"{given}: no such file, nor a shipped study (soups studies: "
                        f"{', '.join(names) or 'none'})" + did_you_mean(given, names))
    return path


def load_spec(path: str | Path | None = None, overrides: dict | None = None) -> StudySpec:
    """The study in `path` (None: the embedded default; a shipped study's name: its file),
    with `overrides` put over it."""
    if path is not None:
        path = study_path(path)
    label = str(path or "default study")
    return parse_model(StudySpec, with_overrides(study_data(path), overrides, label), label)


def with_overrides(data: dict, overrides: dict | None, label: str) -> dict:
    """A study's mapping with `--set` overrides put over it. What the file leaves to
    defaults is filled in first where an override reaches into it, so that one key changes
    and the rest keeps its default (a file that does not parse alone: overrides as given)."""
    if not overrides:
        return data
    try:
        defaults = parse_model(StudySpec, data, label).model_dump(mode="json")
    except SpecError:
        defaults = None
    return overlay(data, overrides, defaults)
