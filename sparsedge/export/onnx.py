"""ONNX export: the decoder of any registered architecture as one ONNX graph with an explicit KV cache.

The graph (batch b, new tokens s, cached entries p; every dimension dynamic):

    inputs   input_ids                    int64   [b, s]
             position_ids                 int64   [b, s]      RoPE positions (tree nodes: n_past + depth)
             attention_bias               float32 [b, 1, s, p+s]  additive: 0 visible, MASK_VALUE hidden
             sliding_attention_bias       float32 [b, 1, s, p+s]  same, for sliding-window layers (only
                                                                  in graphs of models that have them)
             past_key_values.{i}.key      float32 [b, n_kv, p, head_dim]   one pair per layer i
             past_key_values.{i}.value    float32 [b, n_kv, p, head_dim]
    outputs  logits                       float32 [b, s, vocab]
             present.{i}.key / .value     float32 [b, n_kv, p+s, head_dim]  = concat(past, new)

Why two biases and not positions in the graph: the runtime owns the cache, its order (``keep``
compacts it) and the position of every entry, so it builds both masks exactly as the torch
reference does (tree mask over the new tokens, and for sliding layers q_pos - k_pos < window). The
graph stays plain MatMul/Softmax that every execution provider runs.

Linear weights are stored transposed ([in, out]) so that every projection is ``MatMul(x, W)`` with
an initializer W: the form ONNX Runtime's weight quantizers (MatMulNBits, dynamic int8, QDQ) look for.
q/k/v are one MatMul (unless a recipe sparsifies q's input alone) and gate/up another; Qwen2's q/k/v
biases are one Add after it (dynamic graphs only: the static NPU graphs refuse them, check_supported).

Why the graph is built op by op (onnx.helper) and not traced with torch.onnx.export: measured on
SmolLM2-135M here, the TorchScript tracer (deprecated since torch 2.9) gives ~2300 nodes after ONNX
Runtime's optimiser and torch.export (dynamo) takes ~150 s to export (40 s for a 3-layer test
model); this builder writes ~1030 nodes in ~10 s, and a decode step of a 135M model is dominated
by per-node overhead once weights are int4. The math is torch_model.Decoder's, pinned to it by
tests (tests/export/test_onnx.py, tests/runtimes/test_onnxrt.py).

A sparsity recipe is part of the function: at each of its sites the graph computes
``Where(Abs(x) >= t, x, 0)`` with the threshold t an initializer named
``layers.{i}.sparsity.{site}`` (a scalar, or a vector over channels), so any ONNX runtime computes
the same sparse function as the torch reference with that recipe.

The spec, the mask value and a recipe summary are stored in the model's metadata (``sparsedge.*``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..arch import ModelSpec
from ..errors import SparsedgeError

ONNX_FORMAT = 1
OPSET = 18
IR_VERSION = 8  # what opset 18 needs; readable by every ONNX Runtime since 1.14
MODEL_FILE = "model.onnx"
# Additive bias of a hidden key: exp(-1e4) is 0 in float32 next to any real score, and unlike -inf
# or float32's min it keeps (scores + bias) finite and its range calibratable for QDQ graphs.
# Runtimes read it from the graph's metadata (sparsedge.mask_value).
MASK_VALUE = -1e4
# Static (NPU) graphs are quantized: scores + bias share one 16-bit scale, and -1e4 would make
# that step ~0.15, coarse for softmax logits. -100 still hides a key (exp(-100) = 4e-44) while
# keeping the step ~3e-3.
STATIC_MASK_VALUE = -100.0
# ONNX protobufs cannot exceed 2 GiB; above this many bytes of weights they go to one side file.
EXTERNAL_DATA_BYTES = 1_800_000_000

SPARSITY_INIT = "layers.{i}.sparsity.{site}"


@dataclass(frozen=True)
class StaticShape:
    """Fixed shapes for execution providers that compile a graph once (NPUs: QNN HTP, ...).

    context: cache slots C (the graph always reads C past entries, hidden ones masked by the bias);
    tokens: new tokens k per call (1 for decoding, 8 or so for verifying a draft tree).

    A static graph differs from the dynamic one in three ways, all for the NPU compilers:
    - the rotary tables come in as inputs ``rope_cos.{j}`` / ``rope_sin.{j}`` [1, k, 1, hd] (j over the
      distinct rope bases), computed on the host in float: quantized to 16 bits inside the graph,
      angles of up to C radians would lose their precision, and Sin/Cos need no NPU support;
    - attention is written with tensors of rank <= 4 (HTP kernels stop at rank 4);
    - attention reads the C cache slots only, the new entries written into theirs inside the graph
      (input ``kv_slot_source`` int64 [C]: slot c takes row kv_slot_source[c] of the past and new
      entries concatenated, c or C + a new row; ``attention_bias`` is [1, 1, k, C]), so that a
      key's column does not depend on which call brought it (_attention_static says why it matters);
    - the cache is slot-major: ``past_key_values.{i}.*`` [C, n_kv * hd], and ``present.{i}.*`` the k
      new entries only, [k, n_kv * hd]: the runtime owns the fixed-size cache and writes them into
      the same slots (no C-sized copy out of the graph).
    """

    context: int
    tokens: int = 1

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.context < 1:
            raise SparsedgeError(f"static shapes need context >= 1 and tokens >= 1, got {self}")


def rope_bases(spec: ModelSpec) -> list[float]:
    """The distinct rotary bases of a model, in the order of the static graph's rope inputs."""
    return sorted({spec.theta(i) for i in range(spec.n_layers)})


def input_names(spec: ModelSpec, static: StaticShape | None = None) -> list[str]:
    # a static graph takes its rotary tables instead of positions (see StaticShape)
    names = ["input_ids", "position_ids", "attention_bias"] if static is None else ["input_ids", "attention_bias"]
    if has_sliding(spec):
        names.append("sliding_attention_bias")
    if static is not None:
        names += [f"rope_{f}.{j}" for j in range(len(rope_bases(spec))) for f in ("cos", "sin")]
        names.append("kv_slot_source")
    for i in range(spec.n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


_NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "qk_norm", "norm")


def is_float_node(name: str) -> bool:
    """Whether a node of a static graph belongs to an RMSNorm, a residual add or a weight's column
    scale (by the names the builder gives them), which quantizers keep in float
    (sparsedge.quantize.onnx._float_nodes)."""
    parts = name.split(".")
    return "residual" in parts or "colscale" in parts or any(n in parts for n in _NORMS)


def rope_tables(spec: ModelSpec, positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Host-side rotary tables of a static graph: per rope base (rope_bases order), cos and sin
    float32 [1, k, 1, hd] for positions [k], as torch_model.rope computes them."""
    hd = spec.head_dim
    pos = np.asarray(positions, dtype=np.float32).reshape(-1) / np.float32(spec.rope_linear_factor)
    out = []
    for theta in rope_bases(spec):
        inv = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
        ang = pos[:, None] * inv[None, :]  # [k, hd/2]
        emb = np.concatenate([ang, ang], axis=-1)[None, :, None, :]  # [1, k, 1, hd]
        out.append((np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)))
    return out


def output_names(spec: ModelSpec) -> list[str]:
    names = ["logits"]
    for i in range(spec.n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def has_sliding(spec: ModelSpec) -> bool:
    return any(spec.window(i) is not None for i in range(spec.n_layers))


class _Graph:
    """A small ONNX graph builder: named initializers, shared constants, one call per node."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict = {}
        self._n = 0

    def init(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=None) -> str:
        a = np.asarray(value, dtype=dtype or (np.int64 if isinstance(value, (list, tuple, int)) else np.float32))
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const.{len(self._consts)}", a)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str = "", outputs: int | list[str] = 1, **attrs):
        """Append a node; returns its output name, or the list of them when there are several.
        outputs: how many (named after the node), or the graph-level names to give them."""
        from onnx import helper

        self._n += 1
        base = f"{name or op_type.lower()}.{self._n}"
        outs = outputs if isinstance(outputs, list) else [f"{base}.out{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _np(t) -> np.ndarray:
    """A torch tensor (or array) as float32 numpy."""
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _rms_norm_fp16(g: "_Graph", x: str, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) over the last axis, written for NPUs that run float ops in fp16
    and flush its subnormals (< 6.1e-5) to zero, as QNN HTP does.

    SmolLM2's massive activation (2.3e4) squares past fp16's 65504; scaling every row down by a
    constant (x / 256, as this graph once did) pushes a quiet token's squares below 6.1e-5, and
    dividing by the row's largest magnitude m takes 1/m to zero (measured on the emulated HTP: 9%
    error on a row of magnitude 0.003 with x / 256, 100% on the massive row with x / m). So only
    rows with m > 128 are scaled, by s = 128 / max(m, 128) >= 0.002: their squares stay <= 128^2
    and their mean >= 128^2 / H, while other rows keep their own squares (HTP: <= 0.2% error on
    every row). Exact for any s > 0:
        x / sqrt(mean(x^2) + eps) = u / sqrt(mean(u^2) + eps s^2),  u = x s.
    Shapes: x [.., H] -> [.., H]."""
    m = g.op("ReduceMax", g.op("Abs", x, name=name + ".abs"), g.const([-1]), keepdims=1, name=name + ".absmax")
    # s = 1 / (max(m, 128) / 128): HTP divides by multiplying with a reciprocal, and 1 / m itself
    # (4e-5 for m = 2.3e4) would be flushed to zero
    t = g.op("Mul", g.op("Max", m, g.const(128.0), name=name + ".limit"), g.const(1.0 / 128), name=name + ".over")
    sc = g.op("Reciprocal", t, name=name + ".rescale")  # [.., 1] in [1/512, 1]
    u = g.op("Mul", x, sc, name=name + ".unit")  # |u| <= 128
    ms = g.op("ReduceMean", g.op("Mul", u, u, name=name + ".sq"), g.const([-1]), keepdims=1, name=name + ".mean")
    e = g.op("Mul", sc, g.const(float(np.sqrt(eps))), name=name + ".epsroot")  # sqrt(eps) s
    rms = g.op("Sqrt", g.op("Add", ms, g.op("Mul", e, e, name=name + ".epssq"), name=name + ".eps"),
               name=name + ".sqrt")
    return g.op("Div", u, rms, name=name + ".div")


def check_supported(spec: ModelSpec, static: bool = False) -> None:
    """Raise SparsedgeError for what the graph below does not compute or has not been checked to
    compute. The dynamic graph adds Qwen2's q/k/v biases (and its int4/int8/QDQ variants keep the
    Adds); the static (NPU) graphs refuse them for now: their QDQ quantization and the emulated HTP
    backend have not been tested with the bias Adds (tests/runtimes/test_npu.py pins the refusal)."""
    if spec.qkv_bias and static:
        raise SparsedgeError(
            f"the NPU static graphs do not support q/k/v biases ({spec.arch}) yet; "
            "export the onnx or gguf format instead"
        )


def _build_graph(spec: ModelSpec, weights: Mapping[str, Any], recipe, static: StaticShape | None = None):
    """The decoder as an onnx.ModelProto, op by op (see the module docstring for the contract).

    The math is sparsedge.runtimes.torch_model.Decoder's, written in standard ONNX ops (opset 18)
    the way ONNX Runtime's graph optimiser recognises them: RMSNorm as Pow/ReduceMean/Add/Sqrt/
    Div/Mul (fused into (Skip)SimplifiedLayerNormalization), SiLU as x * Sigmoid(x) (QuickGelu).
    Two algebraic foldings keep nodes out of every layer: the attention scale is folded into the
    q projection (or into q's norm weight when q is normalised, the norm being scale-invariant) and
    Gemma's norm offset (1 + w) into the norm weights. ``static`` fixes every shape (StaticShape).
    """
    import torch
    from onnx import TensorProto, helper

    from ..runtimes.torch_model import _ACTS, check_shapes

    check_supported(spec, static is not None)
    w = {k: _np(v) for k, v in weights.items()}
    if "lm_head" not in w:
        if not spec.tie_embeddings:
            raise SparsedgeError("model has no lm_head and does not tie embeddings")
        w["lm_head"] = w["embed"]
    check_shapes(spec, {k: torch.from_numpy(v) for k, v in w.items()})
    if spec.act not in _ACTS:
        raise SparsedgeError(f"activation {spec.act!r} is not supported by the ONNX exporter")
    H, I = spec.hidden_size, spec.intermediate_size
    nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group = nh // nkv
    sites = recipe.sites if recipe is not None else {}
    g = _Graph()

    def nw(name: str) -> np.ndarray:  # a norm weight with Gemma's (1 + w) offset folded in
        return w[name] + np.float32(spec.norm_offset)

    def norm(x: str, weight: np.ndarray, wname: str) -> str:
        # ops named after the norm: quantizers keep NORM_OPS of static graphs in float by name
        wt = g.init(wname, weight.astype(np.float32))
        eps = spec.rms_eps
        if static is not None:
            return g.op("Mul", _rms_norm_fp16(g, x, eps, wname), wt, name=wname + ".scale")
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0), name=wname + ".pow"), g.const([-1]), keepdims=1,
                  name=wname + ".mean")
        rms = g.op("Sqrt", g.op("Add", ms, g.const(eps), name=wname + ".eps"), name=wname + ".sqrt")
        return g.op("Mul", g.op("Div", x, rms, name=wname + ".div"), wt, name=wname + ".scale")

    def linear(x: str, wname: str, weight: np.ndarray, name: str, outputs: int | list[str] = 1) -> str:
        """x @ weight ([in, out]). In a static graph as (x @ (weight / c)) * c with c [out] the
        column maxima: NPU quantizers give a MatMul weight one 8-bit scale (QNN has no per-channel
        MatMul), and SmolLM2's columns differ enough in range that per-tensor weights cost most of
        the quantization error (rel. logit error 0.37 vs 0.04 with 16-bit weights); equal column
        ranges make that one scale as good as one per channel. The Mul by c stays in float."""
        if static is None:
            return g.op("MatMul", x, g.init(wname, weight), name=name, outputs=outputs)
        c = np.abs(weight).max(axis=0).astype(np.float32)
        c[c == 0] = 1.0
        y = g.op("MatMul", x, g.init(wname, weight / c), name=name)
        return g.op("Mul", y, g.init(wname + ".colscale", c), name=name + ".colscale", outputs=outputs)

    def sparse(site: str, layer: int, x: str) -> str:
        if site not in sites:
            return x
        t = g.init(SPARSITY_INIT.format(i=layer, site=site), np.asarray(sites[site].thresholds[layer], np.float32))
        keep = g.op("GreaterOrEqual", g.op("Abs", x), t, name=f"layers.{layer}.sparsity.{site}")
        return g.op("Where", keep, x, g.const(0.0))

    def act(x: str) -> str:
        if spec.act == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        # gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = g.op("Add", x, g.op("Mul", g.op("Pow", x, g.const(3.0)), g.const(0.044715)))
        t = g.op("Tanh", g.op("Mul", inner, g.const(float(np.sqrt(2.0 / np.pi)))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", t, g.const(1.0)))

    # ---- inputs, embeddings, rotary tables ----
    x = g.op("Gather", g.init("embed", w["embed"]), "input_ids")  # [b, s, H]
    if spec.embed_scale != 1.0:
        x = g.op("Mul", x, g.const(spec.embed_scale))
    tables: dict[float, tuple[str, str]] = {}
    if static is not None:  # host-computed tables [1, k, 1, hd] (see StaticShape)
        tables = {theta: (f"rope_cos.{j}", f"rope_sin.{j}") for j, theta in enumerate(rope_bases(spec))}
    else:
        pos = g.op("Cast", "position_ids", to=TensorProto.FLOAT)
        if spec.rope_linear_factor != 1.0:
            pos = g.op("Div", pos, g.const(spec.rope_linear_factor))
        pos = g.op("Unsqueeze", pos, g.const([-1]))  # [b, s, 1]
        for theta in rope_bases(spec):
            # inverse frequencies exactly as torch_model.rope computes them
            inv = (1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))).numpy()
            ang = g.op("Mul", pos, g.const(inv))  # [b, s, hd/2]
            emb = g.op("Unsqueeze", g.op("Concat", ang, ang, axis=-1), g.const([2]))  # [b, s, 1, hd]
            tables[theta] = (g.op("Cos", emb, name="rope.cos"), g.op("Sin", emb, name="rope.sin"))
    if static is None:
        biases = {None: g.op("Unsqueeze", "attention_bias", g.const([2]))}  # [b, 1, 1, s, p+s]
        if has_sliding(spec):
            biases["sliding"] = g.op("Unsqueeze", "sliding_attention_bias", g.const([2]))
    else:  # [1, 1, k, C+k], broadcast over [n_kv, group, k, C+k] below
        biases = {None: "attention_bias", "sliding": "sliding_attention_bias"}

    # ---- layers ----
    scale = np.float32(spec.scale)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        h = sparse("qkv_in", i, norm(x, nw(p + "attn_norm"), p + "attn_norm"))
        # [in, out] weights; q, k, v read the same input so they are one MatMul, unless a recipe
        # sparsifies q's input alone. Without q/k norms the attention scale is folded into W_q.
        wq = w[p + "q"].T * (np.float32(1.0) if spec.qk_norm else scale)
        if "q_in" in sites:
            q_ = linear(sparse("q_in", i, h), p + "q", wq, p + "q_proj")
            kv_ = linear(h, p + "kv", np.concatenate([w[p + "k"].T, w[p + "v"].T], 1), p + "kv_proj")
            qkv = g.op("Concat", q_, kv_, axis=-1)
        else:
            wqkv = np.concatenate([wq, w[p + "k"].T, w[p + "v"].T], axis=1)
            qkv = linear(h, p + "qkv", wqkv, p + "qkv_proj")
        if spec.qkv_bias:
            # Qwen2: one Add of [q_bias, k_bias, v_bias] [(nh + 2 nkv) hd] onto the projection's
            # [b, s, (nh + 2 nkv) hd], before the heads are split and RoPE turns q and k (as the
            # torch reference adds them). q's part takes the attention scale folded into W_q:
            # (x W_q + b_q) scale = x (W_q scale) + b_q scale. A separate node (not a bias input of
            # the MatMul) keeps every projection the plain MatMul(x, W) the weight quantizers take.
            bq = w[p + "q_bias"] * (np.float32(1.0) if spec.qk_norm else scale)
            bqkv = np.concatenate([bq, w[p + "k_bias"], w[p + "v_bias"]]).astype(np.float32)
            qkv = g.op("Add", qkv, g.init(p + "qkv_bias", bqkv), name=p + "qkv_bias")
        qkv = g.op("Reshape", qkv, g.const([0, 0, nh + 2 * nkv, hd]))  # [b, s, heads, hd]
        qk, v = g.op("Split", qkv, g.const([nh + nkv, nkv]), axis=2, outputs=2)
        if spec.qk_norm:  # per-head norms of q (times the attention scale) and k, as one weight
            qn, kn = nw(p + "q_norm") * scale, nw(p + "k_norm")
            qk = norm(qk, np.concatenate([np.broadcast_to(qn, (nh, hd)), np.broadcast_to(kn, (nkv, hd))]),
                      p + "qk_norm")
        cos, sin = tables[spec.theta(i)]
        x1, x2 = g.op("Split", qk, g.const([hd // 2, hd // 2]), axis=-1, outputs=2)
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)  # rotate_half: [-x2, x1]
        qk = g.op("Add", g.op("Mul", qk, cos), g.op("Mul", rot, sin), name=p + "rope")
        q, k = g.op("Split", qk, g.const([nh, nkv]), axis=2, outputs=2)
        bias = biases["sliding" if spec.window(i) else None]
        if static is None:
            a = _attention(g, p, i, q, k, v, bias, nkv, group, hd)
        else:
            a = _attention_static(g, p, i, q, k, v, bias, nkv, group, hd, static)
        a = linear(sparse("o_in", i, a), p + "o", w[p + "o"].T, p + "o_proj")
        if spec.sandwich_norm:
            a = norm(a, nw(p + "post_attn_norm"), p + "post_attn_norm")
        x = g.op("Add", x, a, name=p + "residual")
        h = sparse("ffn_in", i, norm(x, nw(p + "ffn_norm"), p + "ffn_norm"))
        gu = linear(h, p + "gate_up", np.concatenate([w[p + "gate"].T, w[p + "up"].T], 1), p + "gate_up_proj")
        gate, up = g.op("Split", gu, g.const([I, I]), axis=-1, outputs=2)
        m = sparse("down_in", i, g.op("Mul", sparse("gate_act", i, act(gate)), up))
        f = linear(m, p + "down", w[p + "down"].T, p + "down_proj")
        if spec.sandwich_norm:
            f = norm(f, nw(p + "post_ffn_norm"), p + "post_ffn_norm")
        x = g.op("Add", x, f, name=p + "residual")

    logits = linear(norm(x, nw("norm"), "norm"), "lm_head", w["lm_head"].T, "lm_head",
                  outputs=["logits.raw" if spec.final_logit_softcap else "logits"])
    if spec.final_logit_softcap:
        c = g.const(float(spec.final_logit_softcap))
        g.op("Mul", g.op("Tanh", g.op("Div", logits, c)), c, outputs=["logits"])

    # ---- signature ----
    F32, I64 = TensorProto.FLOAT, TensorProto.INT64
    if static is None:
        b, s, past, total = "batch", "seq", "past", "total"
        kv_out = [b, nkv, total, hd]
    else:
        b, s, past, total = 1, static.tokens, static.context, static.context  # keys: the C slots
        kv_out = [s, nkv * hd]
    bias_shape = [b, 1, s, total]
    kv_in = [b, nkv, past, hd] if static is None else [past, nkv * hd]
    types = {"input_ids": (I64, [b, s]), "position_ids": (I64, [b, s]),
             "attention_bias": (F32, bias_shape), "sliding_attention_bias": (F32, bias_shape)}
    if static is not None:
        types["kv_slot_source"] = (I64, [static.context])
    for name in input_names(spec, static):
        if name.startswith("rope_"):
            types[name] = (F32, [1, s, 1, hd])
    inputs = [helper.make_tensor_value_info(n, *types[n]) if n in types
              else helper.make_tensor_value_info(n, F32, kv_in) for n in input_names(spec, static)]
    outputs = [helper.make_tensor_value_info("logits", F32, [b, s, spec.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, F32, kv_out) for n in output_names(spec)[1:]]
    graph = helper.make_graph(g.nodes, "sparsedge_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sparsedge")
    model.ir_version = IR_VERSION
    return model


def _attention(g: _Graph, p: str, i: int, q, k, v, bias, nkv: int, group: int, hd: int) -> str:
    """Grouped-query attention of the dynamic graph. q [b, s, nh, hd], k/v [b, s, nkv, hd] (new
    entries), bias [b, 1, 1, s, p+s]; appends to the cache (present = concat(past, new)) and returns
    [b, s, nh * hd]. Query heads are viewed as [nkv, group] so K/V are never repeated."""
    k = g.op("Concat", f"past_key_values.{i}.key", g.op("Transpose", k, perm=[0, 2, 1, 3]), axis=2,
             outputs=[f"present.{i}.key"])  # [b, nkv, p+s, hd]
    v = g.op("Concat", f"past_key_values.{i}.value", g.op("Transpose", v, perm=[0, 2, 1, 3]), axis=2,
             outputs=[f"present.{i}.value"])
    q = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, nkv, group, hd])), perm=[0, 2, 3, 1, 4])
    kt = g.op("Transpose", g.op("Unsqueeze", k, g.const([2])), perm=[0, 1, 2, 4, 3])  # [b, nkv, 1, hd, p+s]
    scores = g.op("Add", g.op("MatMul", q, kt), bias)
    probs = g.op("Softmax", scores, axis=-1, name=p + "attn")  # [b, nkv, g, s, p+s]
    a = g.op("MatMul", probs, g.op("Unsqueeze", v, g.const([2])))  # [b, nkv, g, s, hd]
    return g.op("Reshape", g.op("Transpose", a, perm=[0, 3, 1, 2, 4]), g.const([0, 0, group * nkv * hd]))


def _attention_static(g: _Graph, p: str, i: int, q, k, v, bias, nkv: int, group: int, hd: int,
                      static: StaticShape) -> str:
    """The same attention with batch 1 and every tensor of rank <= 4 (StaticShape). q [1, k, nh, hd],
    k/v [1, k, nkv, hd]; past [C, nkv * hd] (slot-major: writing a slot is a row, and the gather
    that writes them is the embedding's plain row gather, which HTP runs correctly where a gather
    along axis 2 of [1, nkv, C+k, hd] gave wrong results); bias [1, 1, k, C]. Outputs only the new
    entries (present [k, nkv * hd]); returns [1, k, nh * hd].

    The new entries are written into their cache slots inside the graph (slot c reads row
    kv_slot_source[c] of [past; new]: c, or C + the new row written there), and attention reads the
    C slots only. So a key sits in the same column whether it came in this call or an earlier one:
    an NPU's fp16 softmax and value sums then add the same terms in the same order for a token
    alone, in a chain, in a tree or after keep(), and its logits are bit-identical. (With the new
    keys in C extra columns, HTP's rows differed by up to 0.08 logits between the two.) Once
    quantized, past, present and the cache share one 16-bit scale per layer and kind and cross the
    graph's boundary as integers (sparsedge.quantize.onnx._probe_static, _kv_as_integers): Concat,
    Slice and Gather then move integers unchanged, and an entry read back from the cache is the one
    the call computed (HTP hands float outputs over in fp16, which a float cache would round)."""
    s, C = static.tokens, static.context

    def write(new: str, kind: str) -> str:  # new [1, k, nkv, hd] -> the cache [C, nkv, hd]
        new = g.op("Reshape", new, g.const([s, nkv * hd]))
        both = g.op("Concat", f"past_key_values.{i}.{kind}", new, axis=0, outputs=[f"kv.{i}.{kind}"])  # [C+k, nkv*hd]
        # present: the new entries as concatenated (on the cache's scale once quantized)
        g.op("Slice", both, g.const([C]), g.const([C + s]), g.const([0]), outputs=[f"present.{i}.{kind}"])
        cache = g.op("Gather", both, "kv_slot_source", axis=0, outputs=[f"cache.{i}.{kind}"])  # [C, nkv*hd]
        return g.op("Reshape", cache, g.const([C, nkv, hd]))

    kk = g.op("Transpose", write(k, "key"), perm=[1, 2, 0])  # [nkv, hd, C]
    vv = g.op("Transpose", write(v, "value"), perm=[1, 0, 2])  # [nkv, C, hd]
    # queries [k, nh, hd] -> [nkv, group * k, hd]: row (g, t) of head group n
    qq = g.op("Transpose", g.op("Reshape", q, g.const([s, nkv, group, hd])), perm=[1, 2, 0, 3])  # [nkv, g, k, hd]
    qq = g.op("Reshape", qq, g.const([nkv, group * s, hd]))
    scores = g.op("MatMul", qq, kk)  # [nkv, g*k, C]
    scores = g.op("Add", g.op("Reshape", scores, g.const([nkv, group, s, C])), bias)
    probs = g.op("Softmax", scores, axis=-1, name=p + "attn")  # [nkv, g, k, C]
    a = g.op("MatMul", g.op("Reshape", probs, g.const([nkv, group * s, C])), vv)  # [nkv, g*k, hd]
    a = g.op("Transpose", g.op("Reshape", a, g.const([nkv, group, s, hd])), perm=[2, 0, 1, 3])  # [k, nkv, g, hd]
    return g.op("Reshape", a, g.const([1, s, nkv * group * hd]))


def recipe_summary(recipe) -> dict[str, Any] | None:
    if recipe is None:
        return None
    return {
        "method": recipe.method, "target_sparsity": recipe.target_sparsity,
        "sites": sorted(recipe.sites), "chunk_size": recipe.chunks.size if recipe.chunks else None,
        "permuted": bool(recipe.chunks and recipe.chunks.permutation),
    }


def metadata(spec: ModelSpec, recipe=None, mask_value: float = MASK_VALUE,
             static: StaticShape | None = None) -> dict[str, str]:
    """The ``sparsedge.*`` metadata entries every sparsedge ONNX graph carries."""
    extra = {} if static is None else {"sparsedge.static": json.dumps(
        {"context": static.context, "tokens": static.tokens}, separators=(",", ":"))}
    return {**extra,
        "sparsedge.format": str(ONNX_FORMAT),
        "sparsedge.spec": json.dumps(spec.to_dict(), separators=(",", ":")),
        "sparsedge.mask_value": repr(float(mask_value)),
        "sparsedge.recipe": json.dumps(recipe_summary(recipe), separators=(",", ":")),
    }


def set_metadata(model, entries: Mapping[str, str]) -> None:
    """Set (replace) metadata_props entries of an onnx.ModelProto in place."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        model.metadata_props.add(key=k, value=v)


def read_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def save_model(model, path: Path) -> Path:
    """Save an onnx.ModelProto as one file, or with its weights in ``<name>.data`` beside it when
    they exceed what one protobuf can hold. Returns the path of the graph."""
    import onnx

    path = Path(path)
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    for old in path.parent.glob(path.name + ".data"):
        old.unlink()
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _install(tmp: Path, out_dir: Path, file_name: str = MODEL_FILE) -> None:
    """Move the files of tmp into out_dir: the whole folder at once if out_dir is new, else file by
    file (each os.replace is atomic); a stale side file of an earlier export is removed."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    names = {p.name for p in tmp.iterdir()}
    for p in tmp.iterdir():
        os.replace(p, out_dir / p.name)
    stale = out_dir / (file_name + ".data")
    if stale.exists() and stale.name not in names:
        stale.unlink()


def export_onnx(
    spec: ModelSpec,
    weights: Mapping[str, Any],
    out_dir: str | Path,
    recipe=None,
    progress: bool = True,
    weights_permuted: bool = False,
    static: StaticShape | None = None,
    file_name: str = MODEL_FILE,
) -> Path:
    """Write ``out_dir/model.onnx`` (fp32, KV cache in/out; see the module docstring) and return its path.

    weights: canonical fp32 torch tensors (LoadedModel.state_dict()). recipe: an optional
    SparsityRecipe whose thresholds become part of the graph; its chunk permutation is applied to a
    copy of the weights first unless ``weights_permuted`` says they are in the recipe's neuron order
    already (as sparsedge.export.artifact hands them). static: fixed shapes for NPU compilers
    (StaticShape); file_name: the graph's name in out_dir.
    """
    import onnx
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).expanduser()
    if recipe is not None:
        recipe.validate(spec)
        if recipe.chunks is not None and recipe.chunks.routing_window:
            raise SparsedgeError("chunk routing (top chunks per window) cannot be exported to ONNX yet")
        if recipe.chunks is not None and recipe.chunks.permutation and not weights_permuted:
            from ..sparsify.chunks import permute_ffn

            weights = dict(weights)  # permute_ffn replaces entries; the caller's dict stays as it is
            for layer, perm in enumerate(recipe.chunks.permutation):
                permute_ffn(weights, layer, perm)
    bar = tqdm(total=3, desc="onnx export", unit="step", disable=not progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        model = _build_graph(spec, weights, recipe, static)
        bar.update()
        model.doc_string = "sparsedge decoder with KV cache; see sparsedge.export.onnx"
        set_metadata(model, metadata(spec, recipe, MASK_VALUE if static is None else STATIC_MASK_VALUE, static))
        path = save_model(model, tmp / file_name)
        del model
        bar.update()
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise SparsedgeError(f"exported ONNX graph does not validate: {e}") from e
        bar.update()
        _install(tmp, out_dir, file_name)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / file_name
