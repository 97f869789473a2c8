"""Model sources: built-in names, local folders, GGUF files, hub ids, the cache and its errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sparsedge import SparsedgeError, load, open_runtime, sources
from tiny import save_folder


def test_home_respects_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSEDGE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.home() == tmp_path / "xdg" / "sparsedge"
    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path / "own"))
    assert sources.home() == tmp_path / "own"


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path))
    with pytest.raises(SparsedgeError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load("no-such-model")
    with pytest.raises(SparsedgeError, match="unknown model"):
        sources.pull("no-such-model")


def test_missing_path():
    with pytest.raises(SparsedgeError, match="no such file or folder"):
        load("./does/not/exist")
    with pytest.raises(SparsedgeError, match="no such file or folder"):
        load("missing.gguf")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 definitely not a gguf")
    with pytest.raises(SparsedgeError, match="not a GGUF"):
        load(str(f))


def test_folder_without_config(tmp_path):
    with pytest.raises(SparsedgeError, match="no config.json"):
        load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(SparsedgeError, match="'gpt2' is not supported.*llama"):
        load(str(tmp_path))


def test_hub_id_unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SparsedgeError, match="could not be fetched from the hub"):
        load("some-org/some-model")


def test_local_folder_loads_and_runs(tmp_path, arch_name):
    """A local HF folder (what a hub download gives) loads into the torch runtime and matches HF."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_folder(arch_name, tmp_path / arch_name)
    m = load(str(folder))
    assert m.kind == "folder" and m.spec.arch == arch_name
    rt = open_runtime(m, "torch")
    ids = m.tokenizer("def f(x): return x")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    np.testing.assert_allclose(rt.forward(ids), ref.detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_pull_is_idempotent_and_refetches_a_corrupt_cache(real_model, tmp_path, monkeypatch):
    """Copy the real cache, corrupt the GGUF: pull detects it by hash and fetches it again."""
    b = sources.BUILTINS["smollm2-135m"]
    src = sources.home() / "models" / b.name
    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path))
    dst = tmp_path / "models" / b.name
    shutil.copytree(src, dst)
    gguf = dst / b.gguf_name
    with open(gguf, "r+b") as f:
        f.seek(1_000_000)
        f.write(b"\x00corrupt\x00")
    assert sources.sha256_file(gguf) != b.sha256
    hf = sources.pull(b.name, progress=False)
    assert sources.sha256_file(gguf) == b.sha256
    assert hf == dst / "hf" and (hf / "config.json").exists()
    mtime = (hf / "model.safetensors").stat().st_mtime
    sources.pull(b.name, progress=False)  # nothing to do the second time
    assert (hf / "model.safetensors").stat().st_mtime == mtime
    assert not list(dst.glob(".tmp-*"))


@pytest.mark.slow
def test_user_gguf_file_is_converted_once(real_model, tmp_path, monkeypatch):
    b = sources.BUILTINS["smollm2-135m"]
    gguf = sources.home() / "models" / b.name / b.gguf_name
    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path))
    m = load(str(gguf), progress=False)
    assert m.kind == "gguf" and m.spec == real_model.spec
    assert (tmp_path / "converted" / b.sha256[:16] / "hf" / "config.json").exists()


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_artifact_tokenizer_without_torch(tmp_path, arch_name):
    """An artifact's tokenizer loads without importing torch (the artifact runtimes never need
    it) where its class is plain tokenizer.json, and behaves as AutoTokenizer's in every case:
    ids, chat template, special ids, decoding."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from sparsedge.export.artifact import ExportConfig, export

    art = tmp_path / "art"
    export(load(str(save_folder(arch_name, tmp_path / "hf"))), art, ExportConfig(formats=("gguf",), gguf_quants=("f32",)),
           progress=False)
    ours, ref = sources.load_tokenizer(art), AutoTokenizer.from_pretrained(str(art))
    text = "def f(x):\n    return x + 1  # héllo"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.get_vocab() == ref.get_vocab() and ours.eos_token_id == ref.eos_token_id
    if ref.chat_template:
        msg = [{"role": "user", "content": "Hi"}]
        assert ours.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) == \
            ref.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    ids = ref(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    cls = json.loads((art / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if cls in sources.PLAIN_TOKENIZERS:
        code = ("import sys; from sparsedge import load, open_runtime; m = load(sys.argv[1]); "
                "rt = open_runtime(m, 'native', threads=1); rt.forward(m.tokenizer('ab')['input_ids']); "
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "False"
