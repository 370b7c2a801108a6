"""The shipped default build of the embedded base model (soups/training/embedded_model): it is the
default recipe, a first run copies it instead of pretraining, and a rebuild is compared with
it weight by weight."""

import json

import pytest

from soups.training.base_model import BUILD_FILE, BaseModelSettings, build_base_model

pytestmark = pytest.mark.unit


def test_the_shipped_build_is_the_default_recipe():
    """A change of the recipe (settings, BUILD_VERSION) without re-shipping the model fails
    here, not silently in a first run that would pretrain for minutes."""
    from soups.training.base_model import SHIPPED_DIR, shipped_build

    record = json.loads((SHIPPED_DIR / BUILD_FILE).read_text())
    assert shipped_build(BaseModelSettings()) == SHIPPED_DIR
    assert record["settings"] == BaseModelSettings().__dict__
    assert shipped_build(BaseModelSettings(seed=1)) is None  # another seed is built
    assert (SHIPPED_DIR / "model.safetensors").stat().st_size < 50 * 2**20


def test_a_first_run_copies_the_shipped_build_and_rebuild_compares(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import soups.training.base_model as base_model

    logs: list[str] = []
    copied = build_base_model(tmp_path, BaseModelSettings(), log=logs.append)
    assert copied.parent == tmp_path and "shipped build" in logs[0]
    model = AutoModelForCausalLM.from_pretrained(copied)
    assert sum(p.numel() for p in model.parameters()) == json.loads(
        (copied / BUILD_FILE).read_text())["parameters"]
    assert base_model.compare_with_shipped(copied).startswith("identical")
    # A rebuild is compared weight by weight: here a shipped folder that is another build.
    fake = tmp_path / "other"
    fake.mkdir()
    from safetensors.torch import load_file, save_file

    weights = load_file(copied / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 0.5
    save_file(weights, fake / "model.safetensors")
    (fake / BUILD_FILE).write_text((copied / BUILD_FILE).read_text())
    monkeypatch.setattr(base_model, "SHIPPED_DIR", fake)
    assert "differs from the shipped build by at most 0.5" in base_model.compare_with_shipped(
        copied)
