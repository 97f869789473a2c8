"""The llama.cpp runtime against the torch reference: our own GGUF of the same weights, run in
llama.cpp, computes the same logits, and draft trees / keep / truncate follow the Runtime protocol."""

from __future__ import annotations

import numpy as np
import pytest

from needs import need

need("llama_cpp")

from sparsedge import SparsedgeError, load  # noqa: E402
from sparsedge.export.gguf import write_gguf  # noqa: E402
from sparsedge.runtimes import Runtime, tree_depths, tree_mask  # noqa: E402
from sparsedge.runtimes.decoding import GenerationConfig, generate  # noqa: E402
from sparsedge.runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from sparsedge.runtimes.torch_ref import TorchRuntime  # noqa: E402
from tiny import ARCHS, save_folder  # noqa: E402

TOL = 1e-3
# the branching tree of tests/runtimes/test_torch_ref.py: two children of the root, grandchildren
# under both, one deeper (leaves 4, 5, 7)
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 6]
# exact settings for comparing with the fp32 oracle: fp32 KV cache, no (f16) flash attention
EXACT = dict(n_ctx=256, threads=2, kv_type="f32", flash_attn=False)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(LlamaCppRuntime on our F32 GGUF, TorchRuntime) of one tiny random model."""
    d = tmp_path_factory.mktemp(request.param)
    loaded = load(str(save_folder(request.param, d / "hf")), progress=False)
    write_gguf(loaded, d / "model.gguf", progress=False)
    rt = LlamaCppRuntime(d / "model.gguf", **EXACT)
    yield rt, TorchRuntime.from_loaded(loaded)
    rt.close()


@pytest.fixture
def rts(pair):
    rt, ref = pair
    rt.reset()
    ref.reset()
    return rt, ref


def _fresh_last(rt, tokens) -> np.ndarray:
    """Logits of the last of ``tokens`` from an empty cache (one causal forward)."""
    rt.reset()
    out = rt.forward(np.asarray(tokens))[-1]
    rt.reset()
    return out


def _rand(rt, n, seed):
    return np.random.default_rng(seed).integers(0, rt.vocab_size, n)


def test_is_a_runtime(rts):
    rt, ref = rts
    assert isinstance(rt, Runtime) and rt.name == "llamacpp"
    assert rt.vocab_size == ref.vocab_size and rt.n_past == 0
    assert rt.meta("general.architecture") == ref.spec.arch
    assert rt.meta("sparsedge.version") and rt.meta("no.such.key") is None


def test_prefill_then_single_steps_match_torch(rts):
    rt, ref = rts
    toks = _rand(rt, 20, 1)  # 20 > Gemma's sliding window of 8: both attention kinds count
    got = [rt.forward(toks[:12])] + [rt.forward(toks[i : i + 1]) for i in range(12, 20)]
    want = [ref.forward(toks[:12])] + [ref.forward(toks[i : i + 1]) for i in range(12, 20)]
    assert got[0].shape == (12, rt.vocab_size) and got[0].dtype == np.float32
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=TOL, rtol=0)
    assert rt.n_past == 20


def test_tree_equals_each_branch_run_sequentially(rts):
    rt, ref = rts
    prefix, tree = _rand(rt, 12, 2), _rand(rt, len(PARENTS), 3)
    pos, mask = 12 + tree_depths(PARENTS), tree_mask(PARENTS)
    rt.forward(prefix)
    got = rt.forward(tree, pos, mask)
    assert got.shape == (8, rt.vocab_size) and rt.n_past == 20
    ref.forward(prefix)
    np.testing.assert_allclose(got, ref.forward(tree, pos, mask), atol=TOL, rtol=0)
    for i in range(len(PARENTS)):  # each node: its root-to-node path run alone, in llama.cpp
        path, j = [], i
        while j >= 0:
            path.insert(0, tree[j])
            j = PARENTS[j]
        np.testing.assert_allclose(got[i], _fresh_last(rt, np.concatenate([prefix, path])), atol=TOL, rtol=0)


@pytest.mark.parametrize("accepted", [[0, 1, 3, 6, 7], [0, 2, 5], [0, 1, 4], [0], []])
def test_keep_then_continue_equals_a_fresh_run(rts, accepted):
    rt, _ = rts
    prefix, tree, after = _rand(rt, 12, 4), _rand(rt, len(PARENTS), 5), _rand(rt, 3, 6)
    rt.forward(prefix)
    rt.forward(tree, 12 + tree_depths(PARENTS), tree_mask(PARENTS))
    rt.keep(accepted)
    assert rt.n_past == 12 + len(accepted)
    got = rt.forward(after)
    text = np.concatenate([prefix, tree[accepted], after]).astype(np.int64)
    rt.reset()
    np.testing.assert_allclose(got, rt.forward(text)[-3:], atol=TOL, rtol=0)


def test_keep_after_a_causal_forward_and_a_forest(rts):
    rt, ref = rts
    prefix, chain = _rand(rt, 10, 7), _rand(rt, 6, 8)
    rt.forward(prefix)
    rt.forward(chain)
    rt.keep([0, 1, 2])  # accept the first three of a linear draft
    nxt = _rand(rt, 2, 9)
    got = rt.forward(nxt)
    np.testing.assert_allclose(got[-1], _fresh_last(rt, np.concatenate([prefix, chain[:3], nxt])), atol=TOL, rtol=0)
    # two roots (two competing first tokens), each with a child
    parents = [-1, -1, 0, 1]
    forest = _rand(rt, 4, 10)
    rt.forward(prefix)
    got = rt.forward(forest, 10 + tree_depths(parents), tree_mask(parents))
    np.testing.assert_allclose(got[3], _fresh_last(rt, np.concatenate([prefix, forest[[1, 3]]])), atol=TOL, rtol=0)
    rt.forward(prefix)
    rt.forward(forest, 10 + tree_depths(parents), tree_mask(parents))
    rt.keep([1, 3])
    np.testing.assert_allclose(rt.forward(nxt)[-1], _fresh_last(rt, np.concatenate([prefix, forest[[1, 3]], nxt])),
                               atol=TOL, rtol=0)


def test_keep_accepts_only_a_chain_from_the_root(rts):
    rt, _ = rts
    rt.forward(_rand(rt, 5, 11))
    tree = _rand(rt, len(PARENTS), 12)
    rt.forward(tree, 5 + tree_depths(PARENTS), tree_mask(PARENTS))
    for bad in ([1, 3], [0, 3], [0, 2, 4], [2, 0]):
        with pytest.raises(SparsedgeError, match="chain from the tree's root"):
            rt.keep(bad)
    with pytest.raises(SparsedgeError, match="keep\\(\\) the accepted path"):
        rt.forward([1])  # the branches are still in the cache: keep one first
    rt.keep([0, 2])
    assert rt.n_past == 7


def test_truncate(rts):
    rt, _ = rts
    toks, other = _rand(rt, 20, 13), _rand(rt, 4, 14)
    rt.forward(toks)
    rt.truncate(12)
    assert rt.n_past == 12
    got = rt.forward(other)
    np.testing.assert_allclose(got[-1], _fresh_last(rt, np.concatenate([toks[:12], other])), atol=TOL, rtol=0)
    # truncating away a pending tree (to its start, or into its first chain) works too
    rt.forward(toks[:12])
    tree = _rand(rt, len(PARENTS), 15)
    rt.forward(tree, 12 + tree_depths(PARENTS), tree_mask(PARENTS))
    rt.truncate(10)
    np.testing.assert_allclose(rt.forward(other)[-1], _fresh_last(rt, np.concatenate([toks[:10], other])),
                               atol=TOL, rtol=0)
    rt.forward(toks[:12])
    rt.forward(tree, 12 + tree_depths(PARENTS), tree_mask(PARENTS))
    rt.truncate(14)  # the first two tree tokens, 0 -> 1, are a chain from the root
    np.testing.assert_allclose(rt.forward(other)[-1], _fresh_last(rt, np.concatenate([toks[:12], tree[:2], other])),
                               atol=TOL, rtol=0)
    with pytest.raises(SparsedgeError, match="cannot truncate to 99"):
        rt.truncate(99)


def test_greedy_generation_matches_torch(rts):
    rt, ref = rts
    prompt = _rand(rt, 9, 16)
    cfg = GenerationConfig(max_new_tokens=24)
    assert list(generate(rt, prompt, cfg)) == list(generate(ref, prompt, cfg))
    assert rt.n_past == 9 + 24 - 1  # the last token is yielded, not yet forwarded


def test_bad_arguments_are_clear_errors(rts, tmp_path):
    rt, _ = rts
    with pytest.raises(SparsedgeError, match="n_past \\+ depth"):
        rt.forward([1, 2], positions=[5, 6])
    not_tree = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=bool)  # node 2 sees two roots
    with pytest.raises(SparsedgeError, match="does not describe a tree"):
        rt.forward([1, 2, 3], positions=[0, 0, 1], tree_mask=not_tree)
    with pytest.raises(SparsedgeError, match="keep\\(\\) must follow"):
        rt.keep([0])
    assert rt.n_past == 0
    with pytest.raises(SparsedgeError, match="no such GGUF file"):
        LlamaCppRuntime(tmp_path / "missing.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(SparsedgeError, match="not a GGUF file"):
        LlamaCppRuntime(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(SparsedgeError, match="llama.cpp cannot load y.gguf"):
        LlamaCppRuntime(tmp_path / "y.gguf")


def test_context_overflow_and_close(pair):
    rt0, _ = pair
    small = LlamaCppRuntime(rt0.path, n_ctx=16, n_batch=8, threads=1)
    with pytest.raises(SparsedgeError, match="context overflow"):
        small.forward(np.arange(17) % small.vocab_size)
    small.forward(np.arange(12) % small.vocab_size)  # 12 > n_batch: decoded in two batches
    with pytest.raises(SparsedgeError, match="context overflow"):
        small.forward(np.arange(5))
    assert small.n_past == 12
    small.forward(np.arange(4))
    big_tree = [-1] + [0] * 8  # 9 tokens in one batch > n_batch 8
    small.truncate(0)
    with pytest.raises(SparsedgeError, match="exceeds n_batch"):
        small.forward(np.arange(9), tree_depths(big_tree), tree_mask(big_tree))
    small.close()
    small.close()  # idempotent
    with pytest.raises(SparsedgeError, match="closed"):
        small.forward([1])


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tmp_path, arch_name):
    """tokens, merges, token types and pre-tokenizer in the GGUF reproduce the HF tokenizer (for
    qwen2 the one transformers' Qwen2Tokenizer builds: Qwen2's split, llama.cpp's "qwen2")."""
    from pydoc_data.topics import topics

    from tiny import hf_model, tiny_tokenizer

    tok = tiny_tokenizer(400, arch=arch_name)  # a byte-level BPE with merges
    hf_model(arch_name, vocab=len(tok)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = load(str(tmp_path / "hf"), progress=False)
    tok = loaded.tokenizer  # what transformers makes of the folder for this model family
    write_gguf(loaded, tmp_path / "m.gguf", progress=False)
    text = topics[sorted(topics)[30]][:3000] + " 12345 x=3.14  caf\u00e9\n\n\tend"
    with LlamaCppRuntime(tmp_path / "m.gguf", n_ctx=64, threads=1) as rt:
        assert rt.tokenize(text).tolist() == tok(text, add_special_tokens=False)["input_ids"]
        # special tokens are split out when llama.cpp is asked to parse them (HF always does)
        special = "a  <eos> caf\u00e9<bos>"
        assert rt.tokenize(special, parse_special=True).tolist() == tok(special)["input_ids"]


def test_artifact_runs_in_llama_cpp(tmp_path):
    """An exported artifact opens by name in the runtime registry; q8_0 stays close to fp32."""
    from sparsedge import open_runtime
    from sparsedge.export.artifact import ExportConfig, export

    loaded = load(str(save_folder("llama", tmp_path / "hf")), progress=False)
    export(loaded, tmp_path / "art", ExportConfig(formats=("gguf",), gguf_quants=("q8_0",)), progress=False)
    toks = _rand(TorchRuntime.from_loaded(loaded), 16, 17)
    with open_runtime(str(tmp_path / "art"), "llamacpp", threads=2) as rt:
        got = rt.forward(toks)
    want = TorchRuntime.from_loaded(loaded).forward(toks)
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_a_model_that_came_as_a_gguf_runs_as_it_is(tmp_path):
    """`--runtime llamacpp` on a .gguf (or a built-in, its registry file) runs that very file; an HF
    folder or another type asks for an export."""
    from sparsedge import open_runtime

    folder = save_folder("qwen2", tmp_path / "hf")
    write_gguf(load(str(folder), progress=False), tmp_path / "own.gguf", quant="q8_0", progress=False)
    with LlamaCppRuntime(tmp_path / "own.gguf", threads=2) as direct:
        want = direct.forward(np.arange(5))
    with open_runtime(str(tmp_path / "own.gguf"), "llamacpp", threads=2) as rt:
        assert rt.path == tmp_path / "own.gguf"
        np.testing.assert_array_equal(rt.forward(np.arange(5)), want)
    with pytest.raises(SparsedgeError, match=r"runs as its own GGUF \(own.gguf, Q8_0\).*--gguf-quant q4_0"):
        open_runtime(str(tmp_path / "own.gguf"), "llamacpp", quant="q4_0")
    with pytest.raises(SparsedgeError, match="runs artifact folders; make one with 'sparsedge export"):
        open_runtime(str(folder), "llamacpp")


@pytest.mark.parametrize("arch_name", ARCHS)
def test_q8_0_gguf_runs_in_llama_cpp(arch_name, tmp_path):
    """Our Q8_0 file of every architecture loads in llama.cpp (qwen2: F32 q/k/v biases beside Q8_0
    weights) and stays close to the fp32 reference."""
    loaded = load(str(save_folder(arch_name, tmp_path / "hf")), progress=False)
    write_gguf(loaded, tmp_path / "m.q8_0.gguf", quant="q8_0", progress=False)
    ref = TorchRuntime.from_loaded(loaded)
    toks = _rand(ref, 16, 18)
    with LlamaCppRuntime(tmp_path / "m.q8_0.gguf", n_ctx=64, threads=2) as rt:
        assert rt.meta("general.architecture") == arch_name
        got = rt.forward(toks)
    want = ref.forward(toks)
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


# ----------------------------------------------------------------------------- crashes and the build


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_multi_token_forward_survives_in_a_child_process(tmp_path, quant):
    """The crash probe on our quantized GGUF: a 4-token batch and a step in a child process. A
    llama.cpp that dies on this host (AMX kernels on Sapphire Rapids: SIGSEGV on any batch of two
    or more tokens) fails this test with the signal and the last native log lines."""
    from sparsedge.export.artifact import ExportConfig, export
    from sparsedge.runtimes.llamacpp import probe

    loaded = load(str(save_folder("llama", tmp_path / "hf")), progress=False)
    export(loaded, tmp_path / "art", ExportConfig(formats=("gguf",), gguf_quants=(quant,)), progress=False)
    res = probe(next((tmp_path / "art").glob("*.gguf")), threads=2, use_cache=False)
    assert res.ok, f"llama.cpp {res.detail}"
    assert res.detail.startswith("llama.cpp system info: "), res.detail


def _crashing_child(monkeypatch, code: str):
    import sys

    from sparsedge.runtimes import llamacpp

    monkeypatch.setattr(llamacpp, "_probe_command", lambda path, threads: [sys.executable, "-c", code])
    return llamacpp


CRASH = ("import faulthandler, os, signal, sys; faulthandler.enable(); "
         "sys.stderr.write('load_tensors: AMX model buffer size = 12.0 MiB\\n'); sys.stderr.flush(); "
         "os.kill(os.getpid(), signal.SIGSEGV)")


def test_a_crashing_llama_cpp_is_a_clear_error(monkeypatch, tmp_path):
    """A child that dies on SIGSEGV: check_runs raises a SparsedgeError naming the signal, the last
    native line before the crash and the likely cause; a failure is not remembered."""
    lib = _crashing_child(monkeypatch, CRASH)
    loaded = load(str(save_folder("llama", tmp_path / "hf")), progress=False)
    write_gguf(loaded, tmp_path / "m.gguf", progress=False)
    with pytest.raises(SparsedgeError) as e:
        lib.check_runs(tmp_path / "m.gguf", threads=2)
    msg = str(e.value)
    assert "SIGSEGV (signal 11)" in msg and "AMX model buffer size" in msg and "make llamacpp" in msg, msg
    with pytest.raises(SparsedgeError, match="SIGSEGV"):  # not cached: probed again
        LlamaCppRuntime(tmp_path / "m.gguf", threads=2, probe=True)
    # an exit with a status is not a crash: no AMX hint, the status and its last line
    _crashing_child(monkeypatch, "import sys; sys.stderr.write('bad magic\\n'); sys.exit(3)")
    with pytest.raises(SparsedgeError, match="exited with status 3; last log lines: bad magic") as e:
        lib.check_runs(tmp_path / "m.gguf", threads=2)
    assert "make llamacpp" not in str(e.value)


def test_a_passing_probe_is_remembered(monkeypatch, tmp_path):
    from sparsedge.runtimes import llamacpp

    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path / "home"))
    loaded = load(str(save_folder("llama", tmp_path / "hf")), progress=False)
    write_gguf(loaded, tmp_path / "m.gguf", progress=False)
    first = llamacpp.probe(tmp_path / "m.gguf", threads=2)
    assert first.ok and not first.cached, first.detail
    _crashing_child(monkeypatch, CRASH)  # would crash now: the remembered pass answers
    again = llamacpp.probe(tmp_path / "m.gguf", threads=2)
    assert again.ok and again.cached
    (tmp_path / "m.gguf").touch()  # another file (mtime): probed again, and the crash shows
    assert not llamacpp.probe(tmp_path / "m.gguf", threads=2).ok


def test_the_installed_llama_cpp_is_a_portable_build():
    """llama-cpp-python as the project builds it (Makefile: GGML_NATIVE=OFF, the AVX2 baseline on
    x86-64): its CPU backend is compiled for no feature beyond AVX2 + FMA + F16C + BMI2, and never
    for AMX, so the same wheel runs on every x86-64 CPU with AVX2 (cached wheels included)."""
    import platform

    from sparsedge.runtimes.llamacpp import compiled_features, system_info

    info = system_info()
    feats = set(compiled_features(info))
    assert not {f for f in feats if f.startswith("AMX")}, info
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert {"AVX2", "FMA", "F16C"} <= feats, info
        beyond = {f for f in feats if f.startswith(("AVX512", "AVX_VNNI", "AMX"))}
        assert not beyond, f"llama.cpp was compiled for {sorted(beyond)}: not a portable build ({info})"
        _no_avx512_or_amx_instructions()


def _no_avx512_or_amx_instructions() -> None:
    """The CPU backend's machine code itself: no zmm register (AVX-512) and no AMX tile
    instruction anywhere in it, so no code path can reach the AMX kernels that crash (llama.cpp
    issue 20824) or fault on a CPU without AVX-512. Needs binutils' objdump (there with gcc)."""
    import importlib.util
    import shutil
    import subprocess
    from pathlib import Path

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    lib = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
    cpu = sorted(lib.glob("libggml-cpu*.so*"))
    assert cpu, f"no libggml-cpu in {lib}"
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(cpu[0])], capture_output=True, text=True,
                         check=True).stdout
    bad = [ln.strip() for ln in asm.splitlines() if "%zmm" in ln or any(
        op in ln for op in ("tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tileloadd", "ldtilecfg", "tdpbf16ps"))]
    assert not bad, f"{cpu[0].name} holds AVX-512 / AMX instructions, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_gguf(real_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "smollm2.f32.gguf"
    write_gguf(real_model, path, progress=False)
    return path


@pytest.mark.slow
def test_real_model_q4_0_batch_in_a_child_process(real_model, tmp_path):
    """The issue's reproduction on the real model: a Q4_0 GGUF, a multi-token batch (the batch that
    crashed in llama.cpp's AMX kernels), in a child process so that a crash fails only this test."""
    from sparsedge.runtimes.llamacpp import probe

    path = tmp_path / "smollm2.q4_0.gguf"
    write_gguf(real_model, path, quant="q4_0", progress=False)
    res = probe(path, threads=2, use_cache=False)
    assert res.ok, f"llama.cpp {res.detail}"


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "To install a Python package, you",
]


@pytest.mark.slow
def test_real_model_f32_matches_torch(real_model, real_runtime, real_gguf):
    from sparsedge import PplProtocol, perplexity

    tok = real_model.tokenizer
    cfg = GenerationConfig(max_new_tokens=32)
    with LlamaCppRuntime(real_gguf, n_ctx=4096, threads=2) as rt:
        same = 0
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            same += list(generate(rt, ids, cfg)) == list(generate(real_runtime, ids, cfg))
        assert same >= 4, f"greedy continuations identical on only {same} of {len(PROMPTS)} prompts"
        sample = "\n".join(PROMPTS) + " 3.14159, 2026-11-23; x += 1"
        assert rt.tokenize(sample).tolist() == tok(sample, add_special_tokens=False)["input_ids"]
        proto = PplProtocol(max_tokens=2048)
        ppl = perplexity(rt, tokenizer=tok, protocol=proto, progress=False).ppl
    ref = perplexity(real_runtime, tokenizer=tok, protocol=proto, progress=False).ppl
    assert abs(ppl / ref - 1) < 0.005, (ppl, ref)


@pytest.mark.slow
def test_real_gemma3_f32_matches_torch(tmp_path):
    """Gemma 3 270M (when pulled): llama.cpp's tokenizer and greedy text agree with ours."""
    from sparsedge.sources import is_pulled

    if not is_pulled("gemma3-270m"):
        pytest.skip("gemma3-270m is not pulled (sparsedge pull gemma3-270m)")
    loaded = load("gemma3-270m", progress=False)
    write_gguf(loaded, tmp_path / "gemma3.f32.gguf", progress=False)
    tok, ref = loaded.tokenizer, TorchRuntime.from_loaded(loaded)
    cfg = GenerationConfig(max_new_tokens=24)
    with LlamaCppRuntime(tmp_path / "gemma3.f32.gguf", n_ctx=2048, threads=2) as rt:
        sample = "\n".join(PROMPTS) + "  café 3.14159\tend"
        assert rt.tokenize(sample, add_special=True).tolist() == tok(sample)["input_ids"]
        same = sum(list(generate(rt, tok(p)["input_ids"], cfg)) == list(generate(ref, tok(p)["input_ids"], cfg))
                   for p in PROMPTS[:3])
    assert same >= 2
