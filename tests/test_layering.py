"""The import layering of design.md: `soups` (core) imports neither ray nor mlflow;
`ray.train` and `ray.tune` are imported only in `trainables/` (the study driver in `study/`
starts Ray and reads its logs, with ray core only)."""

import ast
from pathlib import Path

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
        "from soups.train_settings import PAPER_TARGETS, LoraSettings, TrainSettings\n"
        "assert TrainSettings().total_steps(10) and LoraSettings().target_modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
