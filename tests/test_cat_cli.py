"""`soups cat` end to end on the tiny model: flags reach the settings, the export loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from conftest import assert_user_error
from typer.testing import CliRunner

from soups.adapters import LoraAdapter, LoraModule, save_adapter
from study import cmd_cat

# Mixed tiers: the two end-to-end commands train CAT weights (integration); the flag checks
# fail before any model is loaded (unit).


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(cmd_cat.cat)
    return app


def _skill(root, name, template, n=24):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"### Question:\n{template.format(i)}\n### Answer:\n",
             "completion": f"The answer is {i}."} for i in range(n)]
    path = root / name
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def _adapter(model_dir, path, seed):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    modules = {name: LoraModule(A=torch.randn(2, m.in_features, generator=g) /
                                math.sqrt(m.in_features),
                                B=torch.randn(m.out_features, 2, generator=g) * 0.3,
                                scaling=2.0)
               for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    return save_adapter(path, modules, {"base_model_name_or_path": model_dir})


@pytest.mark.integration
def test_cat_command_trains_and_exports(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    skills = [_skill(tmp_path, "math", "Tom has {} apples."),
              _skill(tmp_path, "code", "Write solution() returning {}.")]
    adapters = [_adapter(tiny_model_dir, tmp_path / f"lora{i}", i) for i in (1, 2)]
    out = tmp_path / "cat"
    args = [*map(str, adapters), "--out", str(out), "--model", tiny_model_dir,
            "--data", str(skills[0]), "--data", str(skills[1]), "--granularity", "layer",
            "--init", "0.25,0.75", "--count", "8", "--held-out", "4", "--batch-size", "4",
            "--max-steps", "3", "--lr", "0.05", "--warmup", "1", "--eval-every", "2"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "4 trainable parameters" in result.output  # 2 layers x 2 LoRAs
    record = json.loads((out / "cat_weights.json").read_text())
    assert record["settings"]["granularity"] == "layer"
    assert record["settings"]["init_values"] == [0.25, 0.75]
    training = record["training"]
    assert training["steps"] == 3 and training["train_examples"] == 8
    assert training["held_out_examples"] == 4 and training["dtype"] == "float32"
    assert set(record["weights"]) == set(LoraAdapter.open(out).module_names)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(out))
    assert loaded.peft_config["default"].r == 4


@pytest.mark.integration
def test_merge_command_trains_cat_learned(tiny_model_dir, tmp_path):
    from study.cli import app

    skills = [_skill(tmp_path, "math", "Tom has {} apples."),
              _skill(tmp_path, "code", "Write solution() returning {}.")]
    adapters = [_adapter(tiny_model_dir, tmp_path / f"lora{i}", i) for i in (1, 2)]
    out = tmp_path / "merged"
    args = ["merge", "--method", "cat_learned", "--out", str(out), *map(str, adapters),
            "--model", tiny_model_dir, "--data", str(skills[0]), "--data", str(skills[1]),
            "--init", "uniform", "--count", "8", "--held-out", "4", "--batch-size", "4",
            "--max-steps", "2", "--warmup", "1", "--eval-every", "1", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "cat_weights.json").read_text())
    assert record["settings"]["init"] == "uniform" and record["settings"]["seed"] == 3
    assert record["training"]["steps"] == 2
    bad = CliRunner().invoke(app, [*args[:5], *map(str, adapters), "--density", "0.5"])
    assert bad.exit_code != 0 and "takes no --density" in bad.output


@pytest.mark.unit
@pytest.mark.parametrize("flags, message", [
    (["--init", "zeros"], "neither one of"),
    (["--init", "ones"], "needs normalisation 'none'"),
    (["--granularity", "row"], "granularity"),
])
def test_cat_command_rejects_bad_flags(tmp_path, flags, message):
    result = CliRunner().invoke(_app(), ["a", "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code != 0
    assert message in result.output


@pytest.mark.unit
def test_cat_command_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
    """Folders that are not what they should be stop `soups cat` with exit status 2 and one
    line naming them, before any training."""
    skill = _skill(tmp_path, "math", "Tom has {} apples.")
    good = _adapter(tiny_model_dir, tmp_path / "good", 1)
    wide = save_adapter(tmp_path / "wide", {"model.layers.0.self_attn.q_proj": LoraModule(
        A=torch.ones(2, 48), B=torch.ones(48, 2), scaling=1.0)},
        {"base_model_name_or_path": tiny_model_dir})  # for a model of hidden size 48
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not an adapter")

    def cat(*adapters, model=tiny_model_dir, data=skill, init="uniform"):
        return ["cat", *adapters, "--out", tmp_path / "out", "--model", model, "--data", data,
                "--data", skill, "--init", init, "--count", "2", "--held-out", "2"]

    cases = [
        (cat(tmp_path / "absent", good), [tmp_path / "absent", "no such folder"]),
        (cat(tmp_path / "plain", good), [tmp_path / "plain", "adapter_config.json"]),
        (cat(good, wide), [wide, "model.layers.0.self_attn.q_proj", "48 x 48", "32 x 32"]),
        (cat(good, good, model=tmp_path / "no_model"), [tmp_path / "no_model"]),
        (cat(good, good, data=tmp_path / "no_data"), [tmp_path / "no_data"]),
        (cat(good, good, init="0.2,0.3,0.5"), ["3 numbers for 2 LoRAs"]),
    ]
    for args, named in cases:
        assert_user_error(args, *named)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_every_list_option_takes_several_values_after_one_flag():
    """`--weights 0.4 0.6` (argparse style) and `--weights 0.4 --weights 0.6` (click style)
    mean the same for every list option of every command; negatives are values."""
    import typer

    from study.cli import _is_list_option, app, expand_list_options

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        for param in command.params:
            if not _is_list_option(param):
                continue
            flag = param.opts[0]
            values = ["0.4", "-0.6"]
            greedy = expand_list_options([name, flag, *values, "--help"])
            assert greedy == [name, flag, values[0], flag, values[1], "--help"]
            checked += 1
    assert checked >= 4  # merge --weights/--data, cat --data, evaluate --task
    args = expand_list_options(["merge", "--weights", "1", "-1", "--method", "linear",
                                "--out", "o", "a", "b"])
    context = group.commands["merge"].make_context("merge", args[1:])
    assert context.params["weights"] == [1.0, -1.0]
    assert [str(p) for p in context.params["adapters"]] == ["a", "b"]
    assert expand_list_options(["merge", "--", "--weights", "1", "2"]) == \
        ["merge", "--", "--weights", "1", "2"]


@pytest.mark.unit
def test_cat_options_of_both_commands_are_the_paper_recipe():
    """`soups cat` and `soups merge --method cat_learned` read their defaults from the
    preset in soups.compose.cat.settings: editing the preset changes both commands."""
    from soups.compose.cat.settings import (
        PAPER_CAT_TRAIN,
        PAPER_FRACTION,
        PAPER_HELD_OUT,
        CatSettings,
    )
    from study.cli import app

    group = typer.main.get_command(app)
    expected = {"lr": PAPER_CAT_TRAIN.learning_rate, "epochs": PAPER_CAT_TRAIN.epochs,
                "batch_size": PAPER_CAT_TRAIN.micro_batch_size,
                "max_length": PAPER_CAT_TRAIN.max_length,
                "warmup": PAPER_CAT_TRAIN.warmup_steps, "eval_every": PAPER_CAT_TRAIN.eval_every,
                "fraction": PAPER_FRACTION, "held_out": PAPER_HELD_OUT,
                "granularity": CatSettings().granularity, "init": CatSettings().init}
    for command in ("cat", "merge"):
        defaults = {p.name: p.default for p in group.commands[command].params}
        assert {k: defaults[k] for k in expected} == expected, command
