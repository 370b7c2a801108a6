"""soups.compose.moe, the mixture of LoRA experts, against its definition: one expert is that LoRA
(PEFT's logits) whatever the router; top-1 uses, token by token, the expert its gate picks;
top-k = k with a zero router is the uniform average of the experts' deltas; export and load
give the same logits, in a folder PEFT-only paths refuse by name; training moves the routers
alone; the resident evaluator, the file transport of the study's evaluators and `soups
evaluate` score a mixture as `load_moe` does, and leave the resident base bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, build_sharp_llama, build_tiny_llama, sample_sequences
from test_resident import PROMPTS, _batch, _logits, make_adapter

from soups.adapters import AdapterError, LoraAdapter, check_fits
from soups.compose.moe import (
    MoeError,
    MoeLinear,
    MoeModel,
    MoeSettings,
    export_moe,
    is_moe_folder,
    load_moe,
    top_k_gates,
    train_moe,
)
from soups.evaluation.evaluate import GenerationSettings, evaluate_rows, load_model
from soups.evaluation.resident import ResidentModel, evaluate_side_by_side
from soups.evaluation.scoring import ScorerSettings
from soups.training.train_settings import TrainSettings

# Mixed tiers: forward passes, exports and evaluation on the tiny model are unit; the tests
# that run an optimizer loop (`train_moe`, `learn_moe`) are integration, as CAT's are.

GREEDY = GenerationSettings(max_new_tokens=6, batch_size=2, stop=())
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def experts(tiny_model_dir, tmp_path_factory):
    """Two PEFT LoRAs: `a` on q, v, up, down (rank 4); `b` on q, k, v (rank 2, rslora), so
    k_proj, up_proj and down_proj have one expert each."""
    root = tmp_path_factory.mktemp("moe_experts")
    a = make_adapter(tiny_model_dir, root / "a", seed=1, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    b = make_adapter(tiny_model_dir, root / "b", seed=2, r=2, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "v_proj"])
    return a, b


def _base(model_dir, dtype="float32"):
    return load_model(model_dir, None, "cpu", dtype)


def _set_routers(moe: MoeModel, std: float, seed: int, bias: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(moe.layers.items()):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * std)
            if layer.router.bias is not None:
                layer.router.bias.fill_(bias)


def _delta(module, x):
    """PEFT's LoRA delta of one expert: lora_B(lora_A(x)) * scaling."""
    return F.linear(F.linear(x, module.A), module.B) * module.scaling


# ---- the layer and the model against the definition -------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("std", [0.0, 3.0])
def test_one_expert_is_that_lora_whatever_the_router(tiny_model_dir, experts, std):
    from peft import PeftModel

    base, tokenizer = _base(tiny_model_dir)
    ids, mask = _batch(tokenizer)
    want = _logits(PeftModel.from_pretrained(_base(tiny_model_dir)[0], experts[1]).eval(),
                   ids, mask)
    moe = MoeModel.attach(base, [experts[1]], MoeSettings(top_k=1, bias=True))
    _set_routers(moe, std, seed=4, bias=5.0)
    got = _logits(moe, ids, mask)
    assert (got - want).abs().max() < 1e-5
    assert (got - _logits(_base(tiny_model_dir)[0], ids, mask)).abs().max() > 1e-2


@pytest.mark.unit
def test_top_1_is_the_picked_expert_token_by_token_in_one_layer(tiny_model_dir, experts):
    base, _ = _base(tiny_model_dir)
    moe = MoeModel.attach(base, list(experts), MoeSettings(top_k=1, init_std=2.0, seed=3))
    layer = moe.layers[Q0]
    x = torch.randn(3, 9, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        picked = layer.router(x).argmax(-1)
        got = layer(x)
        per_expert = [layer.base(x) + _delta(LoraAdapter.open(e).module(Q0), x)
                      for e in experts]
    assert 0 < int(picked.sum()) < picked.numel()  # both experts are picked by some tokens
    want = torch.where(picked.unsqueeze(-1) == 0, per_expert[0], per_expert[1])
    assert (got - want).abs().max() < 1e-5


class _PickedPerToken(torch.nn.Module):
    """The reference layer: base(x) plus, for each token, the PEFT delta of the expert
    `picked` names (-1: none), from the adapters' own factors."""

    def __init__(self, base, modules, picked):
        super().__init__()
        self.base, self.modules_, self.picked = base, modules, picked

    def forward(self, x):
        out = self.base(x)
        for j, module in enumerate(self.modules_):
            if module is not None:
                out = out + (self.picked == j).unsqueeze(-1) * _delta(module, x)
        return out


@pytest.mark.unit
def test_top_1_model_is_the_picked_expert_token_by_token(tiny_model_dir, experts):
    base, tokenizer = _base(tiny_model_dir)
    ids, mask = _batch(tokenizer)
    moe = MoeModel.attach(base, list(experts), MoeSettings(top_k=1, init_std=2.0, seed=3))
    picked = {}

    def record(layer, inputs, _output):  # the expert index (of all k) each token used
        present = torch.tensor(layer.present)
        picked[layer.name] = present[layer.gates(inputs[0]).argmax(-1)]

    hooks = [layer.register_forward_hook(record) for layer in moe.layers.values()]
    got = _logits(moe, ids, mask)
    for hook in hooks:
        hook.remove()
    reference, _ = _base(tiny_model_dir)
    adapters = [LoraAdapter.open(e) for e in experts]
    for name, choice in picked.items():
        parent, _, child = name.rpartition(".")
        modules = [a.module(name) if name in a.module_names else None for a in adapters]
        holder = reference.get_submodule(parent)
        setattr(holder, child, _PickedPerToken(getattr(holder, child), modules, choice))
    mixed = [n for n, c in picked.items() if 0 < int(c.sum()) < c.numel()]
    assert len(mixed) >= 4  # q_proj and v_proj of both layers route tokens both ways
    assert (got - _logits(reference, ids, mask)).abs().max() < 1e-4


@pytest.mark.unit
def test_top_k_of_k_with_a_zero_router_is_the_uniform_average(tiny_model_dir, experts):
    base, tokenizer = _base(tiny_model_dir)
    ids, mask = _batch(tokenizer)
    moe = MoeModel.attach(base, list(experts), MoeSettings(top_k=2, router_init="zeros"))
    layer = moe.layers[Q0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    modules = [LoraAdapter.open(e).module(Q0) for e in experts]
    with torch.no_grad():
        want = layer.base(x) + 0.5 * (_delta(modules[0], x) + _delta(modules[1], x))
        assert (layer(x) - want).abs().max() < 1e-5
    # The whole model: W + mean of the deltas present (a module one expert carries: all of
    # it, the gate runs over the experts present there).
    dense, _ = _base(tiny_model_dir)
    adapters = [LoraAdapter.open(e) for e in experts]
    with torch.no_grad():
        for name, module in dense.named_modules():
            carried = [a.module(name).delta() for a in adapters if name in a.module_names]
            if carried:
                module.weight += sum(carried) / len(carried)
    assert (_logits(moe, ids, mask) - _logits(dense, ids, mask)).abs().max() < 1e-4


@pytest.mark.unit
def test_top_k_gates_are_a_softmax_over_the_chosen_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    gates = top_k_gates(logits, 2)
    top = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    assert torch.allclose(gates[0], torch.tensor([0.0, top[0], top[1]]))
    assert gates[1, 1] == 0 and torch.allclose(gates.sum(-1), torch.ones(2))
    assert torch.equal(top_k_gates(logits, 3), torch.softmax(logits, -1))


@pytest.mark.unit
def test_routers_are_float32_on_the_base_device_in_bfloat16(tiny_model_dir, experts):
    base, tokenizer = _base(tiny_model_dir, "bfloat16")
    moe = MoeModel.attach(base, list(experts), MoeSettings(init_std=0.5))
    layer = moe.layers[Q0]
    assert layer.router.weight.dtype == layer.lora_A.dtype == torch.float32
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.router.weight.device == layer.lora_A.device == layer.base.weight.device
    ids, mask = _batch(tokenizer)
    half = _logits(moe, ids, mask)
    full = MoeModel.attach(_base(tiny_model_dir)[0], list(experts), MoeSettings(init_std=0.5))
    assert half.dtype == torch.bfloat16
    assert (half.float() - _logits(full, ids, mask)).abs().max() < 0.1


@pytest.mark.unit
def test_settings_and_inputs_that_cannot_work_are_named(tiny_model_dir, experts):
    for kwargs, named in [({"top_k": 0}, "top_k"), ({"router_init": "xavier"}, "xavier"),
                          ({"init_std": 0.0}, "init_std")]:
        with pytest.raises(MoeError, match=named):
            MoeSettings(**kwargs)
    with pytest.raises(MoeError, match="top_k 3 is more than the 2 experts"):
        MoeModel.attach(_base(tiny_model_dir)[0], list(experts), MoeSettings(top_k=3))
    one = MoeModel.attach(_base(tiny_model_dir)[0], list(experts), MoeSettings(top_k=1))
    with pytest.raises(MoeError, match="no router gets a gradient"):
        train_moe(one, [([1, 2], [1, 2])], [([1, 2], [1, 2])], TrainSettings(), 0, log=None)


# ---- export and load --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture(tiny_model_dir, experts, tmp_path_factory):
    """An exported mixture with random routers (tokens route both ways), and its logits."""
    base, tokenizer = _base(tiny_model_dir)
    moe = MoeModel.attach(base, list(experts), MoeSettings(top_k=1, init_std=2.0, seed=3,
                                                           bias=True))
    _set_routers(moe, 2.0, seed=5, bias=0.3)
    folder = export_moe(moe, tmp_path_factory.mktemp("moe") / "mixture", tiny_model_dir,
                        {"steps": 3, "initial_eval_loss": 2.0, "best_eval_loss": 1.5,
                         "best_step": 3})
    return folder, _logits(moe, *_batch(tokenizer))


@pytest.mark.unit
def test_export_then_load_gives_identical_logits(tiny_model_dir, mixture):
    folder, want = mixture
    model = load_moe(folder, tiny_model_dir, "cpu", "float32")
    tokenizer = _base(tiny_model_dir)[1]
    assert torch.equal(_logits(model, *_batch(tokenizer)), want)
    layers = [m for m in model.modules() if isinstance(m, MoeLinear)]
    assert len(layers) == 2 * 5 and not model.training
    assert not any(p.requires_grad for layer in layers for p in layer.router.parameters())
    same, _ = load_model(tiny_model_dir, folder, "cpu", "float32")  # the evaluator's loader
    assert torch.equal(_logits(same, *_batch(tokenizer)), want)


@pytest.mark.unit
def test_the_folder_holds_safetensors_json_and_markdown_only(mixture):
    folder, _ = mixture
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "experts/a/adapter_config.json",
                     "experts/a/adapter_model.safetensors", "experts/b/adapter_config.json",
                     "experts/b/adapter_model.safetensors", "moe.json", "router.safetensors"]
    assert is_moe_folder(folder) and not is_moe_folder(folder / "experts" / "a")
    config = json.loads((folder / "moe.json").read_text())
    assert config["format"] == "soups-lora-moe" and config["version"] == 1
    assert config["experts"] == ["a", "b"] and config["top_k"] == 1
    assert config["modules"][Q0] == {"experts": ["a", "b"], "in_features": 32, "top_k": 1}
    assert config["modules"]["model.layers.1.mlp.down_proj"]["experts"] == ["a"]
    assert config["base_model"]["hidden_size"] == 32 and config["training"]["steps"] == 3
    card = (folder / "README.md").read_text()
    assert "mixture of LoRA experts" in card and "PEFT alone cannot load it" in card
    assert "soups.compose.moe import load_moe" in card


@pytest.mark.unit
def test_peft_only_paths_refuse_a_mixture_by_name(tiny_model_dir, mixture, experts, tmp_path):
    from peft import PeftModel

    from soups.compose.merge import merge_adapters

    folder, _ = mixture
    for call in (lambda: LoraAdapter.open(folder),
                 lambda: check_fits(folder, _base(tiny_model_dir)[0]),
                 lambda: merge_adapters([folder, experts[0]], "linear", tmp_path / "m")):
        with pytest.raises(AdapterError, match="mixture of LoRA experts .*moe.json.*load_moe"):
            call()
    with pytest.raises(ValueError):  # PEFT itself finds no adapter_config.json
        PeftModel.from_pretrained(_base(tiny_model_dir)[0], str(folder))
    assert_user_error(["merge", "--method", "linear", "--out", tmp_path / "cli", folder,
                       experts[0]], folder, "moe.json")


@pytest.mark.unit
def test_a_mixture_of_another_base_or_format_is_refused(tiny_model_dir, mixture, tmp_path):
    import shutil

    folder, _ = mixture
    wide = build_tiny_llama(tmp_path / "wide", hidden=48)
    with pytest.raises(MoeError, match="hidden_size 32"):
        load_moe(folder, wide, "cpu", "float32")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "moe.json").read_text())
    (copy / "moe.json").write_text(json.dumps({**config, "version": 9}))
    with pytest.raises(MoeError, match="version 9"):
        load_moe(copy, tiny_model_dir, "cpu", "float32")
    with pytest.raises(MoeError, match="refusing to write"):
        export_moe(MoeModel.attach(_base(tiny_model_dir)[0], [str(copy / "experts" / "a")],
                                   MoeSettings(top_k=1)), copy / "experts")


# ---- evaluation: resident, evaluator transport, CLI -------------------------------------


def _row(expected):
    return {"prompt": "p", "scorer": "final_number", "function": "", "calls": "[]",
            "expected": json.dumps(expected), "completion": "The answer is 2."}


PROMPTS = PROMPTS[:3]  # evaluation tests: three prompts (two batches of GREEDY) are enough
ROWS = [_row([n]) for n in range(len(PROMPTS))]


@pytest.mark.unit
@pytest.mark.parametrize("scorer", ["final_number", "loss"])
def test_resident_evaluation_equals_load_moe_and_restores_the_base(
        tiny_model_dir, mixture, experts, scorer):
    folder, _ = mixture
    settings = ScorerSettings(kind=scorer)
    resident = ResidentModel(tiny_model_dir, device="cpu", dtype="float32", check_restored=True)
    digest = resident.weights_digest()
    modules = {n: id(m) for n, m in resident.model.named_modules()}
    scores = evaluate_side_by_side(resident, [experts[0], folder, None], "t", ROWS, PROMPTS,
                                   GREEDY, settings)
    assert resident.weights_digest() == digest
    assert {n: id(m) for n, m in resident.model.named_modules()} == modules
    want = evaluate_rows(load_moe(folder, tiny_model_dir, "cpu", "float32"),
                         resident.tokenizer, "t", ROWS, PROMPTS, GREEDY, settings)
    assert scores[1].records == want.records and scores[1].partial == want.partial
    lora = evaluate_side_by_side(resident, [experts[0], None], "t", ROWS, PROMPTS, GREEDY,
                                 settings)
    assert [scores[0].records, scores[2].records] == [lora[0].records, lora[1].records]
    assert want.records != lora[1].records  # the mixture is not the base model


@pytest.mark.unit
def test_a_mixture_block_is_one_at_a_time_and_restores_on_error(tiny_model_dir, mixture,
                                                                experts):
    folder, _ = mixture
    resident = ResidentModel(tiny_model_dir, device="cpu", dtype="float32")
    digest = resident.weights_digest()
    with pytest.raises(RuntimeError, match="boom"), resident.mixture(folder):
        assert isinstance(resident.model.get_submodule(Q0), MoeLinear)
        raise RuntimeError("boom")
    with resident.mixture(folder):
        with pytest.raises(Exception, match="one `candidates` or `mixture` block"):
            with resident.candidates([experts[0]]):
                pass
    assert resident.weights_digest() == digest
    assert not any(isinstance(m, MoeLinear) for m in resident.model.modules())
    with pytest.raises(AdapterError, match="moe.json"):  # not as a LoRA candidate
        with resident.candidates([folder]):
            pass


class _Task:
    """The part of `soups.tasks.task_data.TaskData` the evaluators call (a loss task: no
    generation, the test stays fast)."""

    def rows(self, split, limit=None):
        return ROWS[:limit]

    def eval_prompts(self, rows):
        return PROMPTS[:len(rows)]

    def generation(self, evaluation):
        return GREEDY

    def scorer(self):
        return ScorerSettings(kind="loss")


@pytest.mark.unit
def test_a_mixture_travels_as_files_to_the_evaluator(tiny_model_dir, mixture, experts):
    from trainables.evaluator import Candidate, adapter_files, evaluate_together

    folder, _ = mixture
    files = adapter_files(folder)
    assert {"moe.json", "router.safetensors", "experts/a/adapter_model.safetensors",
            "experts/b/adapter_config.json"} <= set(files)
    resident = ResidentModel(tiny_model_dir, device="cpu", dtype="float32")
    together = evaluate_together(resident, {"t": _Task()}, {"sandbox": "unsafe_subprocess"},
                                 [Candidate(files, "validation", ("t",), None),
                                  Candidate(adapter_files(experts[0]), "validation", ("t",),
                                            None)])
    want = evaluate_rows(load_moe(folder, tiny_model_dir, "cpu", "float32"),
                         resident.tokenizer, "t", ROWS, PROMPTS, GREEDY, _Task().scorer())
    got = [json.loads(line) for line in together[0]["records"]["t"].splitlines()]
    assert [r["loss"] for r in got] == [r["loss"] for r in want.records]
    assert together[0]["metrics"]["validation/t/loss"] == want.partial["loss"]
    assert together[1]["metrics"]["validation/t/loss"] != want.partial["loss"]


@pytest.mark.unit
def test_soups_evaluate_accepts_a_mixture_folder(tiny_model_dir, mixture, tmp_path):
    from datasets import Dataset, DatasetDict
    from typer.testing import CliRunner

    from study.cli import app

    folder, _ = mixture
    rows = [{**_row([2]), "scorer": "loss", "key": f"k{i}", "prompt": p}
            for i, p in enumerate(PROMPTS)]
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d" / "m"))
    out = tmp_path / "scores.json"
    done = CliRunner().invoke(app, ["evaluate", "--model", tiny_model_dir, "--data",
                                    str(tmp_path / "d"), "--task", "m", "--adapter",
                                    str(folder), "--out", str(out)])
    assert done.exit_code == 0, done.output
    model = load_moe(folder, tiny_model_dir, "cpu", "float32")
    want = evaluate_rows(model, _base(tiny_model_dir)[1], "m", rows)
    assert json.loads(out.read_text())["m"]["metrics"]["m/loss"] == want.partial["loss"]


# ---- training ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny base with sharp output distributions (so the two experts' behaviours differ
    clearly, as in CAT's tests), its two experts, and sequences sampled from the mixture
    whose every token uses expert 0 (its router bias says so): data with a known best
    router."""
    root = tmp_path_factory.mktemp("moe_sharp")
    base = build_sharp_llama(root / "base")
    experts = [make_adapter(base, root / f"e{i}", seed=i, r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
               for i in (1, 2)]
    teacher = MoeModel.attach(_load(base), experts, MoeSettings(bias=True))
    with torch.no_grad():
        for layer in teacher.layers.values():
            layer.router.bias.copy_(torch.tensor([50.0, 0.0]))
    return base, experts, sample_sequences(teacher, 40, seed=0, length=24)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.mark.integration
def test_training_moves_only_the_routers_toward_the_known_expert(sharp):
    base_dir, experts, data = sharp
    moe = MoeModel.attach(_load(base_dir), experts,
                          MoeSettings(top_k=2, router_init="zeros", bias=True))
    routers = {id(p) for p in moe.router_parameters()}
    frozen = {n: t.clone() for n, t in moe.state_dict().items() if "router" not in n}
    buffers = {n: b.clone() for n, b in moe.named_buffers()}
    assert all(p.requires_grad == (id(p) in routers) for p in moe.parameters())
    settings = TrainSettings(learning_rate=0.1, max_steps=10, micro_batch_size=8,
                             warmup_steps=1, eval_every=5, loss_on="all")
    seen = []
    result = train_moe(moe, data[:32], data[32:], settings, pad_id=0, on_step=seen.append,
                       log=None)
    after = moe.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(torch.equal(buffers[n], b) for n, b in moe.named_buffers())
    assert result.best_eval_loss < result.initial_eval_loss - 0.05
    assert [r["step"] for r in seen if "eval_loss" in r] == [5, 10]
    biases = torch.stack([layer.router.bias for layer in moe.layers.values()])
    assert (biases[:, 0] > biases[:, 1]).float().mean() > 0.7  # toward the teacher's expert
    print(f"MoE router training on the tiny model: {result.steps} steps in "
          f"{result.seconds:.2f} s, held-out loss {result.initial_eval_loss:.4f} -> "
          f"{result.best_eval_loss:.4f}")


@pytest.mark.integration
def test_learn_moe_trains_exports_and_reports_each_evaluation(tiny_model_dir, experts,
                                                             tmp_path):
    from conftest import TINY_CORPUS

    from soups.compose.moe import learn_moe

    skills = [[{"prompt": text.split("### Answer:\n")[0] + "### Answer:\n",
                "completion": text.split("### Answer:\n")[1]}] * 12 for text in TINY_CORPUS]
    settings = TrainSettings(learning_rate=0.05, max_steps=6, micro_batch_size=4,
                             warmup_steps=1, eval_every=3, loss_on="all", max_length=64)
    records = []
    result = learn_moe(list(experts), tiny_model_dir, skills, tmp_path / "out",
                       MoeSettings(top_k=2), settings, fraction=None, count=8, held_out=4,
                       device="cpu", dtype="float32", on_step=records.append, log=None)
    assert result.steps == 6 and [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    config = json.loads((tmp_path / "out" / "moe.json").read_text())
    assert config["training"]["best_step"] == result.best_step
    assert config["training"]["train_examples"] == 8
    model = load_moe(tmp_path / "out", tiny_model_dir, "cpu", "float32")
    assert isinstance(model.get_submodule(Q0), MoeLinear)


@pytest.mark.unit
def test_a_study_export_of_a_mixture_keeps_it_and_says_how_to_load_it(mixture, tmp_path):
    import shutil
    from types import SimpleNamespace

    from study.export import export_adapter
    from trainables.trial_context import ADAPTER_DIR, TRIAL_FILE

    folder, _ = mixture
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(folder, checkpoint / ADAPTER_DIR)
    (checkpoint / TRIAL_FILE).write_text(json.dumps({"metrics": {"objective": 0.5}}))
    spec = SimpleNamespace(name="s", skills=["math", "code"], target_name="math_code",
                           base_model="tiny", storage=str(tmp_path))
    row = {"checkpoint": str(checkpoint), "trial": "t1", "candidate": "lora_moe top_k=1",
           "method": "lora_moe", "rank": 4, "params": {"top_k": 1}}
    out = export_adapter(row, tmp_path / "best", spec)
    assert is_moe_folder(out) and (out / "router.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "mixture of LoRA experts (not a PEFT adapter)" in card
    assert "soups.compose.moe.load_moe" in card and "PeftModel.from_pretrained" not in card
