"""Search spaces as data: YAML files mapping each method to its parameters' domains.

    methods:
      ties: {density: {uniform: [0.3, 0.9]}, majority_sign_method: total}
      skill: {skill: {grid: [math, code]}}
    rank: {grid: [8, 16]}        # skill LoRA rank (optional; default: the study's ranks)

A parameter value is a constant or a one-key mapping naming a domain: `choice`, `grid`
(lists), `uniform`, `loguniform` ([low, high]), `randint` ([low, high), integers). Each
method may only name parameters its function declares (checked against the method's
signature, `method_parameters`), so a typo is an error, never a silent default. Where the
method also says what each parameter accepts (a `Check` per name), every constant, every
choice and grid value and the ends of every range are checked too, so `density: 3` is refused
here rather than in a trial after stage 1 has trained.

This module is pure: it parses and checks. `trainables/search.py` turns the result into
Ray Tune objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from soups.errors import SoupsError, did_you_mean
from soups.yaml_file import read_yaml

HERE = Path(__file__).parent
DOMAINS = {"choice": "list", "grid": "list", "uniform": "range", "loguniform": "range",
           "randint": "range"}
TOP_LEVEL = {"methods", "rank"}

# What is wrong with one value of a parameter (`is outside (0, 1]`), or None when it fits.
Check = Callable[[object], str | None]


@dataclass(frozen=True)
class MethodParameters:
    """A method's parameters with their checks (None: the name alone is checked) and those
    an entry must give (the `skill` of a `skill` entry)."""

    checks: Mapping[str, Check | None]
    required: frozenset[str] = frozenset()


# A method's declared parameters: their names, each name with its check, or MethodParameters;
# None: no such method.
Declared = MethodParameters | Mapping[str, Check | None] | set[str] | frozenset[str] | None


class SearchSpaceError(SoupsError):
    """A search space that cannot be used; the message names file, method, key and value."""


@dataclass(frozen=True)
class Domain:
    kind: str  # one of DOMAINS
    values: tuple

    def grid_values(self) -> tuple | None:
        return self.values if self.kind == "grid" else None


@dataclass(frozen=True)
class SearchSpace:
    source: str
    methods: dict[str, dict[str, object]]  # method -> parameter -> constant or Domain
    rank: object | None  # constant, Domain or None (use the study's ranks)

    def ranks(self, default: list[int]) -> list[int]:
        """The skill-LoRA ranks the space searches (`default`, the study's, when it names
        none): stage 1 trains each of them before the search, so a sampled rank is refused."""
        if self.rank is None:
            return list(default)
        if isinstance(self.rank, Domain):
            if self.rank.kind not in ("grid", "choice"):
                raise SearchSpaceError(f"{self.source}: rank must be a constant, grid or choice "
                                       "(stage 1 trains every rank before the search)")
            return [int(r) for r in self.rank.values]
        return [int(self.rank)]


def space_path(name_or_path: str | Path) -> Path:
    """A shipped space by name (`paper`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    shipped = HERE / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in HERE.glob("*.yaml"))
        raise SearchSpaceError(f"no search space {str(name_or_path)!r}; shipped: {names}"
                               + did_you_mean(name_or_path, names))
    return shipped


def _domain(value, where: str):
    if not isinstance(value, Mapping):
        return value
    if len(value) != 1 or next(iter(value)) not in DOMAINS:
        raise SearchSpaceError(f"{where}: a domain is one key among {sorted(DOMAINS)}, "
                               f"got {dict(value)!r}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise SearchSpaceError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if DOMAINS[kind] == "range":
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args) \
                or not args[0] < args[1]:
            raise SearchSpaceError(f"{where}: {kind} takes [low, high] with low < high, "
                                   f"got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise SearchSpaceError(f"{where}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(_is_int(a) for a in args):
            raise SearchSpaceError(f"{where}: randint takes integers [low, high), got {args!r}")
    return Domain(kind, tuple(args))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sampled_values(value) -> tuple:
    """The values a constant or domain can give a trial that stand for all of them: every
    choice or grid value, the ends of a range (as floats for `uniform` and `loguniform`,
    which Tune samples as floats; `randint` never gives its high end)."""
    if not isinstance(value, Domain):
        return (value,)
    if value.kind in ("uniform", "loguniform"):
        return tuple(float(v) for v in value.values)
    if value.kind == "randint":
        return (value.values[0], value.values[1] - 1)
    return value.values


def _check_values(value, check: Check, where: str) -> None:
    shown = "" if not isinstance(value, Domain) else f"{value.kind} value "
    for one in sampled_values(value):
        problem = check(one)
        if problem:
            raise SearchSpaceError(f"{where}: {shown}{one!r} {problem}")


def _rank_problem(rank) -> str | None:
    return None if _is_int(rank) and rank >= 1 else "is not a LoRA rank (a positive integer)"


def _checks(declared: Declared) -> Mapping[str, Check | None]:
    """Names without checks (a plain set) check the names alone."""
    if isinstance(declared, MethodParameters):
        return declared.checks
    return declared if isinstance(declared, Mapping) else dict.fromkeys(declared)


def parse_space(data, source: str, method_parameters: Callable[[str], Declared],
                known_methods: Iterable[str] = ()) -> SearchSpace:
    """Check a loaded YAML mapping; `method_parameters(name)` gives the parameters a method
    declares (names, or names with their checks), or None for an unknown method;
    `known_methods`, the names an unknown one is matched against ("did you mean")."""
    if not isinstance(data, Mapping):
        raise SearchSpaceError(f"{source}: a search space is a mapping, got {data!r}")
    unknown = set(data) - TOP_LEVEL
    if unknown:
        word = sorted(unknown)[0]
        raise SearchSpaceError(f"{source}: unknown key {word!r}; allowed: {sorted(TOP_LEVEL)}"
                               + did_you_mean(word, TOP_LEVEL))
    methods = data.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise SearchSpaceError(f"{source}: 'methods' must map at least one method to its "
                               "parameters")
    parsed = {method: _parse_method(method, params, source, method_parameters(method),
                                    known_methods)
              for method, params in methods.items()}
    rank = _domain(data["rank"], f"{source}: rank") if "rank" in data else None
    if rank is not None:
        _check_values(rank, _rank_problem, f"{source}: rank")
    return SearchSpace(source=source, methods=parsed, rank=rank)


def _parse_method(method: str, params, source: str, declared: Declared,
                  known_methods: Iterable[str] = ()) -> dict[str, object]:
    """One method's parameters: declared names, well-formed domains, values its checks take."""
    if declared is None:
        raise SearchSpaceError(f"{source}: unknown method {method!r}"
                               + did_you_mean(method, known_methods)
                               + " (`soups methods` lists them)")
    params = params or {}
    if not isinstance(params, Mapping):
        raise SearchSpaceError(f"{source}: methods.{method} must map parameters to "
                               f"values, got {params!r}")
    checks = _checks(declared)
    for name in params:
        if name not in checks:
            raise SearchSpaceError(
                f"{source}: method {method!r} takes no parameter {name!r}; "
                f"it takes {sorted(checks) or 'none'}" + did_you_mean(name, checks))
    missing = sorted(getattr(declared, "required", frozenset()) - set(params))
    if missing:
        raise SearchSpaceError(f"{source}: method {method!r} needs parameter {missing[0]!r}")
    parsed = {}
    for name, value in params.items():
        where = f"{source}: methods.{method}.{name}"
        parsed[name] = _domain(value, where)
        if checks[name] is not None:
            _check_values(parsed[name], checks[name], where)
    return parsed


def load_space(name_or_path: str | Path, method_parameters: Callable[[str], Declared],
               known_methods: Iterable[str] = ()) -> SearchSpace:
    path = space_path(name_or_path)
    return parse_space(read_yaml(path, SearchSpaceError), str(path), method_parameters,
                       known_methods)
