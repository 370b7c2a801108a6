"""The merge-method registry: one method = one small pure function over tensors, registered
by name with the space it works in; its signature is its parameter schema.

Style after mergekit (https://github.com/arcee-ai/mergekit, `merge_methods/`): methods are
registered with a decorator and carry their paper's URL. Unlike mergekit, a duplicate name
raises, and an unknown or misspelt parameter is an error naming it (never a silent default).

A method's parameters are the keyword parameters of its function after the tensor inputs,
plus what its space adds: every method takes `weights` (one per adapter); delta-space methods
take `rank` (the space factorises their dense result back to LoRA); a function that asks for
`generator` (random methods, DARE) takes `seed`. Values are validated with the annotations.
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from soups.errors import SoupsError, did_you_mean

# Parameter types: the annotation is the check, the description is the --list help.
Weights = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False)]] | None,
    Field(description="one finite weight per adapter"),
]
Density = Annotated[float, Field(gt=0, le=1, description="fraction of entries kept, in (0, 1]")]
MajoritySign = Annotated[Literal["total", "frequency"], Field(
    description="sign election: sign of the summed values (total) or of the count of signs "
                "(frequency)")]
Rank = Annotated[Annotated[int, Field(ge=1)] | None, Field(
    description="output rank per module (default: the largest rank among the adapters)")]
Seed = Annotated[int, Field(ge=0, description="seed of the random draws: DARE masks, k-means "
                                             "seeds (reproducible merges)")]
# Where only some configurations of a method sparsify, density is optional; the method
# refuses a configuration that needs it and lacks it.
OptionalDensity = Annotated[Density | None, Field(
    description="fraction of entries kept, in (0, 1], where the configuration sparsifies")]
ExactRank = Annotated[Annotated[int, Field(ge=1)] | None, Field(
    description="output rank per module (default: exact, every nonzero singular value)")]

RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def value_problem(annotation: Any, value: Any) -> str | None:
    """Why `value`, as a YAML file gives it, does not fit `annotation` (None when it does),
    e.g. `is outside (0, 1]`. Checked strictly with JSON's types, which are YAML's: a string
    is no number and a float no integer (lax mode would take "0.5" and 2.0), while a list
    still fills a tuple."""
    try:
        TypeAdapter(annotation).validate_json(json.dumps(value), strict=True)
    except (ValidationError, TypeError, ValueError) as err:
        errors = err.errors() if isinstance(err, ValidationError) else []
        if errors and errors[0]["type"] in RANGE_ERRORS:
            return f"is outside {interval(annotation)}"
        reason = "; ".join(e["msg"] for e in errors) or str(err)
        return f"is not valid: {reason}"
    return None


def interval(annotation: Any) -> str:
    """The range the gt/ge/lt/le constraints in `annotation` allow, as `(0, 1]` or
    `[1, inf)`: found in its `Annotated` metadata and pydantic `Field`s, through unions."""
    bounds: dict[str, Any] = {}
    _collect_bounds(annotation, bounds)
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds.get('ge', '-inf')}"
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds.get('le', 'inf')}]"
    return f"{low}, {high}".replace("[-inf", "(-inf").replace("inf]", "inf)")


def _collect_bounds(annotation: Any, bounds: dict[str, Any]) -> None:
    for meta in getattr(annotation, "__metadata__", ()):
        for item in getattr(meta, "metadata", [meta]):  # a pydantic Field holds its bounds
            bounds.update({key: getattr(item, key) for key in ("gt", "ge", "lt", "le")
                           if getattr(item, key, None) is not None})
    if typing.get_origin(annotation) is Annotated:
        _collect_bounds(annotation.__origin__, bounds)
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            _collect_bounds(member, bounds)


# Function parameters the space supplies (not user parameters): tensor inputs and the generator.
INPUTS = ("tensors", "modules", "weights", "generator")
REQUIRED = inspect.Parameter.empty


class MergeError(SoupsError):
    """A merge that cannot run as asked; the message names the method, parameter, adapter
    or module at fault."""


class Space(str, enum.Enum):
    """Where a method works; the space decides what the function receives and returns."""

    # f(tensors (k, *shape), weights (k,)) -> (*shape), applied to the stacked A (k, r, in)
    # and the stacked B (k, out, r) separately with weights +-sqrt(|w_i s_i|), as PEFT does.
    FACTOR = "factor"
    # f(tensors (k, out, in) = dW_i = s_i B_i A_i, weights (k,)) -> dW (out, in); the space
    # factorises dW back to `rank` by truncated SVD. One module is dense at a time.
    DELTA = "delta"
    # f(modules: k LoraModules, weights (k,)) -> LoraModule: delta space kept low-rank, the
    # weighted sum of dW_i is itself a LoRA (concatenation); never builds a dense matrix.
    LORA = "lora"


@dataclass(frozen=True)
class Parameter:
    name: str
    annotation: Any
    default: Any  # REQUIRED when the caller must give it

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def description(self) -> str:
        for meta in getattr(self.annotation, "__metadata__", ()):
            if getattr(meta, "description", None):
                return meta.description
        return ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this parameter (None: nothing)."""
        return value_problem(self.annotation, value)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, space, reference and declared parameters."""

    name: str
    space: Space
    fn: Callable
    reference: str
    default_weights: Literal["mean", "ones"]  # 1/k each, or 1 each, when weights are not given
    parameters: dict[str, Parameter]

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    @property
    def random(self) -> bool:
        return "seed" in self.parameters

    @property
    def mixes_factors(self) -> bool:
        """Factor space mixes A and B entry by entry: it needs equal ranks and the same
        modules in every adapter (as PEFT's linear family does)."""
        return self.space is Space.FACTOR

    def bind(self, params: dict[str, Any], n_adapters: int) -> dict[str, Any]:
        """Check `params` against the declared parameters and fill defaults.

        Returns every declared parameter's value, `weights` resolved to k floats."""
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise MergeError(f"method {self.name!r} takes no parameter {unknown[0]!r}; it takes "
                             f"{sorted(self.parameters)}"
                             + did_you_mean(unknown[0], self.parameters))
        bound = {}
        for name, parameter in self.parameters.items():
            if params.get(name) is None:
                if parameter.required:
                    raise MergeError(f"method {self.name!r} needs parameter {name!r} "
                                     f"({parameter.description})")
                bound[name] = parameter.default
                continue
            try:
                bound[name] = TypeAdapter(parameter.annotation).validate_python(params[name])
            except ValidationError as err:
                reason = "; ".join(e["msg"] for e in err.errors())
                raise MergeError(f"method {self.name!r}: parameter {name}={params[name]!r}: "
                                 f"{reason}") from None
        weights = bound["weights"]
        if weights is None:
            weights = [1.0 / n_adapters if self.default_weights == "mean" else 1.0] * n_adapters
        if len(weights) != n_adapters:
            raise MergeError(f"method {self.name!r}: {len(weights)} weights for {n_adapters} "
                             "adapters; give one weight per adapter")
        bound["weights"] = [float(w) for w in weights]
        return bound


class MethodRegistry:
    """Methods by name. `register` is a decorator; it returns the function unchanged, so one
    function can be registered under several names and spaces (TIES as `ties` and `ties_svd`)."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def register(self, name: str, space: Space, reference: str,
                 default_weights: Literal["mean", "ones"] = "mean") -> Callable:
        def decorate(fn: Callable) -> Callable:
            if name in self._methods:
                raise MergeError(f"merge method {name!r} is already registered "
                                 f"({self._methods[name].fn.__qualname__})")
            self._methods[name] = MergeMethod(name, space, fn, reference, default_weights,
                                              _declared_parameters(fn, space))
            return fn
        return decorate

    def get(self, name: str) -> MergeMethod:
        if name not in self._methods:
            raise MergeError(f"unknown merge method {name!r}; known: {self.names()}"
                             + did_you_mean(name, self.names()))
        return self._methods[name]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods


def _declared_parameters(fn: Callable, space: Space) -> dict[str, Parameter]:
    """The method's parameters from its signature. Only their annotations are evaluated,
    not the tensor inputs' (so registering needs no torch: `soups merge --list` is fast)."""
    signature = inspect.signature(fn)
    params = {"weights": Parameter("weights", Weights, None)}
    for name, p in signature.parameters.items():
        if name in INPUTS:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise MergeError(f"merge method {fn.__qualname__}: parameter {name!r} needs a type "
                             "annotation (it is the parameter's check)")
        annotation = p.annotation
        if isinstance(annotation, str):  # postponed (from __future__ import annotations)
            annotation = eval(annotation, fn.__globals__)  # noqa: S307 (our own source)
        params[name] = Parameter(name, annotation, p.default)
    if space is Space.DELTA:
        params["rank"] = Parameter("rank", Rank, None)
    if "generator" in signature.parameters:
        params["seed"] = Parameter("seed", Seed, 0)
    return params
