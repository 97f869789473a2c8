"""GGUF -> the native engine's weights: validate every tensor in Python, then lay weights out once.

    NativeModel.load(path, recipe=None) -> NativeModel (spec, recipe, ctypes Model, memory report)

Supported tensor types: F32, F16 (widened to F32 at load), Q8_0, Q4_0. Quantized blocks are split
into a contiguous array of quants and a float32 array of scales (C reads them as two streams).
A weight whose input is thresholded by the recipe (or the down projection behind a thresholded
gate) is re-laid out input-channel-major (``COL``) so that the kernels skip inactive channels; every
other quantized weight, on CPUs with the SIMD kernels for it (AVX2), is re-laid out ``R8``: eight
rows interleaved so that one pass over the weights serves all k tokens of a draft-tree step with
8 rows per SIMD register (sparsedge_native.c explains the tile). A gate-thresholded recipe keeps
the up projection row-major so that each token skips the rows its gate zeroed. Both re-layouts keep
the original quants and scales (lossless). Anything malformed — an unknown
architecture, a missing tensor, a wrong shape or type, a truncated file — raises SparsedgeError
before C sees a pointer.

Memory: the header is read by gguf_header.GGUFFile (the vocab is never materialised). A weight
that is copied into the engine's layout is read from the file with pread() in chunks of about
1 MB of rows and re-laid out chunk by chunk into its final arrays, so that only the new layout is
resident: the file's own pages are never mapped into the process for it, and no whole-tensor
temporaries exist (the 49152 x 576 tied embedding would otherwise cost three extra copies at its
peak). F32 row-major weights and the norms stay zero-copy views of the memory map.
"""

from __future__ import annotations

import ctypes as C
import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...arch import ModelSpec
from ...errors import SparsedgeError
from . import _lib
from ._lib import COL, R8, ROW, SITES
from .gguf_header import GGUFFile, LazyArray, TensorInfo

RECIPE_KEY = "sparsedge.recipe"
QK = 32

# canonical per-layer name -> GGUF tensor name (llama.cpp's names), as data
LAYER_TENSORS = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm", "post_ffn_norm": "post_ffw_norm",
}
# the norm in front of the FFN: FFN_NORM (Llama) and FFN_PRE_NORM (Gemma 3) are both "ffn_norm"
FFN_NORM = "ffn_norm"
# canonical bias name -> the GGUF tensor whose ".bias" it is (Qwen2: blk.N.attn_q.bias, ...)
BIAS_TENSORS = {"q_bias": "attn_q", "k_bias": "attn_k", "v_bias": "attn_v"}

# Whether a recipe's sparse sites get the skipping layouts (COL: channel-major; ROW up: rows skipped
# behind a gate threshold) or the dense ones (R8, where the CPU has those kernels) computing the
# same function on the thresholded input. Skipping saves compute, but a token's active channels
# are scattered slices of a few hundred bytes, and the CPUs measured so far serve such reads far
# slower than one sequential stream (benchmarks/skip_bandwidth.py: a random half of 144-768 B
# chunks takes 2-2.4x as long as all of them), so below very high sparsity the dense kernels are
# faster (SmolLM2-135M Q4_0, TEAL on every linear input: skipping ran at 0.44x / 0.50x / 0.66x of
# dense at 25 / 50 / 70%, the dense kernels at 0.95x / 0.92x / 0.96x). "auto" skips where the recipe's target sparsity reaches SKIP_MIN_SPARSITY.
SKIP_MODES = ("auto", "always", "never")
SKIP_MIN_SPARSITY = 0.85

# which recipe sites make a weight's input sparse (the weight then runs channel-major)
COL_SITES = {
    "q": ("qkv_in", "q_in"), "k": ("qkv_in",), "v": ("qkv_in",), "o": ("o_in",),
    "gate": ("ffn_in",), "up": ("ffn_in",), "down": ("down_in", "gate_act"),
}


# bytes of source rows re-laid out per step: small enough that the temporaries of a chunk (a few
# copies of it) never show in the peak, large enough that numpy's per-call overhead does not matter
CHUNK_BYTES = 1 << 20


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    v = reader.fields.get(key)
    if v is None:
        return default
    return v.values() if isinstance(v, LazyArray) else v


def _need(reader, key: str, kind=int) -> Any:
    v = _field(reader, key)
    if v is None:
        raise SparsedgeError(f"GGUF lacks metadata {key!r}")
    try:
        v = kind(v)
    except (TypeError, ValueError) as e:
        raise SparsedgeError(f"GGUF metadata {key!r} = {v!r} is not a {kind.__name__}") from e
    if kind is int and v <= 0:
        raise SparsedgeError(f"GGUF metadata {key!r} = {v} must be positive")
    return v


# GGUF architectures the engine runs
ARCHS = ("llama", "gemma3", "qwen2")


def spec_from_gguf(reader) -> tuple[ModelSpec, dict[str, Any]]:
    """The ModelSpec of a llama / gemma3 / qwen2 GGUF and the extras C needs (rope layout)."""
    a = _field(reader, "general.architecture")
    if a not in ARCHS:
        raise SparsedgeError(f"the native runtime runs {', '.join(ARCHS)} GGUFs, not {a!r}")
    H = _need(reader, f"{a}.embedding_length")
    n_heads = _need(reader, f"{a}.attention.head_count")
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, f"{a}.attention.key_length", H // n_heads))
    emb = reader.tensors.get("token_embd.weight")
    if emb is None or len(emb.ne) != 2:
        raise SparsedgeError("GGUF lacks a 2-D token_embd.weight")
    vocab = int(emb.ne[1])  # ne = (hidden, vocab): ne[0] is the contiguous axis
    theta = float(_field(reader, f"{a}.rope.freq_base", 10000.0))
    factor = 1.0
    if _field(reader, f"{a}.rope.scaling.type") not in (None, "none"):
        if _field(reader, f"{a}.rope.scaling.type") != "linear":
            raise SparsedgeError(f"RoPE scaling {_field(reader, f'{a}.rope.scaling.type')!r} is not supported")
        factor = float(_field(reader, f"{a}.rope.scaling.factor", 1.0))
    n_layers = _need(reader, f"{a}.block_count")
    common = dict(
        vocab_size=vocab, hidden_size=H, intermediate_size=_need(reader, f"{a}.feed_forward_length"),
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        rms_eps=_need(reader, f"{a}.attention.layer_norm_rms_epsilon", float), rope_theta=theta,
        rope_linear_factor=factor, tie_embeddings="output.weight" not in reader.tensors,
    )
    if n_kv <= 0 or head_dim <= 0 or head_dim % 2:
        raise SparsedgeError(f"GGUF has {n_kv} KV heads of dimension {head_dim}")
    if a in ("llama", "qwen2"):
        rope_dim = int(_field(reader, f"{a}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise SparsedgeError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
        if a == "llama":  # q/k rows permuted by the converter into interleaved pairs (2j, 2j+1)
            return ModelSpec(arch="llama", act="silu", **common), {"rope_neox": 0}
        # Qwen2: Llama's graph plus q/k/v biases; q/k stored in the HF layout, so NEOX rotary
        # (pairs (j, j + hd/2)), as llama.cpp's qwen2 graph runs it. llama.cpp's qwen2 has no
        # sliding window (a key for one is ignored, as there), q/k norm or sandwich norm.
        return ModelSpec(arch="qwen2", act="silu", qkv_bias=True, **common), {"rope_neox": 1}
    window = _field(reader, "gemma3.attention.sliding_window")
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
    if pattern is None:  # llama.cpp's default for Gemma 3: five local layers, then a global one
        pattern = [(i + 1) % 6 != 0 for i in range(n_layers)]
    if len(pattern) != n_layers:
        raise SparsedgeError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
    spec = ModelSpec(
        arch="gemma3", act="gelu_tanh", **common,
        rope_theta_local=float(_field(reader, "gemma3.rope.freq_base_swa", 10000.0)),
        sliding_window=int(window) if window else None,
        layer_types=["sliding" if p and window else "full" for p in pattern],
        norm_offset=0.0,  # the file stores 1 + w
        embed_scale=float(H) ** 0.5, qk_norm=True, sandwich_norm=True,
    )
    return spec, {"rope_neox": 1}


@dataclass
class Weight:
    """One linear weight in the engine's layout; the arrays stay alive as long as this object."""

    type: str  # F32 | Q8_0 | Q4_0
    layout: int
    rows: int
    cols: int
    q: np.ndarray
    d: np.ndarray | None = None

    def mat(self) -> _lib.Mat:
        return _lib.Mat(_lib.TYPES[self.type], self.layout, self.rows, self.cols, self.q.ctypes.data,
                        None if self.d is None else self.d.ctypes.data)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + (0 if self.d is None else self.d.nbytes)


def weight_from_raw(gtype: str, data: np.ndarray, rows: int, cols: int) -> Weight:
    """A ROW weight from a GGUF tensor's data of type ``gtype``: raw bytes (uint8 [rows, row
    bytes], as GGUFFile.read gives) or, for F32 / F16, an array of that dtype."""
    if gtype in ("F32", "F16") and data.dtype == np.uint8:
        data = data.view(np.float32 if gtype == "F32" else np.float16)
    if gtype == "F32":
        return Weight("F32", ROW, rows, cols, np.ascontiguousarray(data.reshape(rows, cols), dtype=np.float32))
    if gtype == "F16":
        return Weight("F32", ROW, rows, cols, data.reshape(rows, cols).astype(np.float32))
    nb = cols // QK
    if gtype == "Q8_0":  # block: f16 scale, 32 int8
        blocks = data.reshape(rows, nb, 34)
        d = blocks[:, :, :2].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
        return Weight("Q8_0", ROW, rows, cols, q, d)
    if gtype == "Q4_0":  # block: f16 scale, 16 bytes of nibbles (value j low, value j+16 high)
        blocks = data.reshape(rows, nb, 18)
        d = blocks[:, :, :2].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
        q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(rows, cols // 2)
        return Weight("Q4_0", ROW, rows, cols, q, d)
    raise AssertionError(gtype)


def _unpack_q4(q: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows, cols/2] nibbles (per block of 32: low = j, high = j+16) -> uint8 [rows, cols] values 0..15."""
    b = q.reshape(rows, cols // QK, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(rows, cols)


def _pack_q4(v: np.ndarray) -> np.ndarray:
    """Inverse of _unpack_q4 along the last axis (values 0..15)."""
    r, n = v.shape
    b = v.reshape(r, n // QK, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).astype(np.uint8).reshape(r, n // 2)


def to_col(w: Weight) -> Weight:
    """Input-channel-major copy of a ROW weight: column c contiguous; scales stay in their blocks
    along the input axis, stored [cols/32, rows]. Lossless."""
    r, c = w.rows, w.cols
    if w.type == "F32":
        return Weight("F32", COL, r, c, np.ascontiguousarray(w.q.T))
    d = np.ascontiguousarray(w.d.T)  # [nb, rows]
    if w.type == "Q8_0":
        return Weight("Q8_0", COL, r, c, np.ascontiguousarray(w.q.T), d)
    vals = _unpack_q4(w.q, r, c).T  # [cols, rows], 0..15
    if r % QK:  # nibble groups run along rows in 32s; otherwise keep q - 8 as int8 (same scales)
        return Weight("Q8_0", COL, r, c, np.ascontiguousarray(vals.astype(np.int16) - 8).astype(np.int8), d)
    return Weight("Q4_0", COL, r, c, _pack_q4(np.ascontiguousarray(vals)), d)


def to_r8(w: Weight) -> Weight:
    """Eight-row interleaved copy of a ROW Q8_0 / Q4_0 weight (rows a multiple of 8), lossless:
    q [rows/8, cols/32, tile] with tile[v, i, c] = row 8g+i, column 32b + 4v + c (Q8_0: v < 8;
    Q4_0: v < 4, low nibble that column, high nibble the column 16 further); d [rows/8, cols/32, 8]."""
    r, c = w.rows, w.cols
    if w.type not in ("Q8_0", "Q4_0") or w.layout != ROW or r % 8:
        raise AssertionError((w.type, w.layout, r))
    G, nb = r // 8, c // QK
    d = np.ascontiguousarray(w.d.reshape(G, 8, nb).transpose(0, 2, 1))
    if w.type == "Q8_0":
        q = w.q.reshape(G, 8, nb, 8, 4).transpose(0, 2, 3, 1, 4)
        return Weight("Q8_0", R8, r, c, np.ascontiguousarray(q).reshape(G, nb * 256), d)
    vals = _unpack_q4(w.q, r, c).reshape(G, 8, nb, 2, 4, 4)  # [g, i, b, half, v, c]
    lo = vals[:, :, :, 0].transpose(0, 2, 3, 1, 4)
    hi = vals[:, :, :, 1].transpose(0, 2, 3, 1, 4)
    q = (lo | (hi << 4)).astype(np.uint8)
    return Weight("Q4_0", R8, r, c, np.ascontiguousarray(q).reshape(G, nb * 128), d)


def r8_ok(gtype: str, rows: int) -> bool:
    """Whether a ROW weight of this GGUF type and row count can be laid out R8."""
    return gtype in ("Q8_0", "Q4_0") and rows % 8 == 0


def _put(dst: np.ndarray, src: np.ndarray, at: int, ax: int) -> int:
    """dst[at : at+n] = src along axis ``ax`` (0 or the last); returns at + n."""
    n = src.shape[ax]
    if ax == 0:
        dst[at:at + n] = src
    else:
        dst[..., at:at + n] = src
    return at + n


def build_weight(f: GGUFFile, t: TensorInfo, rows: int, cols: int, layout: int) -> Weight:
    """The weight of tensor ``t`` ([rows, cols], validated) in ``layout``, built chunk by chunk.

    Each chunk of source rows is pread() from the file, split into quants/scales
    (weight_from_raw), re-laid out (to_r8 / to_col, the same functions as for a whole tensor) and
    copied into the final arrays, allocated once. Rows concatenate along axis 0 for ROW and R8
    (R8: rows/8 tiles) and along the last axis for COL ([cols, rows] quants, [nb, rows] scales;
    Q4_0 packs rows in pairs of 16 within each 32, so chunks are whole multiples of 32 rows)."""
    if t.type == "F32" and layout == ROW:  # zero-copy: the file's pages are the weight
        return Weight("F32", ROW, rows, cols, f.view(t).reshape(rows, cols))
    step = max(32, CHUNK_BYTES // max(1, t.row_bytes) // 32 * 32)
    if layout == COL and rows % QK:  # the Q4_0 -> int8 fallback of to_col needs all rows at once
        step = rows
    ax = 1 if layout == COL else 0
    q = d = None
    wtype, qo, do = t.type, 0, 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = weight_from_raw(t.type, f.read(t, r0, r1), r1 - r0, cols)
        w = to_r8(w) if layout == R8 else to_col(w) if layout == COL else w
        if q is None:
            def alloc(a: np.ndarray) -> np.ndarray:
                shape = list(a.shape)
                shape[ax] = a.shape[ax] * rows // (r1 - r0)  # every layout is proportional in rows
                return np.empty(shape, a.dtype)
            q, d, wtype = alloc(w.q), None if w.d is None else alloc(w.d), w.type
        qo = _put(q, w.q, qo, ax)
        if w.d is not None:
            do = _put(d, w.d, do, ax)
        del w
    assert qo == q.shape[ax] and (d is None or do == d.shape[ax]), (t.name, qo, q.shape)
    return Weight(wtype, layout, rows, cols, q, d)


@dataclass
class NativeModel:
    path: Path
    spec: ModelSpec
    recipe: Any  # SparsityRecipe | None
    weights: dict[str, Weight]
    norms: dict[str, np.ndarray]  # every 1-D vector: RMSNorm scales, and Qwen2's q/k/v biases
    thresholds: dict[tuple[int, str], np.ndarray]
    c_model: _lib.Model
    c_layers: Any
    types: dict[str, int] = field(default_factory=dict)  # GGUF tensor type -> count
    reader: Any = None  # keeps the memory map alive for zero-copy F32 weights

    @property
    def memory(self) -> dict[str, int]:
        """Bytes of weights the engine holds: copied into its layout vs mapped from the file."""
        copied = mapped = 0
        for a in [x for w in self.weights.values() for x in (w.q, w.d) if x is not None] + list(self.norms.values()):
            if _is_mapped(a):
                mapped += a.nbytes
            else:
                copied += a.nbytes
        th = sum(a.nbytes for a in self.thresholds.values())
        return {"weights_copied": copied, "weights_mapped": mapped, "thresholds": th, "total": copied + mapped + th}

    @classmethod
    def load(cls, path: str | Path, recipe: Any = None, r8: bool | None = None, skip: str = "auto") -> "NativeModel":
        """recipe: None = the file's own (``sparsedge.recipe``), False = dense, or a SparsityRecipe / path.
        r8: lay quantized row-major weights out R8 (None: where this CPU has the SIMD kernels).
        skip: "always" lays the recipe's sparse weights out for skipping, "never" keeps them dense
        (the recipe's thresholds still apply: the same function), "auto" skips when the recipe's
        target sparsity is at least SKIP_MIN_SPARSITY (see there why)."""
        if skip not in SKIP_MODES:
            raise SparsedgeError(f"unknown skip mode {skip!r} (known: {', '.join(SKIP_MODES)})")
        path = Path(path).expanduser()
        if not path.is_file():
            raise SparsedgeError(f"no such GGUF file: {path}")
        try:
            reader = GGUFFile(path)
        except (OSError, ValueError, OverflowError) as e:  # GGUFFile raises SparsedgeError for what it checks
            raise SparsedgeError(f"{path.name} is not a readable GGUF file: {type(e).__name__}: {e}") from e
        spec, extra = spec_from_gguf(reader)
        rec = _resolve_recipe(reader, recipe, spec)
        tmap = reader.tensors
        types: dict[str, int] = {}

        def raw(name: str, shape: tuple[int, ...], allowed=("F32", "F16", "Q8_0", "Q4_0")):
            t = tmap.get(name)
            if t is None:
                raise SparsedgeError(f"GGUF lacks tensor {name!r}")
            gtype = t.type
            if gtype not in allowed:
                raise SparsedgeError(
                    f"tensor {name!r} has type {gtype}; the native runtime reads {', '.join(allowed)}"
                )
            ne = t.ne
            want = tuple(reversed(shape))  # GGUF lists ne0 (the contiguous axis) first
            if ne != want:
                raise SparsedgeError(f"tensor {name!r} has shape {list(reversed(ne))}, expected {list(shape)}")
            if gtype in ("Q8_0", "Q4_0") and shape[-1] % QK:
                raise SparsedgeError(f"tensor {name!r}: {shape[-1]} columns are not whole blocks of {QK}")
            bsize = {"F32": 4 * QK, "F16": 2 * QK, "Q8_0": 34, "Q4_0": 18}[gtype]
            want_bytes = int(np.prod(shape)) // QK * bsize if gtype in ("Q8_0", "Q4_0") else int(np.prod(shape)) * bsize // QK
            if t.nbytes != want_bytes:
                raise SparsedgeError(f"tensor {name!r} holds {t.nbytes} bytes, expected {want_bytes} (truncated file?)")
            types[gtype] = types.get(gtype, 0) + 1
            return t

        def vec(name: str, n: int) -> np.ndarray:
            t = raw(name, (n,), ("F32", "F16"))
            a = np.ascontiguousarray(reader.view(t), dtype=np.float32).reshape(n)
            if not np.isfinite(a).all():
                raise SparsedgeError(f"tensor {name!r} holds NaN or inf")
            return a

        H, F, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
        QD, KD = spec.n_heads * hd, spec.n_kv_heads * hd
        shapes = {"q": (QD, H), "k": (KD, H), "v": (KD, H), "o": (H, QD), "gate": (F, H), "up": (F, H), "down": (H, F)}
        skipping = rec is not None and (skip == "always" or (skip == "auto" and rec.target_sparsity >= SKIP_MIN_SPARSITY))
        col_sites = set(rec.sites) if skipping else set()
        if r8 is None:
            r8 = _lib.prefers_r8()
        weights: dict[str, Weight] = {}
        norms: dict[str, np.ndarray] = {}
        V = spec.vocab_size
        # the LM head runs R8; a tied embedding is then looked up in the R8 tiles (no second copy)
        emb_t = raw("token_embd.weight", (V, H))
        head_t = emb_t if spec.tie_embeddings else raw("output.weight", (V, H))
        head_layout = R8 if r8 and r8_ok(head_t.type, V) else ROW
        weights["embed"] = build_weight(reader, emb_t, V, H, head_layout if spec.tie_embeddings else ROW)
        if not spec.tie_embeddings:
            weights["lm_head"] = build_weight(reader, head_t, V, H, head_layout)
        norms["norm"] = vec("output_norm.weight", H)
        for i in range(spec.n_layers):
            for canon, shape in shapes.items():
                t = raw(f"blk.{i}.{LAYER_TENSORS[canon]}.weight", shape)
                if col_sites & set(COL_SITES[canon]):
                    layout = COL
                elif r8 and r8_ok(t.type, shape[0]) and not (canon == "up" and "gate_act" in col_sites):
                    layout = R8
                else:
                    layout = ROW
                weights[f"layers.{i}.{canon}"] = build_weight(reader, t, *shape, layout)
            norms[f"layers.{i}.attn_norm"] = vec(f"blk.{i}.attn_norm.weight", H)
            norms[f"layers.{i}.ffn_norm"] = vec(f"blk.{i}.{FFN_NORM}.weight", H)
            if spec.qk_norm:
                norms[f"layers.{i}.q_norm"] = vec(f"blk.{i}.attn_q_norm.weight", hd)
                norms[f"layers.{i}.k_norm"] = vec(f"blk.{i}.attn_k_norm.weight", hd)
            if spec.sandwich_norm:
                norms[f"layers.{i}.post_attn_norm"] = vec(f"blk.{i}.post_attention_norm.weight", H)
                norms[f"layers.{i}.post_ffn_norm"] = vec(f"blk.{i}.post_ffw_norm.weight", H)
            if spec.qkv_bias:  # Qwen2: [QD], [KD], [KD]; required (a file without them computes another function)
                for canon, n in (("q_bias", QD), ("k_bias", KD), ("v_bias", KD)):
                    norms[f"layers.{i}.{canon}"] = vec(f"blk.{i}.{BIAS_TENSORS[canon]}.bias", n)

        thresholds: dict[tuple[int, str], np.ndarray] = {}
        if rec is not None:
            for site, st in rec.sites.items():
                for i, t in enumerate(st.thresholds):
                    a = np.atleast_1d(np.asarray(t, dtype=np.float32))
                    if not np.isfinite(a).all():
                        raise SparsedgeError(f"recipe site {site} layer {i} holds a non-finite threshold")
                    thresholds[(i, site)] = a

        layers = (_lib.Layer * spec.n_layers)()
        for i in range(spec.n_layers):
            L = layers[i]
            for canon in shapes:
                setattr(L, canon, weights[f"layers.{i}.{canon}"].mat())
            for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm",
                      "q_bias", "k_bias", "v_bias"):
                a = norms.get(f"layers.{i}.{n}")
                setattr(L, n, None if a is None else a.ctypes.data)
            for s, site in enumerate(SITES):
                a = thresholds.get((i, site))
                L.th[s] = None if a is None else a.ctypes.data
                L.th_n[s] = 0 if a is None else a.size
            L.theta = spec.theta(i)
            L.window = spec.window(i) or 0
        m = _lib.Model()
        m.n_layers, m.hidden, m.ffn, m.n_heads, m.n_kv, m.head_dim, m.vocab = (
            spec.n_layers, H, F, spec.n_heads, spec.n_kv_heads, hd, spec.vocab_size)
        m.act = {"silu": 0, "gelu_tanh": 1}[spec.act]
        m.rope_neox, m.qk_norm, m.sandwich = extra["rope_neox"], int(spec.qk_norm), int(spec.sandwich_norm)
        m.eps, m.scale, m.embed_scale = spec.rms_eps, spec.scale, spec.embed_scale
        m.rope_factor, m.softcap = spec.rope_linear_factor, spec.final_logit_softcap or 0.0
        m.embed = weights["embed"].mat()
        m.lm_head = weights.get("lm_head", weights["embed"]).mat()
        m.out_norm = norms["norm"].ctypes.data
        m.layers = C.cast(layers, C.POINTER(_lib.Layer))
        return cls(path, spec, rec, weights, norms, thresholds, m, layers, types, reader)


def _is_mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of the file's memory map (zero-copy) rather than our own copy."""
    b = a
    while isinstance(b, np.ndarray):  # (a copy of a memmap slice is still np.memmap, but owns its data)
        b = b.base
    if isinstance(b, memoryview):  # np.frombuffer(map) keeps a memoryview of the map
        b = b.obj
    return isinstance(b, mmap.mmap)


def _resolve_recipe(reader, recipe: Any, spec: ModelSpec):
    if recipe is False:
        return None
    if recipe is None and _field(reader, RECIPE_KEY) is None:
        return None
    # only now: sparsedge.sparsify imports torch (its package __init__ and recipe.py's SITES from
    # runtimes.torch_model), ~180 MB of RSS a dense native session must not pay
    from ...sparsify.recipe import SparsityRecipe

    if recipe is None:
        text = _field(reader, RECIPE_KEY)
        try:
            recipe = SparsityRecipe.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SparsedgeError(f"GGUF metadata {RECIPE_KEY} is not JSON: {e}") from e
    elif isinstance(recipe, (str, Path)):
        recipe = SparsityRecipe.load(recipe)
    if not isinstance(recipe, SparsityRecipe):
        raise SparsedgeError(f"recipe must be a SparsityRecipe, a path, None or False, not {type(recipe).__name__}")
    recipe.validate(spec)
    if recipe.chunks is not None and recipe.chunks.routing_window:
        raise SparsedgeError("chunk routing recipes are not supported by the native runtime (thresholds only)")
    return recipe
