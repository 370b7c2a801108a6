"""The import layering of design.md: `soups` (core) imports neither ray nor mlflow;
`ray.train` and `ray.tune` are imported only in `trainables/` (the study driver in `study/`
starts Ray and reads its logs, with ray core only)."""

import ast
import importlib
from pathlib import Path

import import_graph
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit

# Packages and the first-party packages they may import (design.md: study -> trainables -> soups).
ALLOWED_FIRST_PARTY = {
    "soups": {"soups"},
    "trainables": {"soups", "trainables", "search_spaces"},  # search spaces are pure data
    "study": {"soups", "trainables", "study", "search_spaces"},
    "search_spaces": {"soups", "search_spaces"},
    "analysis": {"analysis", "study", "soups"},
}
# The command line is the composition root: it registers the analysis package's report
# command. No other module of `study` may import `analysis`.
ENTRY_POINT_EXTRA = {"study/cli.py": {"analysis"}}
FIRST_PARTY = {"soups", "trainables", "study", "search_spaces", "analysis", "benchmarks"}
RAY_ALLOWED = {"trainables", "study"}
RAY_LIBRARIES = {"ray.train", "ray.tune"}
RAY_LIBRARIES_ALLOWED = {"trainables"}
MLFLOW_ALLOWED = {"study", "analysis", "trainables"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _ray_libraries(path: Path) -> set[str]:
    """Which of ray.train / ray.tune a module imports (`import ray.tune`, `from ray import
    tune`, `from ray.tune.x import y`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {lib for lib in RAY_LIBRARIES for m in modules
                  if m == lib or m.startswith(lib + ".")}
    return found


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED_FIRST_PARTY))
def test_package_respects_layering(package):
    files = _package_files(package)
    assert files, f"package {package} has no modules"
    for path in files:
        imported = _imports(path)
        rel = path.relative_to(ROOT)
        allowed = ALLOWED_FIRST_PARTY[package] | ENTRY_POINT_EXTRA.get(rel.as_posix(), set())
        bad = (imported & FIRST_PARTY) - allowed
        assert not bad, f"{rel} imports {sorted(bad)}, against the layering"
        if package not in RAY_ALLOWED:
            assert "ray" not in imported, f"{rel} imports ray; ray lives in trainables/"
        if package not in RAY_LIBRARIES_ALLOWED:
            libraries = _ray_libraries(path)
            assert not libraries, f"{rel} imports {sorted(libraries)}; only trainables/ may"
        if package not in MLFLOW_ALLOWED:
            assert "mlflow" not in imported, f"{rel} imports mlflow; the core stays pure"


def _in_a_fresh_interpreter(code: str) -> None:
    """Run `code` in a new Python at the repository root (nothing imported before it)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_core_import_does_not_load_ray_or_mlflow():
    _in_a_fresh_interpreter(
        "import sys, pkgutil, importlib, soups\n"
        "for m in pkgutil.walk_packages(soups.__path__, 'soups.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in ('ray', 'mlflow') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom mlflow import log_metric\nfrom trainables import x\n")
    assert {"ray", "mlflow", "trainables"} <= _imports(bad)
    tuned = tmp_path / "tuned.py"
    tuned.write_text("from ray import tune\nimport ray.train.torch\n")
    assert _ray_libraries(tuned) == {"ray.tune", "ray.train"}


def test_cheap_commands_do_not_import_torch():
    """`soups --help` and `soups merge --list` answer without torch's seconds of import."""
    _in_a_fresh_interpreter(
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from study.cli import app\n"
        "listed = CliRunner().invoke(app, ['merge', '--list'])\n"
        "assert listed.exit_code == 0 and 'ties' in listed.output, listed.output\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )


def test_train_settings_do_not_import_torch():
    """The fine-tune settings (study files, cache keys) are read without torch."""
    _in_a_fresh_interpreter(
        "import sys\n"
        "from soups.training.train_settings import PAPER_TARGETS, LoraSettings, TrainSettings\n"
        "assert TrainSettings().total_steps(10) and LoraSettings().target_modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )


# --- the core by stage, no circles, no private names, local imports with a reason ----------

# soups/: each stage imports only the stages below it; `tasks` and `compose` stand side by
# side at the top (a task names evaluation's scorer; composition uses training and
# evaluation), neither imports the other. The foundations at the root import no stage.
STAGES = {"data": 1, "training": 2, "evaluation": 3, "tasks": 4, "compose": 4}
# The core's composition root registers compose's adapter kinds with evaluation.
STAGE_ROOT = "soups"


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else "root"


def _rank(stage: str) -> int:
    return STAGES.get(stage, 0)


def test_each_stage_of_the_core_imports_only_the_stages_below_it():
    bad = []
    for module, targets in import_graph.edges().items():
        if not module.startswith("soups.") or module == STAGE_ROOT:
            continue
        for target in targets:
            if not target.startswith("soups."):
                continue
            mine, theirs = _stage(module), _stage(target)
            if mine != theirs and _rank(theirs) >= _rank(mine):
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not bad, "against the stages (docs/extending.md):\n" + "\n".join(bad)


def test_every_module_of_the_core_lives_in_a_stage_or_is_a_foundation():
    foundations = {m for m in import_graph.modules()
                   if m.startswith("soups.") and _stage(m) == "root"
                   and m.split(".")[1] not in STAGES}
    assert foundations == {"soups.adapters", "soups.errors", "soups.home", "soups.lazy",
                           "soups.names", "soups.yaml_file"}, sorted(foundations)


def test_no_import_circle():
    """From the code's own imports, module level and inside functions alike."""
    assert import_graph.circles() == []


def test_the_circle_finder_finds_a_circle(monkeypatch):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    monkeypatch.setattr(import_graph, "edges", lambda local=True: graph)
    assert import_graph.circles() == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for module, path in import_graph.modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in import_graph.PACKAGES:
                bad += [f"{module}: from {node.module} import {alias.name}"
                        for alias in node.names if alias.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_function_local_imports_keep_a_heavy_library_off_and_say_which():
    """A function imports a module itself only to keep a heavy library (or an optional
    dependency) off its module's import, and says which on the line (`# lazy: torch`)."""
    bad = []
    for module, path in import_graph.modules().items():
        lines = path.read_text().splitlines()
        for imp in import_graph.imports_of(module):
            if not imp.local:
                continue
            kept = import_graph.kept_off(imp)
            where = f"{path.relative_to(ROOT)}:{imp.line}"
            if not kept and not imp.optional:
                bad.append(f"{where}: {imp.target} loads nothing heavy the module lacks: "
                           "import it at the top")
                continue
            said = " ".join(lines[i] for i in (imp.line - 2, imp.line - 1, imp.end_line - 1))
            names = kept or {imp.target.split(".")[0]}
            if not any(f"{tag}:" in said and name in said.split(f"{tag}:", 1)[1]
                       for tag in ("lazy", "optional") for name in names):
                bad.append(f"{where}: no `# lazy: {', '.join(sorted(names))}` reason")
    assert not bad, "\n".join(bad)


def test_heaviness_is_read_through_lazy_exports_and_packages():
    """`from soups.compose.cat import learn_cat` loads torch (its `run` module), while the
    package alone and its settings do not: the checks above see what an import costs."""
    cat = import_graph.lazy_exports("soups.compose.cat")
    assert cat["learn_cat"] == "soups.compose.cat.run"
    assert "torch" in import_graph.heavy_at_import("soups.compose.cat.run")
    assert "torch" not in import_graph.heavy_at_import("soups.compose.cat.settings")
    assert "torch" not in import_graph.heavy_at_import("study.cli")


# trainables/: the candidate registry and the trial context at the bottom of the room; the
# drivers (the local and the cluster trial, their shared life cycle, the Tuner) above them.
TRIAL_DRIVERS = {"trainables.merge_trial", "trainables.cluster_trial", "trainables.trial_run",
                 "trainables.tuner"}


@pytest.mark.parametrize("module", ["trainables.candidates", "trainables.trial_context",
                                    "trainables.evaluator", "trainables.search"])
def test_the_registry_and_context_never_import_a_trial_driver(module):
    graph = import_graph.edges()
    reached, todo = set(), [module]
    while todo:
        current = todo.pop()
        for target in graph.get(current, ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert not reached & TRIAL_DRIVERS, sorted(reached & TRIAL_DRIVERS)


def test_importing_the_core_loads_only_the_standard_library():
    """`import soups` (which registers compose's adapter kinds with evaluation) loads no
    third-party library: the sandbox runs from a bare interpreter (tests/sandbox_attacks.py)."""
    _in_a_fresh_interpreter(
        "import sys\n"
        "before = set(sys.modules)\n"
        "import soups, soups.evaluation.sandbox.seccomp\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "assert new <= set(sys.stdlib_module_names) | {'soups'}, sorted(new)\n"
    )


def test_the_mixture_of_experts_is_an_adapter_kind_registered_at_the_root():
    from soups.adapters import MOE_CONFIG_FILE
    from soups.compose.moe import load
    from soups.evaluation import adapter_kinds

    kind = adapter_kinds.registered()["moe"]
    assert kind.marker == MOE_CONFIG_FILE
    for entry, function in ((kind.install_entry, load.install_moe),
                            (kind.installed_entry, load.installed_moe)):
        module, _, name = entry.partition(":")
        assert getattr(importlib.import_module(module), name) is function
