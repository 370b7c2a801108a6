"""Shared fixtures. `tiny_model_dir` is a randomly initialised 2-layer Llama with a locally
trained tokenizer, saved with `save_pretrained`: enough for mechanics tests (adapters,
merges, training loops, evaluation) without the embedded model's pretraining."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CORPUS = [
    "### Question:\nTom has 25 apples. He gives 9 to Sam. How many apples are left?\n"
    "### Answer:\nTom has 25 - 9 = 16 apples. The answer is 16.\n",
    "### Question:\nWrite a Python function solution() that returns 7 times 8.\n"
    "### Answer:\ndef solution():\n    a = 7\n    b = 8\n    result = a * b\n    return result\n",
]


def build_tiny_llama(out_dir, hidden: int = 32, layers: int = 2, seed: int = 0):
    """Save a random tiny Llama + tokenizer to `out_dir`; returns the path as str."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soups.training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=600, max_number=200)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def write_random_lora(model_dir, path, rank, alpha, seed,
                      targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
                      b_scale=0.3) -> str:
    """A PEFT LoRA folder for the model in `model_dir` with random A and B (B nonzero,
    unlike a fresh PEFT init) on the linear layers named `targets`; returns its path."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from soups.adapters import LoraModule, save_adapter

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, m in AutoModelForCausalLM.from_pretrained(str(model_dir)).named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            modules[name] = LoraModule(
                A=torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features),
                B=torch.randn(m.out_features, rank, generator=g) * b_scale,
                scaling=alpha / rank)
    base_config = {"base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}
    return str(save_adapter(path, modules, base_config))


def build_sharp_llama(out_dir) -> str:
    """Save a random tiny Llama (vocab 64, no tokenizer) whose output distributions are sharp
    (initializer_range 0.2), so that two LoRAs on it behave clearly differently: the base of
    the known-answer training tests (CAT weights, MoE routers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return str(out_dir)


def sample_sequences(model, n: int, seed: int, length: int = 32) -> list[tuple[list, list]]:
    """`n` sequences sampled (temperature 1, seeded) from `model`, each starting with token 1,
    as (ids, labels) training examples."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), 1)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return [(row.tolist(), row.tolist()) for row in ids]


TIERS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier marker (pyproject.toml `markers`): without one,
    `pytest -m unit` and `pytest -m integration` would both skip it silently."""
    wrong = []
    for item in items:
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier) is not None]
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: " + (" and ".join(tiers) if tiers else "no tier"))
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) need exactly one tier marker, unit or integration:\n"
            + "\n".join(wrong) + "\n"
            "Fix: mark the file with `pytestmark = pytest.mark.unit` (or "
            "`pytest.mark.integration`) at module level, or, where a file mixes tiers, mark "
            "each test or class with `@pytest.mark.unit` / `@pytest.mark.integration` and no "
            "module-level mark. unit: fast and pure (no Ray, MLflow server, DeepSpeed or "
            "training); integration: starts Ray, DeepSpeed or MLflow, or trains a model.")


# The suite's budget: `make test` within 25 minutes on the reference machine (2 cores). A run
# of the whole suite (plain `pytest`, no -m/-k) that overruns it by more than the margin
# fails, so the budget is enforced, not remembered; the margin absorbs machines up to that
# much slower. $SOUPS_SUITE_BUDGET_S sets another budget (a slower machine).
SUITE_BUDGET_S = 25 * 60
SUITE_MARGIN = 1.6
_SUITE_START = pytest.StashKey[float]()


def _whole_suite(config) -> bool:
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not config.option.markexpr and not config.option.keyword)


def pytest_sessionstart(session):
    session.config.stash[_SUITE_START] = time.monotonic()


def _suite_verdict(config) -> tuple[float, float] | None:
    """(seconds the whole suite took, its limit), or None for a partial run."""
    start = config.stash.get(_SUITE_START, None)
    if start is None or not _whole_suite(config):
        return None
    budget = float(os.environ.get("SOUPS_SUITE_BUDGET_S", SUITE_BUDGET_S))
    return time.monotonic() - start, budget * SUITE_MARGIN


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    verdict = _suite_verdict(config)
    if verdict is not None:
        took, limit = verdict
        terminalreporter.write_line(
            f"suite time {took:.0f} s; budget {limit / SUITE_MARGIN:.0f} s, failing above "
            f"{limit:.0f} s", red=took > limit)


def pytest_sessionfinish(session, exitstatus):
    verdict = _suite_verdict(session.config)
    if verdict is not None and verdict[0] > verdict[1] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # the slowest: --durations


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def raises_naming(error: type[BaseException], call, *named) -> str:
    """The message of the `error` that `call()` raises; it names each of `named`."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for value in named:
        assert str(value) in message, message
    return message


def assert_user_error(args, *named) -> str:
    """`soups ARGS` (the CLI app, in this process) on a bad input, as every command meets one:
    exit status 2, one `error: ...` line on stderr that names each of `named`, and no
    traceback. Returns that line."""
    from typer.testing import CliRunner

    from study.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped error
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for value in named:
        assert str(value) in lines[0], lines[0]
    return lines[0]


def run_soups(home, *args: str, timeout: int = 1500):
    """The `soups` command line in a subprocess with SOUPS_HOME=home (no stdin)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "SOUPS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each test's store is the one under its SOUPS_HOME
    return subprocess.run([sys.executable, "-m", "study.cli", *args],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def smoke_home(tmp_path_factory):
    """The SOUPS_HOME of the session's smoke study (tests may add studies beside it)."""
    return tmp_path_factory.mktemp("soups_home")


@pytest.fixture(scope="session")
def smoke_study(smoke_home):
    """`soups run --smoke` once per session (minutes): the study tests and the analysis
    tests read the same runs."""
    done = run_soups(smoke_home, "run", "--smoke")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
