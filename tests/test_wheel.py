"""The project as a user installs it: the wheel `pip install .` builds, installed without `-e`
into a fresh virtual environment beside the pinned stack, run from outside the checkout.

Every package and data file is in the wheel (and neither `benchmarks` nor `tests`); every
module imports from the installed copy; `soups --help`, `--version`, `methods`, `studies`,
`validate` on each shipped study by its name, and `soups merge` on two small adapters work
from the installed package alone.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("soups", "study", "trainables", "search_spaces", "analysis")
# The two template studies need what only their user has: the base model and their files.
NEEDS = {"lora_soups_gsm_hard": {"base_model": "org/model"},
         "qabot": {"base_model": "org/model", "skills.manual.source": "{manual}",
                   "target.manual_qa.source": "{questions}"}}


def _source_copy(dest: Path) -> Path:
    """The files a clone has (git's list where there is a repository), so that nothing built
    or cached in this checkout (build/, .venv) reaches the wheel."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = []
    files = [f for f in listed if f and (ROOT / f).is_file()]
    if files:
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "build", "dist", "soups_home", "__pycache__", "*.egg-info", ".git"))
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, the fresh environment's bin folder, a working directory outside the
    checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("lora_soups-*.whl")
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=120)
    # The pinned stack (torch, ray, ...) of this environment, beside the fresh one: a path
    # line in a .pth file adds the folder without running its own .pth files, so this
    # checkout's editable install is not seen.
    (env_site,) = (env / "lib").glob("python*/site-packages")
    (env_site / "pinned_stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=600)
    work = tmp / "work"
    work.mkdir()
    return wheel, env / "bin", work


def _run(bin_dir: Path, work: Path, *args: str, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SOUPS_HOME=str(work / "home"), PATH=f"{bin_dir}:{env.get('PATH', '')}")
    return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_wheel_holds_every_package_and_data_file_and_nothing_else(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                assert str(init.relative_to(ROOT)) in names, init
    assert {f"search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml")} <= names
    shipped = ROOT / "soups/training/embedded_model"
    assert {f"soups/training/embedded_model/{p.name}" for p in shipped.iterdir()} <= names
    data = {n.rsplit("/", 1)[-1] for n in names if "/data/share/lora-soups/studies/" in n}
    assert data == {p.name for p in (ROOT / "studies").glob("*.yaml")}
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)


def test_every_module_imports_from_the_installed_package(installed):
    _, bin_dir, work = installed
    script = (
        "import importlib, pkgutil, sys\n"
        f"packages = {PACKAGES!r}\n"
        "checkout = " + repr(str(ROOT)) + "\n"
        "assert checkout not in sys.path and '' not in sys.path[1:], sys.path\n"
        "inside = tuple(f'{checkout}/{p}/' for p in packages)\n"
        "names = []\n"
        "for name in packages:\n"
        "    package = importlib.import_module(name)\n"
        "    assert not package.__file__.startswith(inside), package.__file__\n"
        "    names.append(name)\n"
        "    names += [m.name for m in pkgutil.walk_packages(package.__path__, name + '.')]\n"
        "for name in names:\n"
        "    module = importlib.import_module(name)\n"
        "    assert not (getattr(module, '__file__', '') or '').startswith(inside), name\n"
        "print(len(names))\n")
    done = _run(bin_dir, work, str(bin_dir / "python"), "-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 60


def test_the_installed_command_line_works_alone(installed, tmp_path):
    from importlib.metadata import version

    _, bin_dir, work = installed
    soups = str(bin_dir / "soups")
    shown = _run(bin_dir, work, soups, "--version")
    assert shown.returncode == 0 and shown.stdout == f"soups {version('lora-soups')}\n"
    for args in (["--help"], ["methods"], ["run", "--help"]):
        done = _run(bin_dir, work, soups, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    listed = _run(bin_dir, work, soups, "studies")
    assert listed.returncode == 0, listed.stderr[-2000:]
    shipped = sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()] == \
        shipped
    (tmp_path / "manual.txt").write_text("The pump starts with the red switch.\n")
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "q", "answer": "a"})
                                              + "\n")
    files = {"manual": tmp_path / "manual.txt", "questions": tmp_path / "questions.jsonl"}
    for name in shipped:
        sets = [f"{k}={v.format(**files)}" for k, v in NEEDS.get(name, {}).items()]
        done = _run(bin_dir, work, soups, "validate", name,
                    *[arg for s in sets for arg in ("--set", s)])
        assert done.returncode == 0 and ": valid (study" in done.stdout, (name, done.stderr)
    # Two small adapters, made and merged with the installed package only.
    made = _run(bin_dir, work, str(bin_dir / "python"), "-c", MAKE_ADAPTERS)
    assert made.returncode == 0, made.stderr[-3000:]
    merged = _run(bin_dir, work, soups, "merge", "--method", "ties", "--density", "0.5",
                  "a", "b", "--out", "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    config = json.loads((work / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 4 and (work / "merged" / "adapter_model.safetensors").is_file()


MAKE_ADAPTERS = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from soups.adapters import LoraModule, save_adapter

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained("model")
for name, seed in (("a", 1), ("b", 2)):
    g = torch.Generator().manual_seed(seed)
    modules = {f"model.layers.{i}.self_attn.q_proj": LoraModule(
        A=torch.randn(4, 32, generator=g), B=torch.randn(32, 4, generator=g), scaling=2.0)
        for i in range(2)}
    save_adapter(name, modules, {"base_model_name_or_path": "model", "task_type": "CAUSAL_LM"})
"""
