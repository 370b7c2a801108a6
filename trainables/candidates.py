"""The registry of candidate kinds: everything a study can put on its leaderboard, each kind
registered once with what the rest of the program needs to know about it.

A kind is a name (the `method` of a search-space entry and of a trial's variant), its
parameters (names, types and ranges: the search space is checked against them when it is
loaded, before stage 1 trains anything), whether it is built from stage-1 adapters (then its
variants carry a LoRA rank) and which ones besides the skill LoRAs (`data_mix`), whether it
trains on the skill mix, its builder and the artifacts it leaves for MLflow. Every merge
method of `soups.compose.merge` is a kind of its own, read from the merge-method registry.

The search space (`study.resolve`), the Tune search (`trainables.search`), the study runner
(stage 1), both trial drivers (`trainables.trial_run`), `soups methods`, `soups merge
--list` and the report read this one table; a name registered twice raises. Adding a kind
touches this file only (docs/extending.md).

A builder is `build(context, variant, out_dir, report) -> folder or None`: the candidate's
adapter folder (None: the base model alone), `report(metrics)` sending intermediate results
to MLflow and Tune (CAT's held-out loss at a step, for ASHA; LoraHub's objective at each
evaluation).
"""

from __future__ import annotations

import tempfile
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from search_spaces import MethodParameters
from soups.compose.cat.mix import skill_mix
from soups.compose.cat.plot import plot_cat_weights
from soups.compose.cat.settings import PAPER_CAT_TRAIN, CatSettings
from soups.compose.lorahub import settings as lorahub_settings
from soups.compose.lorahub.settings import LorahubSettings
from soups.compose.merge import merge_adapters
from soups.compose.merge.methods import REGISTRY as MERGES
from soups.compose.merge.registry import REQUIRED, Parameter, interval
from soups.compose.moe.settings import PAPER_MOE_TRAIN, MoeSettings, RouterInit
from soups.errors import SoupsError, did_you_mean
from soups.names import (
    CAT_BEST_EVAL_LOSS,
    CAT_BEST_STEP,
    CAT_EVAL_LOSS,
    CAT_STEP,
    CAT_TRAIN_LOSS,
    CAT_TRAINABLE_PARAMETERS,
    SEARCH_BEST_OBJECTIVE,
    SEARCH_LOSS,
    SEARCH_OBJECTIVE,
    SEARCH_STEP,
)
from trainables.learned_settings import CatTraining
from trainables.trial_context import (
    TrialContext,
    finetune_settings,
    load_rows,
    stage1_adapter,
    trial_seed,
)

DATA_MIX = "data_mix"
# What a kind is, for `soups methods` and the report: the model alone, one stage-1 adapter,
# a data-free merge of the skill LoRAs, a composition learned on the skill mix, or a control
# of a merging claim (soups.compose.controls).
Family = Literal["reference", "stage-1", "merge", "learned", "control"]
Builder = Callable[[TrialContext, dict, Path, Callable[[dict], None]], "str | None"]
# (adapter folder, the trial's work folder, the study's skills) -> {artifact name: path}
Artifacts = Callable[[Path, Path, tuple[str, ...]], dict[str, Path]]


class CandidateError(SoupsError):
    """An unknown or doubly registered kind; the message names it and the known ones."""


def _no_artifacts(out_dir: Path, work_dir: Path, skills: tuple[str, ...]) -> dict[str, Path]:
    return {}


@dataclass(frozen=True)
class CandidateKind:
    name: str
    family: Family
    summary: str
    build: Builder
    parameters: dict[str, Parameter] = field(default_factory=dict)
    stage1: bool = True  # built from stage-1 adapters: its variants carry a rank
    needs: tuple[str, ...] = ()  # stage-1 adapters besides the skill LoRAs
    trains: bool = False  # trains on the skill mix (the skills' train splits)
    artifacts: Artifacts = _no_artifacts
    reference: str = ""
    defaults: Mapping[str, str] = field(default_factory=dict)  # shown instead of the value
    # Extra checks that need the study (the `skill` kind's value must be one of its skills).
    study_checks: Mapping[str, Callable[[Any, Collection[str] | None], str | None]] = \
        field(default_factory=dict)

    def checks(self, skills: Collection[str] | None = None) -> dict[str, Callable]:
        """Each parameter's check for the search space: its type and range, then what the
        study adds. `skills`: the study's skills (None: any name)."""
        def check(parameter: Parameter, value) -> str | None:
            extra = self.study_checks.get(parameter.name)
            return (extra(value, skills) if extra else None) or parameter.problem(value)
        return {name: partial(check, p) for name, p in self.parameters.items()}

    @property
    def required(self) -> frozenset[str]:
        return frozenset(n for n, p in self.parameters.items() if p.required)


class CandidateRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, CandidateKind] = {}

    def register(self, kind: CandidateKind) -> CandidateKind:
        if kind.name in self._kinds:
            raise CandidateError(f"candidate kind {kind.name!r} is already registered "
                                 f"({self._kinds[kind.name].family})")
        self._kinds[kind.name] = kind
        return kind

    def get(self, name: str) -> CandidateKind:
        if name not in self._kinds:
            raise CandidateError(f"unknown method {name!r}; known: {self.names()}"
                                 + did_you_mean(name, self.names()))
        return self._kinds[name]

    def names(self) -> list[str]:
        return list(self._kinds)

    def kinds(self) -> list[CandidateKind]:
        return list(self._kinds.values())

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


# --- the model alone and the stage-1 adapters ------------------------------------------------

def _base(ctx, variant, out_dir, report) -> None:
    return None


def _skill(ctx, variant, out_dir, report) -> str:
    skill = variant["params"]["skill"]
    if skill not in ctx.skills:
        raise ValueError(f"skill {skill!r} is not a skill of this study: {list(ctx.skills)}")
    return stage1_adapter(ctx, variant, skill)


def _skill_problem(skill, skills: Collection[str] | None) -> str | None:
    if not isinstance(skill, str):
        return "is not a skill name"
    if skills is not None and skill not in skills:
        return f"is not a skill of the study; its skills: {sorted(skills)}"
    return None


def _data_mix(ctx, variant, out_dir, report) -> str:
    return stage1_adapter(ctx, variant, DATA_MIX)


# --- merges of the skill LoRAs ---------------------------------------------------------------

def _merge_method(ctx, variant, out_dir, report) -> str:
    adapters = [stage1_adapter(ctx, variant, s) for s in ctx.skills]
    params = dict(variant["params"])
    if "seed" in variant and MERGES.get(variant["method"]).random:
        params.setdefault("seed", variant["seed"])  # each seed its own masks
    merge_adapters(adapters, variant["method"], out_dir, **params)
    return str(out_dir)


# --- learned on the skill mix ----------------------------------------------------------------

def _training_parameters() -> dict[str, Parameter]:
    """The `cat` section's fields (their defaults the study's): learned kinds take them all."""
    return {name: Parameter(name, f.rebuild_annotation(), f.default)
            for name, f in CatTraining.model_fields.items()}


def _skill_mix_split(ctx: TrialContext, variant: dict) -> tuple[dict, dict]:
    """The trial's training settings (`cat` section, then the variant's parameters) split
    into those of the kind's own dataclass (the rest) and the skill mix's size."""
    params = {**ctx.cat, **variant["params"]}
    mix = {"fraction": params.pop("fraction"), "count": params.pop("count"),
           "held_out": params.pop("held_out")}
    if mix["count"]:
        mix["fraction"] = None
    return params, mix


def _train_progress(report) -> Callable[[dict], None]:
    """Held-out evaluations of a training run, as Tune results ASHA can rank."""
    def on_step(record: dict) -> None:
        if "eval_loss" in record:
            report({CAT_STEP: record["step"], CAT_EVAL_LOSS: record["eval_loss"],
                    CAT_TRAIN_LOSS: record["train_loss"]})
    return on_step


def _cat_parameters() -> dict[str, Parameter]:
    """The shape of the weights (`CatSettings` types; the seed is the trial's) and the
    training settings."""
    hints = typing.get_type_hints(CatSettings)
    defaults = CatSettings()
    shape = {n: Parameter(n, t, getattr(defaults, n)) for n, t in hints.items() if n != "seed"}
    return {**shape, **_training_parameters()}


def _cat_learned(ctx, variant, out_dir, report) -> str:
    """The paper's CAT recipe (`PAPER_CAT_TRAIN`) with the study's `cat` section and the
    trial's parameters over it."""
    from soups.compose.cat import learn_cat  # lazy: torch

    params, mix = _skill_mix_split(ctx, variant)
    shape = {f.name: params.pop(f.name) for f in fields(CatSettings) if f.name in params}
    seed = trial_seed(ctx, variant)
    train = replace(PAPER_CAT_TRAIN, seed=seed, **params)
    skills = [load_rows(ctx, s, "train") for s in ctx.skills]
    adapters = [stage1_adapter(ctx, variant, s) for s in ctx.skills]
    result = learn_cat(adapters, ctx.model_dir, skills, out_dir,
                       CatSettings(seed=seed, **shape), train, on_step=_train_progress(report),
                       log=None, **mix)
    report({CAT_TRAINABLE_PARAMETERS: result.trainable_parameters,
            CAT_BEST_EVAL_LOSS: result.best_eval_loss, CAT_BEST_STEP: result.best_step})
    return str(out_dir)


def _cat_artifacts(out_dir: Path, work_dir: Path, skills: tuple[str, ...]) -> dict[str, Path]:
    """A learned CAT's weights file and its heat map."""
    from soups.compose.cat.export import WEIGHTS_JSON  # lazy: torch

    weights = out_dir / WEIGHTS_JSON
    if not weights.is_file():
        return {}
    plot = plot_cat_weights(weights, work_dir / "cat_weights.png", names=list(skills))
    return {WEIGHTS_JSON: weights, Path(plot).name: Path(plot)}


def _lorahub_parameters() -> dict[str, Parameter]:
    """LoraHub's search settings (`soups.compose.lorahub.LorahubSettings`, its defaults); its seed
    is the trial's, its starting weights LoraHub's zeros."""
    positive = Annotated[int, Field(ge=1)]
    return {
        "budget": Parameter("budget", Annotated[positive, Field(
            description="objective evaluations of the search")], lorahub_settings.BUDGET),
        "examples": Parameter("examples", Annotated[positive, Field(
            description="skill-mix rows the objective scores")], lorahub_settings.EXAMPLES),
        "bounds": Parameter("bounds", Annotated[tuple[float, float], Field(
            description="(low, high) of every weight")], lorahub_settings.BOUNDS),
        "composition": Parameter("composition", Annotated[lorahub_settings.Composition, Field(
            description="lorahub: summed A and B (LoraHub's); exact: sum w_i B_i A_i")],
            "lorahub"),
        "l1": Parameter("l1", Annotated[float, Field(ge=0, description="weight of the mean "
                                                     "|w| regulariser")], lorahub_settings.L1),
    }


def _bounds_problem(bounds, skills) -> str | None:
    if isinstance(bounds, list | tuple) and len(bounds) == 2 and all(
            isinstance(b, int | float) for b in bounds) and not bounds[0] < bounds[1]:
        return "is not (low, high) with low < high"
    return None


def _lorahub(ctx, variant, out_dir, report) -> str:
    """LoraHub's gradient-free weight search on the skill mix (never the target's rows);
    each evaluation is a step of the trial's MLflow run."""
    from soups.compose.lorahub import lorahub_merge  # lazy: torch

    params = dict(variant["params"])
    if "bounds" in params:
        params["bounds"] = tuple(params["bounds"])
    settings = LorahubSettings(seed=trial_seed(ctx, variant), **params)

    def on_evaluation(record: dict) -> None:
        report({SEARCH_STEP: record["step"], SEARCH_LOSS: record["loss"],
                SEARCH_OBJECTIVE: record["regularised_loss"]})

    result = lorahub_merge([stage1_adapter(ctx, variant, s) for s in ctx.skills],
                           ctx.model_dir, [load_rows(ctx, s, "train") for s in ctx.skills],
                           out_dir, settings, on_evaluation, device=ctx.evaluation["device"],
                           dtype=ctx.evaluation["dtype"], log=None)
    report({SEARCH_BEST_OBJECTIVE: result.objective})
    return str(out_dir)


def _lorahub_artifacts(out_dir: Path, work_dir: Path, skills: tuple[str, ...]
                       ) -> dict[str, Path]:
    """The search's weights, objective and history (`lorahub.json`)."""
    from soups.compose.lorahub.run import SUMMARY_JSON  # lazy: torch

    summary = out_dir / SUMMARY_JSON
    return {SUMMARY_JSON: summary} if summary.is_file() else {}


def _moe_parameters() -> dict[str, Parameter]:
    """The mixture's shape (`soups.compose.moe.MoeSettings`, its defaults; the seed is the trial's)
    and the training settings of its routers."""
    shape = MoeSettings()
    return {
        "top_k": Parameter("top_k", Annotated[int, Field(ge=2, description=(
            "experts mixed per token (>= 2: a softmax over one logit is 1, no gradient)"))],
            shape.top_k),
        "router_init": Parameter("router_init", Annotated[RouterInit, Field(
            description="normal: N(0, init_std^2) (mergoo); zeros: a uniform gate")],
            shape.router_init),
        "init_std": Parameter("init_std", Annotated[float, Field(
            gt=0, description="std of a normal router init")], shape.init_std),
        **_training_parameters(),
    }


def _top_k_problem(top_k, skills) -> str | None:
    if skills is not None and isinstance(top_k, int) and top_k > len(skills):
        return f"is more experts than the study has skills ({len(skills)})"
    return None


def _lora_moe(ctx, variant, out_dir, report) -> str:
    """A router per module over the frozen skill LoRAs, trained alone on the skill mix with
    CAT's recipe and the study's `cat` section; exported as a mixture folder (not one LoRA:
    the evaluators and `soups evaluate` load it, `soups.compose.moe.load_moe`)."""
    from soups.compose.moe import learn_moe  # lazy: torch

    params, mix = _skill_mix_split(ctx, variant)
    shape = {n: params.pop(n) for n in ("top_k", "router_init", "init_std") if n in params}
    seed = trial_seed(ctx, variant)
    result = learn_moe([stage1_adapter(ctx, variant, s) for s in ctx.skills], ctx.model_dir,
                       [load_rows(ctx, s, "train") for s in ctx.skills], out_dir,
                       MoeSettings(seed=seed, **shape), replace(PAPER_MOE_TRAIN, seed=seed,
                                                                **params),
                       on_step=_train_progress(report), log=None, **mix)
    report({CAT_TRAINABLE_PARAMETERS: result.trainable_parameters,
            CAT_BEST_EVAL_LOSS: result.best_eval_loss, CAT_BEST_STEP: result.best_step})
    return str(out_dir)


# --- controls of a merging claim (soups.compose.controls)
# --------------------------------------------

ALL_SKILLS = "all"


def _random_lora(ctx, variant, out_dir, report) -> str:
    """A random stand-in of one skill LoRA (same modules, ranks, scalings, update norms),
    or with `all` the exact concatenation of a stand-in of each (an equal-weight cat)."""
    from soups.compose.controls import random_stand_in  # lazy: torch

    skill, seed = variant["params"]["skill"], trial_seed(ctx, variant)
    if skill != ALL_SKILLS and skill not in ctx.skills:
        raise ValueError(f"skill {skill!r} is neither {ALL_SKILLS!r} nor a skill of this "
                         f"study: {list(ctx.skills)}")
    if skill != ALL_SKILLS:
        return str(random_stand_in(stage1_adapter(ctx, variant, skill), out_dir, seed))
    with tempfile.TemporaryDirectory() as folder:
        stand_ins = [random_stand_in(stage1_adapter(ctx, variant, s), Path(folder) / s,
                                     seed + i) for i, s in enumerate(ctx.skills)]
        merge_adapters(stand_ins, "cat", out_dir)
    return str(out_dir)


def _random_skill_problem(skill, skills: Collection[str] | None) -> str | None:
    return None if skill == ALL_SKILLS else _skill_problem(skill, skills)


def _mix_parameters() -> dict[str, Parameter]:
    """The skill mix's size, as for CAT (the `cat` section's defaults)."""
    return {n: p for n, p in _training_parameters().items()
            if n in ("fraction", "count", "held_out")}


def _mix_lora(ctx, variant, out_dir, report) -> str:
    """One LoRA at the trial's rank, trained as stage 1 trains (the study's `finetune`
    recipe) on exactly the rows CAT learns its weights on: the same skill mix, seed and
    held-out rows (`soups.compose.cat.mix.skill_mix`)."""
    from soups.training.lora_training import train_lora  # lazy: torch

    _, mix = _skill_mix_split(ctx, variant)
    seed = trial_seed(ctx, variant)
    rows, held = skill_mix([load_rows(ctx, s, "train") for s in ctx.skills], seed=seed,
                           label="mix_lora", **mix)
    lora, train = finetune_settings(ctx, variant["rank"], seed)
    result = train_lora(ctx.model_dir, rows, out_dir, lora, train, held or None,
                        on_step=_train_progress(report))
    report({CAT_BEST_EVAL_LOSS: result.best_eval_loss or result.eval_loss,
            CAT_BEST_STEP: result.best_step})
    return str(out_dir)


LORA_SOUPS = "https://arxiv.org/abs/2410.13025"
MERGOO = "https://github.com/Leeroo-AI/mergoo"
LORAHUB = "https://arxiv.org/abs/2307.13269"
Skill = Annotated[str, Field(description="one of the study's skills")]


def _registry() -> CandidateRegistry:
    registry = CandidateRegistry()
    registry.register(CandidateKind(
        "base", "reference", "the base model alone, no adapter", _base, stage1=False))
    registry.register(CandidateKind(
        "skill", "stage-1", "one skill's LoRA alone", _skill,
        {"skill": Parameter("skill", Skill, REQUIRED)},
        study_checks={"skill": _skill_problem}))
    registry.register(CandidateKind(
        DATA_MIX, "stage-1", "DATA-MIX: one LoRA fine-tuned on all the skills' data mixed",
        _data_mix, needs=(DATA_MIX,), reference=LORA_SOUPS))
    registry.register(CandidateKind(
        "cat_learned", "learned", "CAT: one weight per LoRA per module learned on the skill "
        "mix, exported as the exact concatenation", _cat_learned, _cat_parameters(),
        trains=True, artifacts=_cat_artifacts, reference=LORA_SOUPS))
    registry.register(CandidateKind(
        "lorahub", "learned", "LoraHub: one weight per LoRA searched without gradients "
        "(Nevergrad NGOpt) on the few-shot loss of the skill mix + l1 * mean |w|, exported "
        "as one LoRA", _lorahub, _lorahub_parameters(), trains=True,
        artifacts=_lorahub_artifacts, reference=LORAHUB,
        study_checks={"bounds": _bounds_problem}))
    registry.register(CandidateKind(
        "lora_moe", "learned", "mixture of LoRA experts: a top-k softmax router per module "
        "over the frozen skill LoRAs, trained alone on the skill mix; a mixture folder, not "
        "one LoRA", _lora_moe, _moe_parameters(), trains=True, reference=MERGOO,
        study_checks={"top_k": _top_k_problem}))
    registry.register(CandidateKind(
        "random_lora", "control", "a random LoRA with a skill LoRA's modules, ranks and "
        "per-module update norms (all: one per skill, concatenated): a merge must beat the "
        "same-sized perturbation", _random_lora,
        {"skill": Parameter("skill", Annotated[str, Field(
            description="one of the study's skills, or all")], REQUIRED)},
        study_checks={"skill": _random_skill_problem}))
    registry.register(CandidateKind(
        "mix_lora", "control", "one LoRA fine-tuned (the study's recipe) on exactly the rows "
        "CAT learns its weights on: a learned composition must beat training on its data",
        _mix_lora, _mix_parameters(), trains=True))
    for method in (MERGES.get(name) for name in MERGES.names()):
        registry.register(CandidateKind(
            method.name, "merge", f"{method.summary} ({method.space.value} space)",
            _merge_method, dict(method.parameters), reference=method.reference,
            defaults={"weights": "default " + ("1 each" if method.default_weights == "ones"
                                               else "1/k each")}))
    return registry


CANDIDATES = _registry()


def candidate_kind(name: str) -> CandidateKind:
    return CANDIDATES.get(name)


def parameter_checks(name: str, skills: Collection[str] | None = None):
    """What a kind takes, for the search-space check (`search_spaces.MethodParameters`), or
    None for a name no kind has."""
    if name not in CANDIDATES:
        return None
    kind = CANDIDATES.get(name)
    return MethodParameters(kind.checks(skills), kind.required)


def describe(kind: CandidateKind, flag: Callable[[str], str] = str) -> list[str]:
    """`soups methods`' lines for one kind: what it is, what it needs, its parameters
    (each shown as `flag(name)`: a command line shows its flags)."""
    needs = ("stage-1 skill LoRAs" + "".join(f" + {n}" for n in kind.needs)
             if kind.stage1 else "no adapters")
    lines = [f"{kind.name}  ({kind.family})  {kind.summary}",
             f"    needs: {needs}" + ("; trains on the skill mix" if kind.trains else "")]
    if kind.reference:
        lines.append(f"    {kind.reference}")
    for name, parameter in kind.parameters.items():
        default = kind.defaults.get(name) or (
            "required" if parameter.required else f"default {parameter.default!r}")
        lines.append(f"    {flag(name)}: {_type_text(parameter)} ({default})"
                     + (f"  {parameter.description}" if parameter.description else ""))
    return lines


def _type_text(parameter: Parameter) -> str:
    """A parameter's type as a reader wants it: `float in (0, 1]`, `one of a, b`."""
    bounds = _bounds_text(parameter.annotation)
    name = _type_name(parameter.annotation)
    return f"{name} in {bounds}" if bounds else name


def _type_name(annotation) -> str:
    """`list of float or none` for `Annotated[list[Annotated[float, ...]] | None, ...]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__} of {_type_name(args[0])}" if args else origin.__name__
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _bounds_text(annotation) -> str | None:
    text = interval(annotation)
    return None if text == "(-inf, inf)" else text


__all__ = ["CANDIDATES", "CandidateError", "CandidateKind", "CandidateRegistry", "DATA_MIX",
           "candidate_kind", "describe", "parameter_checks"]
