"""The embedded base model: a tiny Llama pretrained briefly on generated text, cached on disk.

Built from `LlamaConfig` with a byte-level BPE tokenizer trained locally
(`soups.training.tokenizer`), pretrained on the general question -> answer corpus of
`soups.data.generated.pretrain` (never the skills or the target), then saved with `save_pretrained`:
the rest of the pipeline loads it with `AutoModelForCausalLM.from_pretrained(path)` exactly as a hub
model. The cache folder is keyed by every build setting and the seed, so a build is done once and is
deterministic.

The default build ships with the project (`soups/training/embedded_model/`, safetensors, its recipe
and seed in `soups_build.json`): a first run copies it into the cache instead of pretraining
for minutes. `build_base_model(..., rebuild=True)` (`soups prepare --rebuild`) pretrains it
from scratch; `compare_with_shipped` says whether the result is the shipped one.

`load_pretrained` loads any base model, this one or a user's (a `save_pretrained` folder or
a hub id), with a `ModelError` naming the folder when it is not one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from soups.data.datasets import DataSettings, generate_rows
from soups.data.generated import format_prompt
from soups.data.generated.pretrain import pretraining_example
from soups.errors import SoupsError
from soups.training.tokenizer import train_tokenizer

BUILD_VERSION = 3  # bump when the recipe changes so caches are rebuilt (and re-ship)
BUILD_FILE = "soups_build.json"
SHIPPED_DIR = Path(__file__).with_name("embedded_model")  # the default build, shipped


@dataclass(frozen=True)
class BaseModelSettings:
    # Sizes: a few million parameters, so a 2-core laptop pretrains it in minutes.
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 512
    vocab_size: int = 2560  # ~1,000 forced number tokens (with and without a leading space)
    max_number: int = 499  # every integer up to this is a single token
    # Pretraining: packed blocks of generated question -> answer text.
    steps: int = 1500
    batch_size: int = 16
    block_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    corpus_examples: int = 60000
    max_value: int = 20
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretraining_texts(settings: BaseModelSettings) -> list[str]:
    rng = random.Random(settings.seed)
    return [format_prompt(q) + a for q, a in
            (pretraining_example(rng, settings.max_value) for _ in range(settings.corpus_examples))]


def _tokenizer_texts(settings: BaseModelSettings, corpus: list[str]) -> list[str]:
    """A general tokenizer sees broad text, code included: the pretraining corpus plus skill
    training text (never the target task), as a real LLM's tokenizer would have."""
    skills = generate_rows(DataSettings(seed=settings.seed, sizes={
        "math": {"train": 500}, "code": {"train": 500}}))
    extra = [r["prompt"] + r["completion"] for task in skills.values()
             for r in task.get("train", [])]
    return corpus[:20000] + extra


def _packed_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` sequences and cut them into blocks (GPT-style packing:
    no padding is wasted on these short examples)."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)


class ModelError(SoupsError):
    """A base model that cannot be loaded; the message names the folder or hub id."""


def model_ref(model_dir: str | Path) -> str:
    """An absolute path for a local folder (workers run in other directories), else the hub
    id unchanged. A folder without config.json, or a path (`/...`, `./...`) that does not
    exist, is a ModelError."""
    path = Path(model_dir)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"base model {path}: no config.json (not a save_pretrained "
                             "folder)")
        return str(path.resolve())
    if str(model_dir).startswith((".", "/")):
        raise ModelError(f"base model {model_dir}: no such folder")
    return str(model_dir)


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(tokenizer, causal LM) of a base model folder or hub id (ModelError when neither)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers

    ref = model_ref(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except OSError as err:  # transformers' "not a local folder nor a model on the Hub"
        raise ModelError(f"base model {ref}: {err}") from None
    return tokenizer, AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shipped_build(settings: BaseModelSettings) -> Path | None:
    """The shipped build when it is the one `settings` asks for (same recipe, version and
    seed: the same key), else None."""
    record = SHIPPED_DIR / BUILD_FILE
    if not record.is_file():
        return None
    return SHIPPED_DIR if json.loads(record.read_text()).get("key") == settings.key() else None


def _install(source: Path, out: Path) -> Path:
    """Copy a built model folder to `out` atomically (a half-copied folder is never seen)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_base_model(
    cache_root: str | Path,
    settings: BaseModelSettings = BaseModelSettings(),
    log: Callable[[str], None] = print,
    rebuild: bool = False,
) -> Path:
    """Return the folder of the pretrained base model in the cache: the cached build; else
    the shipped one when it matches `settings`, copied in; else pretrained now. `rebuild`:
    pretrain now whatever is cached or shipped (replacing the cached folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: transformers

    out = Path(cache_root) / f"tiny-llama-{settings.key()}"
    if not rebuild:
        if (out / BUILD_FILE).is_file():
            return out
        shipped = shipped_build(settings)
        if shipped is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            log(f"base model: the shipped build ({shipped}), copied to {out}")
            return _install(shipped, out)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    corpus = pretraining_texts(settings)
    tokenizer = train_tokenizer(_tokenizer_texts(settings, corpus), settings.vocab_size,
                                settings.max_number)
    blocks = _packed_blocks(tokenizer, corpus, settings.block_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_heads,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = count_parameters(model)
    log(f"pretraining the embedded base model: {n_params / 1e6:.2f}M parameters, "
        f"{len(blocks)} blocks of {settings.block_size} tokens, {settings.steps} steps")
    loss = _pretrain(model, blocks, settings, log)
    seconds = time.perf_counter() - start
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / BUILD_FILE).write_text(json.dumps({
        "key": settings.key(), "build_version": BUILD_VERSION,
        "settings": asdict(settings), "parameters": n_params, "final_loss": loss,
        "build_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"base model saved to {out} ({seconds:.0f} s, final loss {loss:.3f})")
    return out


def compare_with_shipped(built: Path) -> str:
    """Whether a build's weights are the shipped build's: a sentence for the user."""
    from safetensors.torch import load_file  # lazy: safetensors.torch

    record = json.loads((built / BUILD_FILE).read_text())
    if not (SHIPPED_DIR / BUILD_FILE).is_file() or json.loads(
            (SHIPPED_DIR / BUILD_FILE).read_text()).get("key") != record.get("key"):
        return "no shipped build of these settings to compare with"
    ours, shipped = load_file(built / "model.safetensors"), load_file(
        SHIPPED_DIR / "model.safetensors")
    if ours.keys() != shipped.keys():
        return "differs from the shipped build: other tensors"
    worst = max(float((ours[k].float() - shipped[k].float()).abs().max()) for k in ours)
    if worst == 0.0:
        return "identical to the shipped build (every weight equal)"
    return (f"differs from the shipped build by at most {worst:.3g} per weight (another "
            "torch version, CPU or thread count sums in another order)")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _pretrain(model, blocks: torch.Tensor, settings: BaseModelSettings,
              log: Callable[[str], None]) -> float:
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.1)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    recent: list[float] = []
    report_every = max(1, settings.steps // 10)
    started = time.perf_counter()
    for step in range(settings.steps):
        rows = torch.randint(len(blocks), (settings.batch_size,), generator=generator)
        batch = blocks[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [float(loss.detach())])[-50:]
        if (step + 1) % report_every == 0 or step + 1 == settings.steps:
            mean = sum(recent) / len(recent)
            spent = time.perf_counter() - started
            left = spent / (step + 1) * (settings.steps - step - 1)
            log(f"  pretrain step {step + 1}/{settings.steps}  loss {mean:.3f}  "
                f"{spent:.0f} s, about {_duration(left)} left")
    model.eval()
    return sum(recent) / max(len(recent), 1)
