"""The native C runtime against numpy (every kernel, SIMD and forced-scalar paths) and against the
torch reference (whole steps, tree masks, keep, recipes) on tiny random Llama and Qwen2 GGUFs written
here, and on the GGUFs sparsedge's own writer makes of every architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from sparsedge import arch  # noqa: E402
from sparsedge.errors import SparsedgeError  # noqa: E402
from sparsedge.runtimes.base import tree_depths, tree_mask  # noqa: E402

native = pytest.importorskip("sparsedge.runtimes.native")
try:
    native.level()
except SparsedgeError as e:  # the C library is not built
    pytest.skip(str(e), allow_module_level=True)

from sparsedge.runtimes.native import NativeRuntime, _lib  # noqa: E402
from sparsedge.runtimes.native.loader import to_col, to_r8, weight_from_raw  # noqa: E402

from tiny import arch_params, hf_model, save_folder  # noqa: E402

QT = gguf.GGMLQuantizationType
LEVELS = ["simd", "scalar"]


@pytest.fixture(params=LEVELS)
def level(request):
    """Run a test on the SIMD path (the best this CPU has) and on the forced scalar path."""
    got = native.set_level(0 if request.param == "scalar" else None)
    if request.param == "simd" and got == "scalar":
        pytest.skip("this CPU has no SIMD path")
    yield got
    native.set_level(None)


# ----------------------------------------------------------------------------- tiny GGUFs

GGUF_NAMES = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
}
# Qwen2's q/k/v biases: canonical name -> the GGUF tensor whose ".bias" they are
BIAS_NAMES = {"q_bias": "attn_q", "k_bias": "attn_k", "v_bias": "attn_v"}
# the architectures write_gguf below writes (Llama's layout; Qwen2 = Llama + q/k/v biases, NEOX rotary)
WRITER_ARCHS = ("llama", "qwen2")


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's interleaved rotary pairs (what llama.cpp's converter does)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def tiny_model(name: str = "llama", seed: int = 0):
    m = hf_model(name, seed)
    spec = arch.spec_from_hf(m.config)
    return spec, {c: t.float() for c, t in arch.canonical_weights(spec, m.state_dict()).items()}


def tiny_llama(seed: int = 0):
    return tiny_model("llama", seed)


def write_gguf(path, spec, w, qtype="F32", recipe=None) -> dict:
    """A llama or qwen2 GGUF (spec.arch) of canonical weights ``w``; returns the dequantized weights
    in torch's layout (what the file really holds), for a torch reference on the same numbers.
    Llama's q/k rows get llama.cpp's rotary permutation; Qwen2's stay in the HF layout (NEOX
    rotary) and its 1-D biases stay F32 (blk.N.attn_q.bias, ...)."""
    assert spec.arch in WRITER_ARCHS, spec.arch
    wr = gguf.GGUFWriter(str(path), spec.arch)
    wr.add_block_count(spec.n_layers)
    wr.add_context_length(512)
    wr.add_embedding_length(spec.hidden_size)
    wr.add_feed_forward_length(spec.intermediate_size)
    wr.add_head_count(spec.n_heads)
    wr.add_head_count_kv(spec.n_kv_heads)
    wr.add_layer_norm_rms_eps(spec.rms_eps)
    wr.add_rope_freq_base(spec.rope_theta)
    if recipe is not None:
        wr.add_string("sparsedge.recipe", json.dumps(recipe.to_dict()))
    held = {}
    for c, t in w.items():
        if c == "lm_head" and spec.tie_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        heads = spec.n_heads if c.endswith(".q") else spec.n_kv_heads if c.endswith(".k") else 0
        if spec.arch != "llama":
            heads = 0
        if heads:
            a = rope_permute(a, heads)
        name = {"embed": "token_embd", "norm": "output_norm", "lm_head": "output"}.get(c)
        member = c.split(".")[2] if c.startswith("layers.") else ""
        suffix = ".bias" if member in BIAS_NAMES else ".weight"
        name = name or f"blk.{c.split('.')[1]}.{BIAS_NAMES.get(member) or GGUF_NAMES[member]}"
        if a.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(a, QT[qtype])
            wr.add_tensor(name + suffix, data, raw_dtype=QT[qtype])
            deq = gguf.quants.dequantize(data, QT[qtype]).reshape(a.shape)
        else:
            wr.add_tensor(name + suffix, a)
            deq = a
        if heads:  # back to HF layout for the torch reference
            rows, cols = deq.shape
            deq = deq.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
        held[c] = torch.from_numpy(np.ascontiguousarray(deq))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    if spec.tie_embeddings:
        held["lm_head"] = held["embed"]
    return held


def torch_rt(spec, w):
    from sparsedge.runtimes.torch_ref import TorchRuntime

    return TorchRuntime(spec, w)


@pytest.fixture(scope="module", params=WRITER_ARCHS)
def tiny_f32(request, tmp_path_factory):
    """An F32 GGUF of tiny_model(arch) for each architecture write_gguf writes."""
    spec, w = tiny_model(request.param)
    p = tmp_path_factory.mktemp("native") / f"tiny-{request.param}-f32.gguf"
    held = write_gguf(p, spec, w)
    return p, spec, held


# ----------------------------------------------------------------------------- kernels vs numpy


def _c(a):
    return a.ctypes.data


def _quant_q8_ref(x):
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)
    return q.reshape(x.shape), d, (d * q.astype(np.int32).sum(1)).astype(np.float32)


def test_quant_q8_matches_numpy(level):
    rng = np.random.default_rng(1)
    for n in (32, 96, 576):
        x = (rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(np.float32)
        x[: n // 8] = 0  # an all-zero block quantizes to zeros with scale 0
        q, d, s = np.empty(n, np.int8), np.empty(n // 32, np.float32), np.empty(n // 32, np.float32)
        isum = np.empty(n // 32, np.int32)
        _lib.lib().se_quant_q8(_c(x), n, _c(q), _c(d), _c(s), _c(isum))
        rq, rd, rs = _quant_q8_ref(x)
        np.testing.assert_array_equal(q, rq)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_allclose(s, rs, rtol=1e-6)
        np.testing.assert_array_equal(isum, 8 * rq.reshape(-1, 32).astype(np.int32).sum(1))  # exact, x8 (Q4_0's offset)


def _weight(rng, rows, cols, gtype):
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    if gtype == "F32":
        return weight_from_raw("F32", a, rows, cols), a
    data = gguf.quants.quantize(a, QT[gtype])
    return weight_from_raw(gtype, data, rows, cols), gguf.quants.dequantize(data, QT[gtype]).reshape(rows, cols)


@pytest.mark.parametrize("gtype", ["F32", "Q8_0", "Q4_0"])
def test_row_matmul_matches_numpy(level, gtype):
    import ctypes

    rng = np.random.default_rng(2)
    for rows, cols, k in ((32, 64, 1), (70, 96, 3), (128, 576, 8), (5, 32, 16)):
        w, dense = _weight(rng, rows, cols, gtype)
        x = rng.standard_normal((k, cols)).astype(np.float32)
        y = np.empty((k, rows), np.float32)
        mask = rng.random((k, rows)) < 0.5
        for rowmask in (None, mask):
            m = w.mat()
            rm8 = None if rowmask is None else np.ascontiguousarray(rowmask, np.uint8)  # alive during the call
            rm = None if rm8 is None else _c(rm8)
            assert _lib.lib().se_matmul(ctypes.byref(m), k, _c(x), _c(y), rm, 2) == 0
            if gtype == "F32":
                ref = x @ dense.T
                tol = 1e-5 * np.sqrt(cols)
            else:  # activations are quantized per block of 32 (int8), as in llama.cpp's q8 dots
                xq = np.stack([_quant_q8_ref(r)[0].astype(np.float32).reshape(-1, 32) * _quant_q8_ref(r)[1][:, None]
                               for r in x]).reshape(k, cols)
                ref = xq @ dense.T
                tol = 1e-4 * np.abs(dense).max() * np.sqrt(cols)
            if rowmask is not None:
                ref = np.where(rowmask, ref, 0)
            np.testing.assert_allclose(y, ref, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("gtype", ["F32", "Q8_0", "Q4_0"])
def test_col_matmul_skips_zero_inputs_exactly(level, gtype):
    """Channel-major weights: every zero input channel skipped; equal to the dense product. Q8_0 /
    Q4_0 (integer kernels on quantized activations, as the dense kernels): bit-identical to the
    dense R8 kernel on the same input, every active count per block (1..32, padded passes of 4),
    row counts off the 32-row SIMD passes included."""
    import ctypes

    rng = np.random.default_rng(3)
    for rows, cols, k in ((32, 64, 1), (96, 64, 4), (48, 96, 2), (576, 1536, 3), (64, 32 * 33, 33)):
        w, dense = _weight(rng, rows, cols, gtype)
        wc = to_col(w)
        if gtype == "Q4_0":
            assert wc.type == ("Q4_0" if rows % 32 == 0 else "Q8_0")
        x = (rng.standard_normal((k, cols)) * rng.uniform(0.1, 10, (k, 1))).astype(np.float32)
        x[rng.random((k, cols)) < 0.6] = 0  # each token its own active set
        x[0, :32] = 0  # a whole inactive block
        if k == 33:  # token t keeps t of each block's channels: every active count 0..32
            x = (rng.standard_normal((k, cols)) * 4).astype(np.float32)
            for t in range(k):
                keep = np.zeros((cols // 32, 32), bool)
                keep[:, :t] = True
                x[t] *= rng.permuted(keep, axis=1).ravel()
        y = np.empty((k, rows), np.float32)
        m = wc.mat()
        assert _lib.lib().se_matmul(ctypes.byref(m), k, _c(x), _c(y), None, 2) == 0
        if gtype != "F32":
            ref = _xq_ref(x).astype(np.float64) @ dense.T.astype(np.float64)
            tol = 1e-5 * np.abs(dense).max() * np.abs(x).max() * np.sqrt(cols)
            np.testing.assert_allclose(y, ref, atol=tol, rtol=1e-5)
            yr = np.empty((k, rows), np.float32)
            wr = to_r8(w)  # alive during the call: mat() holds raw pointers into its arrays
            mr = wr.mat()
            assert _lib.lib().se_matmul(ctypes.byref(mr), k, _c(x), _c(yr), None, 2) == 0
            np.testing.assert_array_equal(y, yr)
        else:
            ref = x.astype(np.float64) @ dense.T.astype(np.float64)
            np.testing.assert_allclose(y, ref, atol=2e-5 * np.abs(dense).max() * np.abs(x).max() * np.sqrt(cols),
                                       rtol=1e-5)


def _xq_ref(x):
    """Activations as the quantized kernels see them: int8 per block of 32 times the block scale."""
    return np.stack([(_quant_q8_ref(r)[0].astype(np.float32).reshape(-1, 32) * _quant_q8_ref(r)[1][:, None]).ravel()
                     for r in x])


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0"])
def test_r8_matmul_matches_numpy(level, gtype):
    """The k-token kernel on 8-row interleaved tiles: every k (tiles of 4 tokens plus 1..3 left
    over), random shapes; equal to numpy on the dequantized weights and quantized activations,
    and to the row-major kernel."""
    import ctypes

    rng = np.random.default_rng(6)
    shapes = [(8, 32, 1), (16, 64, 2), (72, 96, 3), (40, 576, 4), (128, 160, 5), (24, 1536, 7), (64, 576, 8),
              (8, 32, 13), (48, 192, 16), (16, 64, 17)]
    for rows, cols, k in shapes:
        w, dense = _weight(rng, rows, cols, gtype)
        wr = to_r8(w)
        assert wr.layout == _lib.R8 and wr.nbytes == w.nbytes
        x = (rng.standard_normal((k, cols)) * rng.uniform(0.1, 10, (k, 1))).astype(np.float32)
        x[0, :32] = 0  # an all-zero block (scale 0)
        y, yrow = np.empty((k, rows), np.float32), np.empty((k, rows), np.float32)
        m, mrow = wr.mat(), w.mat()
        assert _lib.lib().se_matmul(ctypes.byref(m), k, _c(x), _c(y), None, 2) == 0
        assert _lib.lib().se_matmul(ctypes.byref(mrow), k, _c(x), _c(yrow), None, 2) == 0
        ref = _xq_ref(x).astype(np.float64) @ dense.T.astype(np.float64)
        tol = 1e-5 * np.abs(dense).max() * np.abs(x).max() * np.sqrt(cols)
        np.testing.assert_allclose(y, ref, atol=tol, rtol=1e-5)
        np.testing.assert_allclose(y, yrow, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0"])
def test_r8_layout_is_lossless(gtype):
    """Every row read back from the interleaved tiles (the tied embedding's lookup) equals the file's."""
    import ctypes

    rng = np.random.default_rng(7)
    w, dense = _weight(rng, 24, 96, gtype)
    wr = to_r8(w)
    m = wr.mat()
    row = np.empty(96, np.float32)
    for r in range(24):
        _lib.lib().se_dequant_row(ctypes.byref(m), r, _c(row))
        np.testing.assert_array_equal(row, dense[r])
    with pytest.raises(AssertionError):
        to_r8(_weight(rng, 12, 64, gtype)[0])  # rows not a multiple of 8: stays row-major


def test_attention_kernel_matches_numpy(level):
    """Scores (4 entries per SIMD pass and the tail), masked entries, vectorized exp, weighted V sum
    (32-wide register path and the narrow one), against numpy."""
    lib = _lib.lib()
    rng = np.random.default_rng(8)
    for n, hd in ((1, 16), (3, 64), (9, 16), (37, 64), (70, 32), (130, 256), (5, 24), (64, 64)):
        q = rng.standard_normal(hd).astype(np.float32)
        K = rng.standard_normal((n, hd)).astype(np.float32)
        V = rng.standard_normal((n, hd)).astype(np.float32)
        vis = (rng.random(n) < 0.7).astype(np.uint8)
        vis[-1] = 1
        scale = np.float32(hd ** -0.5 * 3)  # wide score range: exp far from 1
        out, scratch = np.empty(hd, np.float32), np.empty(n, np.float32)
        lib.se_attend(_c(q), _c(K), _c(V), _c(vis), n, hd, scale, _c(scratch), _c(out))
        sc = (K.astype(np.float64) @ q) * scale
        sc[vis == 0] = -np.inf
        p = np.exp(sc - sc.max())
        ref = (p / p.sum()) @ V
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_attention_kernel_depends_only_on_visible_entries(level):
    """A query's attention over entries under a visibility mask equals, bit for bit, its attention
    over just the visible entries stored contiguously: masked entries are skipped (not added as
    exp(-inf) = 0 in some SIMD lane), and an entry's score does not depend on whether it falls in a
    4-entry pass or the tail. What makes a draft-tree row equal its path run one token at a time."""
    lib = _lib.lib()
    rng = np.random.default_rng(11)
    for n, hd in ((1, 16), (9, 16), (37, 64), (70, 32), (130, 64), (5, 24), (21, 32)):
        q = rng.standard_normal(hd).astype(np.float32)
        K = rng.standard_normal((n, hd)).astype(np.float32)
        V = rng.standard_normal((n, hd)).astype(np.float32)
        scale = np.float32(hd ** -0.5 * 3)
        for frac in (0.3, 0.7, 1.0):
            vis = (rng.random(n) < frac).astype(np.uint8)
            vis[-1] = 1
            out, scratch = np.empty(hd, np.float32), np.empty(n, np.float32)
            assert lib.se_attend(_c(q), _c(K), _c(V), _c(vis), n, hd, scale, _c(scratch), _c(out)) == 0
            sel = vis.astype(bool)
            Kv, Vv = np.ascontiguousarray(K[sel]), np.ascontiguousarray(V[sel])
            nv = int(sel.sum())
            ones = np.ones(nv, np.uint8)
            want, scratch2 = np.empty(hd, np.float32), np.empty(nv, np.float32)
            assert lib.se_attend(_c(q), _c(Kv), _c(Vv), _c(ones), nv, hd, scale, _c(scratch2), _c(want)) == 0
            np.testing.assert_array_equal(out, want)
            # the same entries behind more (invisible) ones: unchanged
            K2, V2 = np.concatenate([K, K[:3] * 5]), np.concatenate([V, V[:3]])
            vis2 = np.concatenate([vis, np.zeros(3, np.uint8)])
            out2, scratch3 = np.empty(hd, np.float32), np.empty(n + 3, np.float32)
            assert lib.se_attend(_c(q), _c(K2), _c(V2), _c(vis2), n + 3, hd, scale, _c(scratch3), _c(out2)) == 0
            np.testing.assert_array_equal(out2, want)


@pytest.mark.parametrize("gtype,layout", [(g, lay) for g in ("F32", "Q8_0", "Q4_0") for lay in ("row", "r8", "col")
                                          if not (g == "F32" and lay == "r8")])  # R8 holds quantized weights only
def test_matmul_rows_do_not_depend_on_k(level, gtype, layout):
    """Row t of a k-token product equals, bit for bit, the 1-token product of token t, for every k
    (4-token passes plus 1..3 left over) and every layout; column counts with every tail of the
    F32 kernel (16-value steps, one 8-value step, scalar rest)."""
    import ctypes

    rng = np.random.default_rng(12)
    cols_list = (32, 64, 96, 576) if gtype != "F32" else (24, 40, 100, 128, 576)
    for cols in cols_list:
        rows = 48
        w, _ = _weight(rng, rows, cols, gtype)
        w = {"row": w, "r8": to_r8(w) if layout == "r8" else w, "col": to_col(w)}[layout]
        m = w.mat()
        x = (rng.standard_normal((17, cols)) * rng.uniform(0.1, 10, (17, 1))).astype(np.float32)
        if layout == "col":
            x[rng.random(x.shape) < 0.5] = 0
        one = np.empty((17, rows), np.float32)
        for t in range(17):
            xt = np.ascontiguousarray(x[t:t + 1])
            assert _lib.lib().se_matmul(ctypes.byref(m), 1, _c(xt), _c(one[t:t + 1]), None, 2) == 0
        for k in range(1, 18):
            xk = np.ascontiguousarray(x[:k])
            y = np.empty((k, rows), np.float32)
            assert _lib.lib().se_matmul(ctypes.byref(m), k, _c(xk), _c(y), None, 2) == 0
            np.testing.assert_array_equal(y, one[:k], err_msg=f"cols={cols} k={k}")


def test_col_layout_is_lossless():
    rng = np.random.default_rng(4)
    for gtype in ("F32", "Q8_0", "Q4_0"):
        w, dense = _weight(rng, 64, 96, gtype)
        c = to_col(w)
        assert c.layout == _lib.COL and c.q.shape[0] == 96


def test_small_ops_match_numpy(level):
    lib = _lib.lib()
    rng = np.random.default_rng(5)
    k, n = 3, 96
    x = rng.standard_normal((k, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    y = np.empty_like(x)
    lib.se_rmsnorm(_c(y), _c(x), _c(w), k, n, 1e-5)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)

    nh, hd = 3, 16
    pos = np.array([0, 5, 77], np.int32)
    base = rng.standard_normal((k, nh, hd)).astype(np.float32)
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = (pos[:, None] / 2.0) * inv[None]  # linear factor 2
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    for neox in (0, 1):
        v = base.copy()
        lib.se_rope(_c(v), k, nh, hd, _c(pos), 10000.0, 2.0, neox)
        if neox:
            a, b = base[..., : hd // 2], base[..., hd // 2:]
            ref = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
        else:
            a, b = base[..., 0::2], base[..., 1::2]
            ref = np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(base.shape)
        np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-5)

    z = (rng.standard_normal(200) * 4).astype(np.float32)
    for act, fn in ((0, lambda t: t / (1 + np.exp(-t))),
                    (1, lambda t: 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3))))):
        v = z.copy()
        lib.se_act(_c(v), v.size, act)
        np.testing.assert_allclose(v, fn(z.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_env_var_forces_scalar():
    code = "from sparsedge.runtimes import native; print(native.level())"
    env = dict(os.environ, SPARSEDGE_NATIVE_SCALAR="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


# ----------------------------------------------------------------------------- whole steps vs torch


def test_f32_plain_steps_match_torch(tiny_f32, level):
    p, spec, held = tiny_f32
    ref, rt = torch_rt(spec, held), NativeRuntime(p, threads=2)
    assert rt.name == "native" and rt.vocab_size == spec.vocab_size
    prompt = [5, 17, 99, 3, 200, 41, 7]
    np.testing.assert_allclose(rt.forward(prompt), ref.forward(prompt), atol=1e-3)
    for t in (11, 250, 0):  # one token at a time
        np.testing.assert_allclose(rt.forward([t]), ref.forward([t]), atol=1e-3)
    assert rt.n_past == ref.n_past == len(prompt) + 3


def _tree():
    parents = [-1, 0, 0, 1, 1, 2, 3, 5]  # 8 nodes
    return parents, tree_mask(parents), tree_depths(parents)


@pytest.mark.parametrize("threads", [1, 2])
def test_f32_tree_step_matches_torch_and_sequential(tiny_f32, threads):
    p, spec, held = tiny_f32
    parents, mask, depth = _tree()
    toks = [9, 33, 71, 120, 4, 18, 230, 66]
    prompt = [1, 50, 60, 70]
    ref, rt = torch_rt(spec, held), NativeRuntime(p, threads=threads)
    ref.forward(prompt), rt.forward(prompt)
    pos = rt.n_past + depth
    got = rt.forward(toks, pos, mask)
    np.testing.assert_allclose(got, ref.forward(toks, pos, mask), atol=1e-3)
    # every node equals the sequential run of its root-to-node path
    seq = NativeRuntime(p, threads=threads)
    for i in range(len(toks)):
        path = []
        j = i
        while j >= 0:
            path.append(j)
            j = parents[j]
        path = path[::-1]
        seq.reset()
        seq.forward(prompt)
        out = seq.forward([toks[j] for j in path])
        np.testing.assert_allclose(got[i], out[-1], atol=1e-4)


def test_keep_then_continue_equals_fresh_run(tiny_f32):
    p, spec, held = tiny_f32
    parents, mask, depth = _tree()
    toks = [9, 33, 71, 120, 4, 18, 230, 66]
    prompt = [1, 50, 60, 70]
    rt = NativeRuntime(p, threads=2)
    rt.forward(prompt)
    rt.forward(toks, rt.n_past + depth, mask)
    path = [0, 2, 5, 7]
    rt.keep(path)
    assert rt.n_past == len(prompt) + len(path)
    a = rt.forward([42, 43])
    fresh = NativeRuntime(p, threads=2)
    b = fresh.forward(prompt + [toks[j] for j in path] + [42, 43])[-2:]
    np.testing.assert_allclose(a, b, atol=1e-4)
    rt.truncate(len(prompt))
    np.testing.assert_allclose(rt.forward([7]), NativeRuntime(p, threads=2).forward(prompt + [7])[-1:], atol=1e-4)
    with pytest.raises(SparsedgeError):
        rt.keep([5])
    with pytest.raises(SparsedgeError):
        rt.truncate(rt.n_past + 1)


def test_cache_grows_past_initial_capacity(tiny_f32):
    p, spec, held = tiny_f32
    ref, rt = torch_rt(spec, held), NativeRuntime(p, threads=2, n_ctx=16)
    toks = list(np.random.default_rng(0).integers(0, spec.vocab_size, 40))
    np.testing.assert_allclose(rt.forward(toks[:20]), ref.forward(toks[:20]), atol=1e-3)
    np.testing.assert_allclose(rt.forward(toks[20:]), ref.forward(toks[20:]), atol=1e-3)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("name", WRITER_ARCHS)
def test_quantized_steps_close_to_torch_on_the_same_weights(tmp_path, level, name, qtype):
    """Weights exactly as stored; the remaining error is the int8 activation quantization."""
    spec, w = tiny_model(name)
    p = tmp_path / f"tiny-{qtype}.gguf"
    held = write_gguf(p, spec, w, qtype)
    ref, rt = torch_rt(spec, held), NativeRuntime(p, threads=2)
    toks = [5, 17, 99, 3, 200, 41, 7, 8]
    a, b = rt.forward(toks), ref.forward(toks)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75
    parents, mask, depth = _tree()
    a, b = rt.forward(toks, rt.n_past + depth, mask), ref.forward(toks, ref.n_past + depth, mask)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("name", WRITER_ARCHS)
def test_r8_and_row_layouts_give_the_same_steps(tmp_path, level, name, qtype):
    """The same file run with interleaved (R8) and row-major weights: same integer sums, so the
    logits agree to float rounding, for a prompt and for an 8-node tree step."""
    spec, w = tiny_model(name, 1)
    p = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(p, spec, w, qtype)
    a, b = NativeRuntime(p, threads=2, r8=True), NativeRuntime(p, threads=2, r8=False)
    assert a.model.weights["layers.0.gate"].layout == _lib.R8 and a.model.weights["embed"].layout == _lib.R8
    assert b.model.weights["layers.0.gate"].layout == _lib.ROW
    toks = [5, 17, 99, 3, 200, 41, 7, 8, 250]
    np.testing.assert_allclose(a.forward(toks), b.forward(toks), atol=1e-4, rtol=1e-4)
    parents, mask, depth = _tree()
    np.testing.assert_allclose(a.forward(toks[:8], a.n_past + depth, mask), b.forward(toks[:8], b.n_past + depth, mask),
                               atol=1e-4, rtol=1e-4)


def _has_vnni() -> bool:
    got = native.set_level(None)
    return got.endswith("avx512vnni")


@pytest.mark.skipif(not _has_vnni(), reason="this CPU has no AVX512-VNNI")
@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0"])
def test_vnni_products_are_bit_identical_to_avx2(tmp_path, gtype):
    """The VNNI k-token products against the AVX2 ones: the same integer sums and the same float
    operations per block, so equal bit for bit for every k (4-token passes and 1..3 left over),
    every shape, extreme int8 inputs included; and whole forwards (a prompt, an 8-node tree)."""
    import ctypes

    rng = np.random.default_rng(31)
    try:
        for rows, cols in ((8, 32), (48, 576), (24, 1536), (64, 160)):
            w, _ = _weight(rng, rows, cols, gtype)
            wr = to_r8(w)  # kept alive: the mat points into its buffers
            m = wr.mat()
            x = (rng.standard_normal((17, cols)) * rng.uniform(0.1, 10, (17, 1))).astype(np.float32)
            x[1, :32] = 0  # an all-zero block
            x[2, ::2], x[2, 1::2] = 1e3, -1e3  # every int8 at +-127
            for k in range(1, 18):
                xk, ys = np.ascontiguousarray(x[:k]), []
                for lvl in (1, 3):
                    native.set_level(lvl)
                    y = np.empty((k, rows), np.float32)
                    assert _lib.lib().se_matmul(ctypes.byref(m), k, _c(xk), _c(y), None, 2) == 0
                    ys.append(y)
                np.testing.assert_array_equal(ys[0], ys[1], err_msg=f"{rows}x{cols} k={k}")
        spec, wts = tiny_llama(1)
        p = tmp_path / f"tiny-{gtype}.gguf"
        write_gguf(p, spec, wts, gtype)
        toks = [5, 17, 99, 3, 200, 41, 7, 8, 250]
        parents, mask, depth = _tree()
        outs = []
        for lvl in (1, 3):
            assert native.set_level(lvl) == ("avx2+fma" if lvl == 1 else "avx2+fma+avx512vnni")
            rt = NativeRuntime(p, threads=2)
            outs.append((rt.forward(toks), rt.forward(toks[:8], rt.n_past + depth, mask)))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
    finally:
        native.set_level(None)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_adaptive_barrier_gives_openmps_results(tmp_path, threads):
    """The forward's own barrier (spin window, futex sleep) against OpenMP's, with more threads
    than cores too (every wait then sleeps or is preempted): bit-identical logits, forward after
    forward, for prompts, single tokens and a tree step; an unknown mode is an error."""
    spec, w = tiny_llama(2)
    p = tmp_path / "tiny.gguf"
    write_gguf(p, spec, w, "Q4_0")
    toks = [5, 17, 99, 3, 200, 41, 7, 8, 250]
    parents, mask, depth = _tree()
    outs = {}
    try:
        for mode in ("openmp", "adaptive"):
            _lib.wait_mode(mode)
            rt = NativeRuntime(p, threads=threads)
            got = [rt.forward(toks)]
            for t in range(40):
                got.append(rt.forward([t % 250 + 1]))
            got.append(rt.forward(toks[:8], rt.n_past + depth, mask))
            outs[mode] = got
        for a, b in zip(outs["openmp"], outs["adaptive"]):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(SparsedgeError, match="wait mode"):
            _lib.wait_mode("busy")
    finally:
        _lib.wait_mode("adaptive")
    # the suite runs with OMP_WAIT_POLICY=PASSIVE (conftest), under which the adaptive barrier
    # sleeps at once: its spinning path runs in a process without it
    code = (f"import numpy as np; from sparsedge.runtimes.native import _lib; "
            f"from sparsedge.runtimes.native.runtime import NativeRuntime\n"
            f"out = []\n"
            f"for m in ('openmp', 'adaptive'):\n"
            f"    _lib.wait_mode(m); rt = NativeRuntime({str(p)!r}, threads={threads})\n"
            f"    out.append(np.stack([rt.forward({toks})[-1]] + [rt.forward([t + 1])[0] for t in range(60)]))\n"
            f"assert (out[0] == out[1]).all(); print('same')")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "same", r.stderr[-2000:]


def test_loader_picks_r8_where_the_cpu_has_its_kernels(tmp_path):
    spec, w = tiny_llama()
    p = tmp_path / "q4.gguf"
    write_gguf(p, spec, w, "Q4_0")
    rt = NativeRuntime(p, threads=1)
    want = _lib.R8 if _lib.prefers_r8() else _lib.ROW
    assert all(rt.model.weights[f"layers.{i}.{c}"].layout == want for i in range(spec.n_layers)
               for c in ("q", "k", "v", "o", "gate", "up", "down"))


# ----------------------------------------------------------------------------- recipes


def _recipe(spec, held, method, sites, per_channel=(), q=0.5):
    """Thresholds at the q-quantile of |x| per layer and site, measured on the torch reference."""
    from sparsedge.sparsify.recipe import Calibration, SiteThresholds, SparsityRecipe, model_fingerprint

    ref = torch_rt(spec, held)
    seen: dict[tuple[str, int], list] = {}

    def capture(site):
        def hook(layer, x):
            seen.setdefault((site, layer), []).append(x.abs().reshape(-1, x.shape[-1]).clone())
            return x
        return hook

    for s in sites:
        ref.model.hooks[s] = capture(s)
    ref.forward(list(np.random.default_rng(7).integers(0, spec.vocab_size, 48)))
    out = {}
    for s in sites:
        ts = []
        for i in range(spec.n_layers):
            a = torch.cat(seen[(s, i)]).numpy()
            ts.append(np.quantile(a, q, axis=0).tolist() if s in per_channel else float(np.quantile(a, q)))
        out[s] = SiteThresholds("|x|", ts)
    return SparsityRecipe(method=method, target_sparsity=q, model=model_fingerprint(spec), sites=out,
                          calibration=Calibration("test", 48, "0"), tensors=[])


RECIPES = {
    "cats": (["gate_act"], ()),
    "teal": (["qkv_in", "o_in", "ffn_in", "down_in"], ()),
    "chess": (["gate_act", "q_in", "o_in"], ("gate_act",)),
    "wina": (["down_in"], ("down_in",)),
}


@pytest.mark.parametrize("skip", ["always", "never"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_recipe_logits_equal_torch_with_recipe(tmp_path, tiny_f32, method, skip):
    """Both ways of running a recipe compute its function: skipping the inactive work, or the dense
    kernels on the thresholded inputs."""
    from sparsedge.sparsify.apply import apply

    _, spec, held = tiny_f32
    sites, per_channel = RECIPES[method]
    recipe = _recipe(spec, held, "teal" if method == "wina" else method, sites, per_channel)
    p = tmp_path / "sparse.gguf"
    write_gguf(p, spec, {k: v.clone() for k, v in held.items()}, recipe=recipe)
    ref = torch_rt(spec, held)
    state = apply(ref, recipe, weights_permuted=True)
    rt = NativeRuntime(p, threads=2, stats=True, skip=skip)  # the recipe comes from the file's metadata
    assert rt.recipe is not None and set(rt.recipe.sites) == set(sites)
    assert (rt.model.weights["layers.0.down"].layout == _lib.COL) == (skip == "always")
    prompt = [5, 17, 99, 3, 200, 41, 7]
    np.testing.assert_allclose(rt.forward(prompt), ref.forward(prompt), atol=1e-3)
    parents, mask, depth = _tree()
    toks = [9, 33, 71, 120, 4, 18, 230, 66]
    np.testing.assert_allclose(rt.forward(toks, rt.n_past + depth, mask),
                               ref.forward(toks, ref.n_past + depth, mask), atol=1e-3)
    got, want = rt.achieved_sparsity(), state.achieved()
    for s in sites:
        assert abs(got[s] - want[s]) < 0.01, (s, got[s], want[s])
        assert 0.2 < got[s] < 0.8
    dense = NativeRuntime(p, threads=2, recipe=False)
    assert dense.recipe is None
    assert not np.allclose(dense.forward(prompt), NativeRuntime(p, threads=2).forward(prompt), atol=1e-3)


def _int8_inputs(ref) -> None:
    """Make the torch reference see every linear input as the quantized kernels do: after each
    site's threshold, int8 per block of 32 times the block scale (_quant_q8_ref), so that a recipe's
    threshold decisions downstream meet the same activations on both sides."""
    import torch

    def fake(x):
        a = x.float().numpy()
        return torch.from_numpy(_xq_ref(a.reshape(-1, a.shape[-1])).reshape(a.shape)).to(x.dtype)

    hooks = ref.model.hooks
    for site in ("qkv_in", "o_in", "ffn_in", "down_in"):
        h = hooks.get(site)
        hooks[site] = (lambda layer, x, h=h: fake(x if h is None else h(layer, x)))


@pytest.mark.parametrize("skip", ["always", "never"])
@pytest.mark.parametrize("method", ["teal", "cats"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_recipe_close_to_torch(tmp_path, tiny_f32, qtype, method, skip):
    """teal: channel-major weights at every site; cats: an R8 gate (where the CPU prefers it) feeding
    a row-major up that skips each token's zeroed rows. For teal the reference quantizes every
    linear input the way the quantized kernels do (int8 per block of 32; the channel-major kernels
    included): small activation differences flip threshold decisions at every site, which a float
    reference turns into O(threshold) logit differences on a tiny random model (measured: 8% of the
    largest logit against the float reference, 0.3% against this one)."""
    from sparsedge.sparsify.apply import apply

    spec, w = tiny_model(tiny_f32[1].arch)
    p = tmp_path / "q.gguf"
    held = write_gguf(p, spec, w, qtype)
    sites, per_channel = RECIPES[method]
    recipe = _recipe(spec, held, method, sites, per_channel)
    ref = torch_rt(spec, held)
    apply(ref, recipe, weights_permuted=True)
    if method == "teal":
        _int8_inputs(ref)
    rt = NativeRuntime(p, threads=2, recipe=recipe, skip=skip)
    if method == "cats" and skip == "always":
        assert rt.model.weights["layers.0.up"].layout == _lib.ROW
    toks = [5, 17, 99, 3, 200, 41, 7, 8]
    a, b = rt.forward(toks), ref.forward(toks)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()
    parents, mask, depth = _tree()
    a, b = rt.forward(toks, rt.n_past + depth, mask), ref.forward(toks, ref.n_past + depth, mask)
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()


# ----------------------------------------------------------------------------- exact k-token steps
# Speculative decoding reproduces greedy decoding only if every row of a k-token step (a chain, or
# a draft tree under its mask) is bit-identical to forwarding that row's path one token at a time.


def wide_model(name: str = "llama", seed: int = 0):
    """A tiny model wide enough for every kernel shape the exactness tests need: every weight has
    rows a multiple of 8 (R8 groups) and several 32-value blocks per row (hidden 128 = 4 blocks,
    ffn 256 = 8), tied embedding (the LM head runs R8 too). Llama: head_dim 32 (the 4-entry score
    passes and the 32-wide V sum); Qwen2: head_dim 64 (Qwen2.5-0.5B's, two 32-wide V passes) and
    its q/k/v biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1)
    if name == "llama":
        m = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         rope_theta=10000.0, **common)).eval()
    else:
        m = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                                         rope_theta=1000000.0, use_sliding_window=False, **common)).eval()
    with torch.no_grad():
        for _, prm in m.named_parameters():
            if prm.ndim == 1:
                prm.add_(0.1 * torch.randn_like(prm))
    spec = arch.spec_from_hf(m.config)
    return spec, {c: t.float() for c, t in arch.canonical_weights(spec, m.state_dict()).items()}


@pytest.fixture(scope="module", params=WRITER_ARCHS)
def wide_models(request, tmp_path_factory):
    """F32, Q8_0 and Q4_0 files of wide_model, and per file the recipes the exactness tests load."""
    spec, w = wide_model(request.param)
    d = tmp_path_factory.mktemp("exact")
    out = {}
    for qtype in ("F32", "Q8_0", "Q4_0"):
        p = d / f"wide-{qtype}.gguf"
        held = write_gguf(p, spec, {k: v.clone() for k, v in w.items()}, qtype)
        recipes = {None: False}
        for method in ("teal", "cats"):
            sites, per_channel = RECIPES[method]
            recipes[method] = _recipe(spec, held, method, sites, per_channel)
        out[qtype] = (p, spec, recipes)
    return out


EXACT_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 6]


def _path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


@pytest.mark.parametrize("recipe", [None, "teal", "cats"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_k_token_steps_equal_one_token_steps_exactly(wide_models, level, qtype, recipe):
    """Chains of k = 1..17 tokens (4-token passes plus 1..3 left over) and an 8-node draft tree,
    each row bit-identical to the sequential one-token run of its path: dense and with recipes
    (teal: channel-major weights everywhere; cats: an R8 gate fused with a row-major up), SIMD and
    forced-scalar kernels, 1 and 2 threads."""
    p, spec, recipes = wide_models[qtype]
    rng = np.random.default_rng(13)
    ids = [int(t) for t in rng.integers(3, spec.vocab_size, 21 + 17)]
    prompt, new = ids[:21], ids[21:]  # 22..38 visible entries: every SIMD tail of the softmax
    for threads in (1, 2):
        rt = NativeRuntime(p, threads=threads, recipe=recipes[recipe], skip="always")
        if qtype != "F32" and _lib.prefers_r8() and recipe is None:
            assert rt.model.weights["layers.0.gate"].layout == _lib.R8
        if recipe == "teal":
            assert rt.model.weights["layers.0.down"].layout == _lib.COL
        rt.forward(prompt)
        n = rt.n_past
        seq = np.concatenate([rt.forward([t]) for t in new])
        for k in range(1, 18):
            rt.truncate(n)
            np.testing.assert_array_equal(rt.forward(new[:k]), seq[:k], err_msg=f"threads={threads} k={k}")
        rt.truncate(n)
        toks = new[:8]
        got = rt.forward(toks, n + tree_depths(EXACT_PARENTS), tree_mask(EXACT_PARENTS))
        for i in range(len(toks)):
            rt.truncate(n)
            want = rt.forward([toks[j] for j in _path(EXACT_PARENTS, i)])[-1]
            np.testing.assert_array_equal(got[i], want, err_msg=f"threads={threads} node {i}")
            rt.truncate(n)
            for j in _path(EXACT_PARENTS, i):  # one token at a time, too
                one = rt.forward([toks[j]])[0]
            np.testing.assert_array_equal(got[i], one, err_msg=f"threads={threads} node {i} (1-token steps)")


# ----------------------------------------------------------------------------- malformed files


def test_malformed_files_raise(tmp_path, tiny_f32):
    p, spec, held = tiny_f32
    data = p.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparsedgeError):
        NativeRuntime(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SparsedgeError):
        NativeRuntime(junk)
    with pytest.raises(SparsedgeError, match="no such"):
        NativeRuntime(tmp_path / "missing.gguf")

    # a wrong shape
    w = dict(held)
    w["layers.1.up"] = w["layers.1.up"][:, :32].contiguous()
    wrong = tmp_path / "shape.gguf"
    write_gguf(wrong, spec, w)
    with pytest.raises(SparsedgeError, match="ffn_up"):
        NativeRuntime(wrong)

    # a missing tensor
    w = {k: v for k, v in held.items() if k != "layers.2.down"}
    missing = tmp_path / "missing-tensor.gguf"
    write_gguf(missing, spec, w)
    with pytest.raises(SparsedgeError, match="ffn_down"):
        NativeRuntime(missing)

    # an unsupported type
    q41 = tmp_path / "q4_1.gguf"
    write_gguf(q41, spec, dict(held), "Q4_1")
    with pytest.raises(SparsedgeError, match="Q4_1"):
        NativeRuntime(q41)

    if spec.qkv_bias:  # a Qwen2 file without one of its biases would compute another function
        w = {k: v for k, v in held.items() if k != "layers.1.k_bias"}
        nobias = tmp_path / "no-bias.gguf"
        write_gguf(nobias, spec, w)
        with pytest.raises(SparsedgeError, match=r"blk\.1\.attn_k\.bias"):
            NativeRuntime(nobias)

    rt = NativeRuntime(p)
    with pytest.raises(SparsedgeError):
        rt.forward([spec.vocab_size])
    with pytest.raises(SparsedgeError):
        rt.forward([1, 2], tree_mask=np.zeros((2, 2), bool))


def _file_weights(path, spec, w) -> dict:
    """The canonical weights as a GGUF written by sparsedge.export.gguf holds them: every 2-D
    tensor read back and dequantized (Llama's q/k un-permuted), the 1-D ones (norms, biases: F32
    in every quant type) taken from ``w``; for a torch reference on the numbers the engine runs."""
    from sparsedge.export.gguf import gguf_arch, rope_unpermute

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    held = {}
    for canon, name in gguf_arch(spec).gguf_names(spec).items():
        if w[canon].ndim == 1:
            held[canon] = w[canon]
            continue
        t = tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w[canon].shape).astype(np.float32)
        if spec.arch == "llama" and canon.endswith((".q", ".k")):
            a = rope_unpermute(a, spec.n_heads if canon.endswith(".q") else spec.n_kv_heads)
        held[canon] = torch.from_numpy(np.ascontiguousarray(a))
    if spec.tie_embeddings:
        held["lm_head"] = held["embed"]
    return held


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", arch_params("native"))
def test_our_ggufs_run_every_architecture(name, quant, tmp_path):
    """sparsedge's own GGUF writer, every architecture and every type the engine reads, against
    the torch reference on the file's own numbers: a prompt, an 8-node tree, keep() of one branch
    then a step. F32 / F16 (widened at load) within 1e-3; Q8_0 / Q4_0 within 3% of the largest
    logit of the run (int8 activations). Qwen2: the q/k/v biases before NEOX RoPE."""
    from sparsedge import load
    from sparsedge.export.gguf import write_gguf as export_gguf

    loaded = load(str(save_folder(name, tmp_path / "hf")), progress=False)
    spec = loaded.spec
    p = tmp_path / f"m-{quant}.gguf"
    export_gguf(loaded, p, quant=quant, progress=False)
    ref = torch_rt(spec, _file_weights(p, spec, {c: t.float() for c, t in loaded.state_dict().items()}))
    rt = NativeRuntime(p, threads=2)
    assert rt.spec.arch == spec.arch and rt.spec.qkv_bias == spec.qkv_bias
    parents, mask, depth = _tree()
    prompt, toks = [5, 17, 99, 3, 200, 41, 7], [9, 33, 71, 120, 4, 18, 230, 66]
    pairs = [(rt.forward(prompt), ref.forward(prompt)),
             (rt.forward(toks, rt.n_past + depth, mask), ref.forward(toks, ref.n_past + depth, mask))]
    rt.keep(_path(parents, 7)), ref.keep(_path(parents, 7))
    pairs.append((rt.forward([42]), ref.forward([42])))
    top = max(float(np.abs(b).max()) for _, b in pairs)
    for i, (a, b) in enumerate(pairs):
        if quant in ("f32", "f16"):
            np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f"call {i}")
        else:  # measured: at most 0.8% (llama, qwen2) and 2.6% (gemma3) of the run's largest logit
            assert np.abs(a - b).max() < 0.03 * top, (i, np.abs(a - b).max(), top)


def test_unknown_architecture_is_refused_by_name(tmp_path):
    """A GGUF of an architecture the engine does not run is refused by name, before any tensor."""
    p = tmp_path / "phi3.gguf"
    wr = gguf.GGUFWriter(str(p), "phi3")
    wr.add_block_count(1)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(SparsedgeError, match="not 'phi3'"):
        NativeRuntime(p)


def _close(a, b, qtype):
    """F32 within 1e-3; Q8_0 (int8 activations) within 5% of the largest logit at the worst of the
    ~10^6 logits (measured: 2.3%) and 0.5% on average."""
    if qtype == "F32":
        np.testing.assert_allclose(a, b, atol=1e-3)
        return
    top = np.abs(b).max()
    assert np.abs(a - b).max() < 0.05 * top and np.abs(a - b).mean() < 0.005 * top, (np.abs(a - b).max(), top)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_qwen2_real_head_dims_and_vocabulary(tmp_path, head_dim, qtype):
    """Qwen2.5's shapes where they matter to the C code: head_dim 64 (0.5B) and 128 (1.5B), 2 heads
    over 1 KV head, and the 151,936-row vocabulary (Q8_0: the tied embedding looked up in the R8 LM
    head); against torch on the same weights, a prompt and an 8-node tree, the tree's rows equal to
    the sequential runs of their paths bit for bit."""
    from sparsedge.arch import ModelSpec

    V, H, F = 151936, 2 * head_dim, 256
    spec = ModelSpec(arch="qwen2", vocab_size=V, hidden_size=H, intermediate_size=F, n_layers=1, n_heads=2,
                     n_kv_heads=1, head_dim=head_dim, rms_eps=1e-6, rope_theta=1e6, act="silu", qkv_bias=True)
    g = torch.Generator().manual_seed(head_dim)
    shapes = {"embed": (V, H), "norm": (H,), "layers.0.attn_norm": (H,), "layers.0.ffn_norm": (H,),
              "layers.0.q": (2 * head_dim, H), "layers.0.k": (head_dim, H), "layers.0.v": (head_dim, H),
              "layers.0.o": (H, 2 * head_dim), "layers.0.gate": (F, H), "layers.0.up": (F, H), "layers.0.down": (H, F),
              "layers.0.q_bias": (2 * head_dim,), "layers.0.k_bias": (head_dim,), "layers.0.v_bias": (head_dim,)}
    w = {c: torch.randn(s, generator=g) * (0.5 if len(s) == 1 else 0.1) for c, s in shapes.items()}
    for c in ("norm", "layers.0.attn_norm", "layers.0.ffn_norm"):
        w[c] += 1.0
    p = tmp_path / "wide-vocab.gguf"
    held = write_gguf(p, spec, w, qtype)
    ref, rt = torch_rt(spec, held), NativeRuntime(p, threads=2, n_ctx=64)
    if qtype != "F32" and _lib.prefers_r8():
        assert rt.model.weights["embed"].layout == _lib.R8
    prompt = [0, 151935, 100000, 7, 65536, 3]
    a, b = rt.forward(prompt), ref.forward(prompt)
    assert a.shape == (len(prompt), V)
    _close(a, b, qtype)
    n = rt.n_past
    parents, mask, depth = _tree()
    toks = [151935, 9, 120000, 33, 4, 77777, 18, 1]
    got = rt.forward(toks, n + depth, mask)
    b = ref.forward(toks, ref.n_past + depth, mask)
    _close(got, b, qtype)
    for i in range(len(toks)):
        rt.truncate(n)
        np.testing.assert_array_equal(got[i], rt.forward([toks[j] for j in _path(parents, i)])[-1])


# ----------------------------------------------------------------------------- Gemma 3

GEMMA_NAMES = {**GGUF_NAMES, "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
               "post_attn_norm": "post_attention_norm", "post_ffn_norm": "post_ffw_norm"}


def test_gemma3_f32_matches_torch_past_the_sliding_window(tmp_path):
    """GeGLU, q/k norms, sandwich norms, (1 + w) norms, embedding scale, NEOX RoPE (no permutation),
    sliding-window layers with their own RoPE base; 20 tokens > the window of 8."""
    m = hf_model("gemma3")
    spec = arch.spec_from_hf(m.config)
    w = {c: t.float() for c, t in arch.canonical_weights(spec, m.state_dict()).items()}
    p = tmp_path / "gemma3.gguf"
    wr = gguf.GGUFWriter(str(p), "gemma3")
    wr.add_block_count(spec.n_layers)
    wr.add_embedding_length(spec.hidden_size)
    wr.add_feed_forward_length(spec.intermediate_size)
    wr.add_head_count(spec.n_heads)
    wr.add_head_count_kv(spec.n_kv_heads)
    wr.add_layer_norm_rms_eps(spec.rms_eps)
    wr.add_rope_freq_base(spec.rope_theta)
    wr.add_key_length(spec.head_dim)
    wr.add_value_length(spec.head_dim)
    wr.add_sliding_window(spec.sliding_window)
    wr.add_sliding_window_pattern([t == "sliding" for t in spec.layer_types])
    wr.add_rope_freq_base_swa(spec.rope_theta_local)
    for c, t in w.items():
        if c == "lm_head":
            continue
        a = t.numpy()
        if a.ndim == 1:  # llama.cpp reads Gemma norms as plain w: the file holds 1 + w
            a = a + spec.norm_offset
        n = {"embed": "token_embd", "norm": "output_norm"}.get(c) or f"blk.{c.split('.')[1]}.{GEMMA_NAMES[c.split('.')[2]]}"
        wr.add_tensor(n + ".weight", np.ascontiguousarray(a, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    ref, rt = torch_rt(spec, w), NativeRuntime(p, threads=2)
    assert rt.spec.layer_types == spec.layer_types and rt.spec.sliding_window == spec.sliding_window
    toks = list(range(3, 23))
    np.testing.assert_allclose(rt.forward(toks), ref.forward(toks), atol=1e-3)
    parents, mask, depth = _tree()
    tree = [9, 33, 71, 120, 4, 18, 230, 66]
    np.testing.assert_allclose(rt.forward(tree, rt.n_past + depth, mask),
                               ref.forward(tree, ref.n_past + depth, mask), atol=1e-3)


def test_read_chunks_probe_reads_what_it_is_given():
    """se_read_chunks (benchmarks/skip_bandwidth.py) sums the 8-byte words of exactly the chunks
    named, every byte of each, and no other."""
    rng = np.random.default_rng(11)
    buf = rng.integers(0, 256, 4096 * 8, dtype=np.uint8)
    for chunk in (8, 40, 144, 4096):
        off = np.flatnonzero(rng.random(buf.size // chunk) < 0.5).astype(np.int64) * chunk
        want = sum(int(buf[o:o + chunk].view(np.uint64).sum(dtype=np.uint64)) for o in off) % 2**64
        assert _lib.lib().se_read_chunks(buf.ctypes.data, off.ctypes.data, off.size, chunk) == want


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_skipping_changes_nothing_but_the_work(tmp_path, level, qtype):
    """A recipe run with its work skipped (channel-major integer kernels) and with the dense kernels
    on the thresholded inputs: bit-identical logits, steps and trees alike (the skipping kernels
    compute each (row, block)'s integer sum and float step as the R8 ones do). "auto" keeps the
    dense layouts below SKIP_MIN_SPARSITY and skips from there on."""
    from sparsedge.runtimes.native.loader import SKIP_MIN_SPARSITY

    spec, w = tiny_llama()
    p = tmp_path / "q.gguf"
    held = write_gguf(p, spec, w, qtype)
    recipe = _recipe(spec, held, "teal", RECIPES["teal"][0], ())
    runs = {}
    for skip in ("always", "never", "auto"):
        rt = NativeRuntime(p, threads=2, recipe=recipe, skip=skip)
        toks = [5, 17, 99, 3, 200, 41, 7, 8]
        parents, mask, depth = _tree()
        runs[skip] = (rt.forward(toks), rt.forward(toks, rt.n_past + depth, mask),
                      rt.model.weights["layers.0.gate"].layout)
    assert runs["always"][2] == _lib.COL and runs["never"][2] != _lib.COL
    assert runs["auto"][2] == (_lib.COL if recipe.target_sparsity >= SKIP_MIN_SPARSITY else runs["never"][2])
    for a, b in zip(runs["always"][:2], runs["never"][:2]):
        np.testing.assert_array_equal(a, b)
    import dataclasses

    high = dataclasses.replace(recipe, target_sparsity=0.9)
    assert NativeRuntime(p, threads=2, recipe=high).model.weights["layers.0.gate"].layout == _lib.COL
    with pytest.raises(SparsedgeError, match="skip mode"):
        NativeRuntime(p, threads=2, recipe=recipe, skip="sometimes")


# ----------------------------------------------------------------------------- kernel levels on this host


def _level_the_flags_allow() -> str:
    """The kernel level the C library must pick on this host, from the CPU's own flags (what
    se_set_level tests with __builtin_cpu_supports), independent of the library."""
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not {"avx2", "fma"} <= flags:
        return "scalar"
    return "avx2+fma+avx512vnni" if {"avx512f", "avx512vl", "avx512_vnni"} <= flags else "avx2+fma"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_level_is_what_this_cpus_flags_allow():
    """The library loaded here dispatches at run time to the best level the CPU has (one wheel for
    every CPU): neither a level the CPU lacks (SIGILL) nor a lower one than it could use."""
    assert native.set_level(None) == _level_the_flags_allow()


@pytest.fixture(scope="module")
def real_ggufs(real_model, tmp_path_factory):
    """smollm2-135m exported as F32, Q8_0 and Q4_0 GGUF (the float and both integer kernels)."""
    from sparsedge.export.artifact import ExportConfig, export

    d = tmp_path_factory.mktemp("real_levels") / "art"
    export(real_model, d, ExportConfig(formats=("gguf",), gguf_quants=("f32", "q8_0", "q4_0")), progress=False)
    return {q: next(d.glob(f"*{q}*.gguf")) for q in ("f32", "q8_0", "q4_0")}


def _real_logits(path, prompt: list[int]) -> list[np.ndarray]:
    """A prompt, an 8-node tree after it, keep() of one branch and 4 single steps."""
    parents, mask, depth = _tree()
    rt = NativeRuntime(path, threads=2, n_ctx=256)
    outs = [rt.forward(prompt)]
    outs.append(rt.forward(prompt[:8], rt.n_past + depth, mask))
    rt.keep(_path(parents, 7))
    for t in prompt[:4]:
        outs.append(rt.forward([t]))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("lower", ["avx2+fma", "scalar"])
def test_forced_lower_level_on_a_real_artifact(real_model, real_ggufs, qtype, lower):
    """Forcing a lower kernel level on the real model changes nothing but the speed where the
    kernels promise it: the AVX2 path gives the VNNI path's logits bit for bit (the same integer
    sums, the same float operations), so an AVX2-only host computes what an AVX-512 host does.

    The scalar path (a CPU without AVX2) sums floats in another order: F32 stays within 1e-5 of
    the largest logit; with int8 activations those last-bit differences flip a rounding now and
    then, and 30 layers carry a flip up to ~3% of the largest logit (measured: 1.07 of 36 on Q8_0,
    0.96 of 34 on Q4_0), so quantized types are held to 5% and equal argmax almost everywhere."""
    best = native.set_level(None)
    if lower == "avx2+fma" and best != "avx2+fma+avx512vnni":
        pytest.skip(f"no lower SIMD level than {best} on this CPU")
    prompt = real_model.tokenizer("The capital of France is Paris. def fib(n): return n")["input_ids"]
    try:
        want = _real_logits(real_ggufs[qtype], prompt)
        assert native.set_level({"avx2+fma": 1, "scalar": 0}[lower]) == lower
        got = _real_logits(real_ggufs[qtype], prompt)
    finally:
        native.set_level(None)
    agree = []
    for i, (a, b) in enumerate(zip(want, got)):
        if lower != "scalar":
            np.testing.assert_array_equal(b, a, err_msg=f"call {i} at {lower} vs {best}")
            continue
        tol = 1e-5 if qtype == "f32" else 0.05
        np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max(), rtol=0, err_msg=f"call {i}")
        agree.append(a.argmax(-1) == b.argmax(-1))
    if agree:
        assert np.concatenate(agree).mean() >= (1.0 if qtype == "f32" else 0.85)
