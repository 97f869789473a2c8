"""ONNX quantization of a sparsedge decoder graph (sparsedge.export.onnx) with ONNX Runtime's tools.

Kinds (registry KINDS; an unknown one fails with the list):

- ``int4``: weight-only 4-bit blocks of 32 with a fitted scale and offset per block (fit_blocks:
  least squares over a few level counts, as llama.cpp's K-quants search their scales), run as
  ``MatMulNBits`` (accuracy_level 4) plus the offsets' term blocksum(x) @ offsets in fp32
  (_int4_fit says why not as float zero points); the output head gets 8-bit blocks. On
  SmolLM2-135M: perplexity 17.14 against fp32's 16.90 (+1.4%, all of it from the kernel's int8
  activations: 16.90 at accuracy level 0, which runs at 6 tok/s), where symmetric RTN loses 36%
  (23.06). Its weights come from a Q4_1 GGUF, whose grid (scale and float minimum per 32-block)
  the fit recovers exactly, and its head from Q8_0; a model with float weights loses more (the
  error of asymmetric RTN or less, by construction). The offset ops cost about 17% of decode
  speed against int4sym on ONNX Runtime's CPU kernels (75 against 90 tok/s, one prompt).
- ``int4sym``: symmetric round-to-nearest 4-bit blocks, every MatMul (MatMulNBitsQuantizer, block
  32, accuracy_level 4 = int8 activations in the CPU kernel): what OpenVINO's NPU compiler and
  ONNX Runtime GenAI's builder produce.
- ``int8``: dynamic quantization (quantize_dynamic), int8 weights, activations quantized per call;
  only MatMuls with a constant weight (attention's activation x activation MatMuls stay float).
  Per-tensor activation ranges suffer from massive activations (see qdq): on SmolLM2-135M its
  perplexity is worse than int4's (23.8 vs 23.1, fp32 16.9; first 2048 held-out tokens).
- ``int8w``: weight-only 8-bit blocks, ``MatMulNBits`` with bits=8 (block 32, symmetric, accuracy
  level 4): on SmolLM2-135M perplexity within 1% of fp32 (17.08 vs 16.90), 41% of its size.
- ``qdq``: static QuantizeLinear/DequantizeLinear pairs around every op, calibrated on token
  windows of our calibration corpus with the KV cache filled by the fp32 graph (so past inputs get
  real ranges). Activations uint16 and weights uint8 by default, as Qualcomm's HTP needs
  (get_qnn_qdq_config). Shapes stay dynamic here; an NPU deployment fixes them later.
  Per-tensor activation ranges cannot hold models with massive activations: SmolLM2-135M's
  layer-11 down projection emits 2.3e4 in channel 507 against a median of 0.7, and its A16W8
  graph is unusable (top-1 agreement 8% with fp32; A16W16 no better). Such models need those
  tensors kept in float or rescaled before QDQ, which this kind does not do yet.

Every call returns a report (style §8: quantizers report their error): MatMuls converted, op counts,
file sizes, and max |logit difference| against the fp32 graph on a probe sequence (a prefill and
single decode steps with the cache). The ``sparsedge.*`` metadata of the source is carried over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import SparsedgeError

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
QDQ_TYPES = ("uint8", "uint16", "int8", "int16")
# calibration: each sample is `step` new tokens after a cache of `prefix` tokens
CALIB_WINDOWS, CALIB_PREFIX, CALIB_STEP = 8, 48, 16
PROBE_PREFILL, PROBE_STEPS = 32, 4


def _files(path: Path) -> list[Path]:
    """A graph and its external data file, if any."""
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise SparsedgeError(f"{path} is not an ONNX model: {type(e).__name__}: {e}") from e


def _linear_matmuls(model) -> list[str]:
    """Names of the MatMuls that are linear layers: a weight initializer as second input."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


# ---- kinds ----------------------------------------------------------------------------------------


def _nbits(bits: int):
    def run(src: Path, dst: Path, opts: dict[str, Any]) -> int:
        return _matmul_nbits(src, dst, opts, bits)
    return run


def _matmul_nbits(src: Path, dst: Path, opts: dict[str, Any], bits: int) -> int:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        str(src), bits=bits, block_size=opts.get("block_size", BLOCK_SIZE),
        is_symmetric=opts.get("symmetric", True), accuracy_level=opts.get("accuracy_level", ACCURACY_LEVEL),
    )
    q.process()
    _finish(q.model.model, src, dst)
    return _ops(q.model.model)["MatMulNBits"]


# Level counts tried per block by fit_blocks (16 down to 11 levels of 4 bits): a block whose
# values use fewer levels than the full range (a Q4_1 block with no weight at q = 15) is fitted
# exactly with its own count; more candidates found nothing on SmolLM2.
FIT_LEVELS, FIT_ITERS = 6, 3
# the output head's weight initializer (sparsedge.export.onnx names it so)
HEAD = "lm_head"
HEAD_BITS = 8


def fit_blocks(w: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block quantization with fitted parameters: w [B, g] (one block per row) ->
    (q [B, g] ints in 0..2^bits-1, scale [B], zero [B] float, squared error [B]) with
    w ~ (q - zero) * scale.

    For each candidate level count L (2^bits-1 down): start from the block's min/max grid with L
    steps, then alternate rounding and a least-squares refit of (scale, offset) to the rounded
    levels; keep the best error seen, the plain min/max grid included, so the result is never worse
    than asymmetric round-to-nearest with a float zero point."""
    w = np.asarray(w, np.float64)
    qmax = 2**bits - 1
    n = w.shape[1]
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    best_err = np.full((w.shape[0], 1), np.inf)
    best_a, best_b = np.ones_like(lo), lo.copy()

    def err_of(a, b):
        q = np.clip(np.rint((w - b) / a), 0, qmax)
        return q, ((a * q + b - w) ** 2).sum(1, keepdims=True)

    for levels in range(qmax, max(qmax - FIT_LEVELS, 0), -1):
        a, b = span / levels, lo
        for it in range(FIT_ITERS + 1):
            q, e = err_of(a, b)
            better = e < best_err
            best_err = np.where(better, e, best_err)
            best_a, best_b = np.where(better, a, best_a), np.where(better, b, best_b)
            if it == FIT_ITERS:
                break
            # least squares w ~ a q + b over the block, q fixed
            sq, sqq = q.sum(1, keepdims=True), (q * q).sum(1, keepdims=True)
            sw, sqw = w.sum(1, keepdims=True), (q * w).sum(1, keepdims=True)
            det = n * sqq - sq * sq
            a_new = (n * sqw - sq * sw) / np.where(det > 0, det, 1.0)
            ok = (det > 0) & (a_new > 0)
            a = np.where(ok, a_new, a)
            b = np.where(ok, (sw - a * sq) / n, b)
    q, e = err_of(best_a, best_b)
    return q.astype(np.int32), best_a[:, 0], (-best_b / best_a)[:, 0], e[:, 0]


def _pack4(q: np.ndarray) -> np.ndarray:
    """[N, n_blocks, block] ints 0..15 -> MatMulNBits's B layout [N, n_blocks, block / 2] uint8, the
    even element in the low nibble."""
    q = q.astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _int4_fit(src: Path, dst: Path, opts: dict[str, Any]) -> int:
    """Every linear MatMul x @ W (W [K, N], K a multiple of the block) becomes

        MatMulNBits(x; q, scale, zero point 0) + blocksum(x) @ offset

    with w = scale q + offset per 32-block from fit_blocks. The offset rides beside the 4-bit
    weights instead of as MatMulNBits's float zero point because ONNX Runtime's CPU kernels take
    the float-zero-point path ten times slower (9.4 against 90 tok/s on SmolLM2-135M); blocksum(x)
    [.., K/32] is computed once per input and offset is a small fp32 matrix [K/32, N] (1/8 of the
    4-bit payload). The output head gets 8-bit symmetric blocks (MatMulNBitsQuantizer)."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = opts.get("block_size", BLOCK_SIZE)
    acc = opts.get("accuracy_level", ACCURACY_LEVEL)
    model = _load(src)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    used = Counter(i for n in g.node for i in n.input)
    nodes, added, errors, sums = [], [], {}, {}
    axes = "sparsedge.int4.axes"
    added.append(numpy_helper.from_array(np.asarray([-1], np.int64), axes))
    for node in g.node:
        wname = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = numpy_helper.to_array(inits[wname]) if wname in inits and wname != HEAD else None
        if w is None or w.ndim != 2 or w.shape[0] % block or used[wname] != 1:
            nodes.append(node)
            continue
        k, n = w.shape
        nb = k // block
        q, scale, offset, err = fit_blocks(w.T.reshape(n * nb, block))  # blocks along K, per column
        errors[node.name] = float(np.sqrt(err.sum() / max(float((w.astype(np.float64) ** 2).sum()), 1e-30)))
        offset = scale * -offset  # fit_blocks' zero point back to the additive offset
        base = f"{wname}.int4"
        added += [
            numpy_helper.from_array(_pack4(q.reshape(n, nb, block)), base + ".q"),
            numpy_helper.from_array(scale.astype(np.float32), base + ".scales"),
            numpy_helper.from_array(np.zeros(n * ((nb + 1) // 2), np.uint8), base + ".zero_points"),
            numpy_helper.from_array(np.ascontiguousarray(offset.reshape(n, nb).T, np.float32), base + ".offsets"),
        ]
        x = node.input[0]  # [batch, seq, K], as every sparsedge decoder graph has it
        if x not in sums:
            shape = f"{x}.int4.blocks"
            added.append(numpy_helper.from_array(np.asarray([0, 0, nb, block], np.int64), shape))
            sums[x] = f"{x}.int4.blocksum"
            nodes += [helper.make_node("Reshape", [x, shape], [f"{x}.int4.blocked"], name=f"{x}.int4.reshape"),
                      helper.make_node("ReduceSum", [f"{x}.int4.blocked", axes], [sums[x]], keepdims=0,
                                       name=f"{x}.int4.blocksum")]
        nodes += [
            helper.make_node("MatMulNBits", [x, base + ".q", base + ".scales", base + ".zero_points"],
                             [base + ".y"], name=node.name + ".int4", domain="com.microsoft",
                             K=k, N=n, bits=4, block_size=block, accuracy_level=acc),
            helper.make_node("MatMul", [sums[x], base + ".offsets"], [base + ".y_offset"], name=node.name + ".offset"),
            helper.make_node("Add", [base + ".y", base + ".y_offset"], list(node.output), name=node.name + ".add"),
        ]
        g.initializer.remove(inits.pop(wname))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    head = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] == HEAD]
    rest = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and n.name not in head]
    if head or rest:  # the head at 8 bits; MatMuls the fit could not take (K off the block) at 4
        for names, bits in ((head, HEAD_BITS), (rest, 4)):
            if names:
                # nodes_to_include adds to the op types quantized; exclusion is what restricts
                others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
                qz = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                          accuracy_level=acc, nodes_to_exclude=others)
                qz.process()
                model = qz.model.model
    rel = np.array(list(errors.values()) or [0.0])
    opts["weight_error"] = {"rel_rms_mean": round(float(rel.mean()), 6), "rel_rms_max": round(float(rel.max()), 6),
                            "worst": max(errors, key=errors.get) if errors else None,
                            "fitted": len(errors), "head_bits": HEAD_BITS if head else None}
    _finish(model, src, dst)
    return len(errors) + len(head) + len(rest)


def _int8(src: Path, dst: Path, opts: dict[str, Any]) -> int:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
        per_channel=opts.get("per_channel", False),
        extra_options={"MatMulConstBOnly": True}, use_external_data_format=_needs_external(src),
    )
    model = _load(dst)
    _finish(model, src, dst)
    return _ops(model)["MatMulInteger"] + _ops(model)["DynamicQuantizeMatMul"]


def _qdq(src: Path, dst: Path, opts: dict[str, Any]) -> int:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from ..export.onnx import read_metadata

    types = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16,
             "int8": QuantType.QInt8, "int16": QuantType.QInt16}
    act, wt = opts["activation_type"], opts["weight_type"]
    # the graph is read once here (a static SmolLM2 graph is one 0.6 GB protobuf): metadata, float
    # nodes, then the outlier probe, which extends this copy's outputs
    model = _load_meta(src)
    static = "sparsedge.static" in read_metadata(model)
    reader = _CalibReader(src, opts["calib_ids"], opts.get("calib_windows", CALIB_WINDOWS), first=static)
    exclude, overrides = None, opts.get("scales")
    if static:
        outliers, kv = _probe_static(model, src.parent, reader, act)
        exclude = _float_nodes(model) + outliers
        opts["float_nodes"] = len(exclude)
        overrides = {**kv, **(overrides or {})}  # another graph's scales (which include these) win
        reader.rewind()
    cfg = get_qnn_qdq_config(str(src), reader, activation_type=types[act], weight_type=types[wt],
                             per_channel=opts.get("per_channel", False), nodes_to_exclude=exclude,
                             init_overrides=overrides)
    del model
    quantize(str(src), str(dst), cfg)
    model = _load(dst)
    if static:
        _kv_as_integers(model)
    _finish(model, src, dst)
    inits = {t.name for t in model.graph.initializer}
    dq_of_init = {n.output[0] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq_of_init)


KINDS: dict[str, Callable[[Path, Path, dict[str, Any]], int]] = {
    "int4": _int4_fit,
    "int4sym": _nbits(4),
    "int8": _int8,
    "int8w": _nbits(8),
    "qdq": _qdq,
}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise SparsedgeError(f"unknown ONNX quantization {kind!r} (known: {', '.join(KINDS)})")
    return kind


def _needs_external(src: Path) -> bool:
    return src.with_name(src.name + ".data").exists()


def _finish(model, src: Path, dst: Path) -> None:
    """Carry the source's sparsedge metadata over and save dst (one file when it fits)."""
    from ..export.onnx import read_metadata, save_model, set_metadata

    meta = {k: v for k, v in read_metadata(_load_meta(src)).items() if k.startswith("sparsedge.")}
    set_metadata(model, meta)
    save_model(model, dst)


def _load_meta(src: Path):
    import onnx

    return onnx.load(str(src), load_external_data=False)


# ---- calibration and probe ------------------------------------------------------------------------


def calibration_ids(calib, src: Path, required: bool = True) -> np.ndarray | None:
    """Token ids to calibrate (and probe) on: ``calib`` as ids, or a tokenizer over the calibration
    corpus; by default the tokenizer of the artifact folder the graph lies in (OUT/onnx/model.onnx
    beside OUT/tokenizer.json). None when there is none and ``required`` is false."""
    from ..data import calibration_text, tokenize

    if calib is None:
        for folder in (src.parent, src.parent.parent):
            if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                calib = AutoTokenizer.from_pretrained(str(folder))
                break
        else:
            if not required:
                return None
            raise SparsedgeError(
                "qdq quantization needs calibration tokens: pass calib= a tokenizer or token ids "
                f"(no tokenizer beside {src})"
            )
    if callable(calib) and hasattr(calib, "decode"):  # a transformers tokenizer
        return tokenize(calib, calibration_text())
    ids = np.asarray(calib)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise SparsedgeError("calib must be a tokenizer or a 1-D array of token ids")
    return ids.astype(np.int64)


def _cpu_runtime(path: Path):
    """A CPU runtime for a sparsedge graph: dynamic graphs through OnnxRuntime, static (NPU) graphs
    through NpuRuntime on the CPU provider."""
    from ..export.onnx import read_metadata

    if "sparsedge.static" in read_metadata(_load_meta(path)):
        from ..runtimes.npu import NpuRuntime

        return NpuRuntime([path], provider="cpu")
    from ..runtimes.onnxrt import OnnxRuntime

    return OnnxRuntime(path)


# ---- static (NPU) graphs: what stays in float, scales shared between graphs ------------------------

# A linear layer whose input reaches this magnitude on calibration text stays in float on an NPU
# (fp16 there): one uint16 scale over it would leave typical activations (~1) a few bits. On
# SmolLM2-135M that is layer 11's down projection, whose input reaches 2.8e3 (typically < 3) on
# the first token, where the model builds its massive activation (DESIGN.md; sparsedge.export.onnx).
OUTLIER_INPUT = 256.0


def _float_nodes(model) -> list[str]:
    """Nodes of a static graph that stay in float when it is quantized: every RMSNorm op, the
    residual adds and the weights' column scales (sparsedge.export.onnx.is_float_node). The
    residual stream carries SmolLM2's massive activation (2.3e4 in one channel on the first token,
    < 100 elsewhere): one 16-bit scale over it is too coarse for every other token,
    and clipping it breaks the attention sink that all later tokens rely on (top-1 agreement with
    fp32: 0-3%). fp16 holds both ends; the NPU runs these ops in fp16, the matmuls in A16W8."""
    from ..export.onnx import is_float_node

    return [n.name for n in model.graph.node if is_float_node(n.name)]


def _probe_static(model, folder: Path, reader: "_CalibReader", act: str):
    """One fp32 pass of a static graph over the calibration samples, for what its quantization
    needs beyond ranges per tensor:

    - the linear MatMuls whose activation input exceeds OUTLIER_INPUT (they stay in float);
    - one scale per layer and kind for the KV cache: the past input and past and new entries
      concatenated (sparsedge.export.onnx._attention_static; the present output and the cache
      are slices of the latter) quantize alike, so that Concat, Slice and Gather move integers
      unchanged and an entry read back from the cache equals the one computed in the call (what
      keeps a token's logits independent of the call that brought it). Their range: the union of
      the past inputs and presents seen.

    model: the fp32 graph as _load_meta read it from ``folder`` (its weights are loaded and its
    outputs extended, in place). Returns (MatMul names, init_overrides)."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(folder))  # a no-op for a graph in one file
    inits = {t.name for t in model.graph.initializer}
    mms = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    known = {o.name for o in model.graph.output}
    watch = list(dict.fromkeys(n.input[0] for n in mms))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in watch if t not in known)
    kv = [o for o in known if o.startswith("present.")]  # present.{i}.key / .value
    watch += kv
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo, hi = dict.fromkeys(watch, 0.0), dict.fromkeys(watch, 0.0)  # ranges include 0, as ORT's do
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        for t, v in zip(watch, sess.run(watch, feed)):
            past = feed.get(t.replace("present.", "past_key_values.", 1)) if t in kv else None
            for a in (v,) if past is None else (v, past):
                lo[t], hi[t] = min(lo[t], float(a.min())), max(hi[t], float(a.max()))
    outliers = [n.name for n in mms if max(-lo[n.input[0]], hi[n.input[0]]) > OUTLIER_INPUT]
    overrides = {}
    for t in kv:
        i, kind = t.split(".")[1:]
        q = _uniform_encoding(lo[t], hi[t], act)
        for name in (f"past_key_values.{i}.{kind}", f"kv.{i}.{kind}"):  # Slice and Gather share kv's
            overrides[name] = [q]
    return outliers, overrides


def _kv_as_integers(model) -> None:
    """Let a quantized static graph take its past KV inputs and give its present outputs as the
    integers of their QuantizeLinear / DequantizeLinear pairs (uint16 by default) instead of float,
    in place. Why: QNN HTP hands float outputs over in fp16, which rounds a 16-bit value by up to
    8 of its steps, so a float cache would not give back the integers the graph computed. Integers
    also halve the cache and its copies. The encodings stay in the graph (their scale and zero
    point initializers), shared by past and present (_probe_static)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    drop = []
    for inp in model.graph.input:
        if not inp.name.startswith("past_key_values."):
            continue
        qs = consumers.get(inp.name, [])  # input -> QuantizeLinear -> DequantizeLinear(s)
        if len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
            raise SparsedgeError(f"{inp.name} is not quantized once: cannot pass it as integers")
        q = qs[0]
        for n in consumers[q.output[0]]:
            n.input[list(n.input).index(q.output[0])] = inp.name
        inp.type.tensor_type.elem_type = inits[q.input[2]].data_type
        drop.append(q)
    for out in model.graph.output:
        if not out.name.startswith("present."):
            continue
        dq = producer[out.name]  # ... -> QuantizeLinear -> DequantizeLinear -> output
        if dq.op_type != "DequantizeLinear" or consumers.get(out.name):
            raise SparsedgeError(f"{out.name} is not a quantized graph output: cannot pass it as integers")
        q = producer[dq.input[0]]
        for n in consumers[dq.input[0]]:
            if n is not dq:
                n.input[list(n.input).index(dq.input[0])] = out.name
        q.output[0] = out.name
        out.type.tensor_type.elem_type = inits[dq.input[2]].data_type
        drop.append(dq)
    for n in drop:
        model.graph.node.remove(n)
    stale = {o for n in drop for o in n.output} | {x.name for x in model.graph.output}
    for v in [v for v in model.graph.value_info if v.name in stale]:
        model.graph.value_info.remove(v)


def _uniform_encoding(lo: float, hi: float, qtype: str) -> dict[str, Any]:
    """Scale and zero point of [lo, hi] in ``qtype``, by ONNX Runtime's own computation of an
    activation's encoding from its range (asymmetric, as get_qnn_qdq_config quantizes them)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    info = np.iinfo(np.dtype(qtype))
    zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.array(info.min, qtype), np.array(info.max, qtype))
    return {"scale": np.asarray(scale, np.float32).reshape(()), "zero_point": np.asarray(zp, qtype).reshape(())}


def shared_scales(qdq_path: Path) -> dict[str, list[dict[str, Any]]]:
    """The activation scales and zero points of a QDQ graph, as init_overrides for quantizing
    another static graph of the same model (other token count, same tensor names): the 1-token and
    the k-token graph then quantize every activation identically, so that verification of a draft
    computes each row as plain decoding does."""
    from onnx import numpy_helper

    model = _load_meta(qdq_path)
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    out: dict[str, list[dict[str, Any]]] = {}
    for n in model.graph.node:
        # an activation's QuantizeLinear, or the DequantizeLinear of an input passed as integers
        # (_kv_as_integers)
        if (n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits
                or n.op_type == "DequantizeLinear" and n.input[0] in inputs):
            scale = numpy_helper.to_array(inits[n.input[1]])
            zp = numpy_helper.to_array(inits[n.input[2]])
            if scale.size == 1:
                out.setdefault(n.input[0], [{"scale": scale.reshape(()), "zero_point": zp.reshape(())}])
    return out


class _CalibReader:
    """onnxruntime CalibrationDataReader: per sample, `CALIB_STEP` tokens after a cache of
    `CALIB_PREFIX` tokens that the fp32 graph filled (past inputs with real values, never empty).
    first: also one sample per window at position 0 (an empty cache), where models put their
    massive activations: a static graph must cover them, its ranges are fixed."""

    def __init__(self, src: Path, ids: np.ndarray, n_windows: int, first: bool = False):
        span = CALIB_PREFIX + CALIB_STEP
        if ids.size < span:
            raise SparsedgeError(f"calibration needs at least {span} tokens, got {ids.size}")
        rt = _cpu_runtime(src)
        if ids.max() >= rt.vocab_size:
            raise SparsedgeError(f"calibration token ids exceed the vocabulary of {rt.vocab_size}")
        starts = np.linspace(0, ids.size - span, num=max(1, n_windows)).astype(np.int64)
        self._feeds: list[dict[str, np.ndarray]] = []
        for s in dict.fromkeys(starts.tolist()):
            w = ids[s : s + span]
            rt.reset()
            if first:
                self._feeds.append(rt.inputs(w[:CALIB_STEP]))
            rt.forward(w[:CALIB_PREFIX])
            self._feeds.append(rt.inputs(w[CALIB_PREFIX:]))
        self._it: Iterator = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def probe(src: Path, dst: Path, ids: np.ndarray | None = None) -> dict[str, float]:
    """max / mean |logit difference| and top-1 agreement of dst against src on one sequence: a
    prefill of PROBE_PREFILL tokens, then PROBE_STEPS single decode steps with the cache."""
    a, b = _cpu_runtime(src), _cpu_runtime(dst)
    n = PROBE_PREFILL + PROBE_STEPS
    if ids is None or ids.size < n:
        ids = np.random.default_rng(0).integers(0, a.vocab_size, n)
    ids = ids[:n]
    outs = []
    for rt in (a, b):
        logits = [rt.forward(ids[:PROBE_PREFILL])]
        logits += [rt.forward(ids[i : i + 1]) for i in range(PROBE_PREFILL, n)]
        outs.append(np.concatenate(logits))
    ref, got = outs
    diff = np.abs(ref - got)
    return {
        "tokens": int(n),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        # ||dst - src|| / ||src - mean(src)|| over the probe's logits: scale-free, 0 = identical
        "rel_rms_error": float(np.sqrt(((ref - got) ** 2).mean() / ((ref - ref.mean(1, keepdims=True)) ** 2).mean())),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizers log every node at INFO (some through the root logger) and advise
    pre-processing on every call: keep the user's console to our progress and report."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ---- entry point ----------------------------------------------------------------------------------


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    kind: str,
    calib=None,
    *,
    activation_type: str = "uint16",
    weight_type: str = "uint8",
    block_size: int = BLOCK_SIZE,
    accuracy_level: int = ACCURACY_LEVEL,
    symmetric: bool = True,
    per_channel: bool = False,
    calib_windows: int = CALIB_WINDOWS,
    check_error: bool = True,
    scales: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Quantize the fp32 sparsedge graph ``src`` into ``dst`` (written atomically) and report.

    calib: a tokenizer (tokenizes sparsedge.data.calibration_text()) or 1-D token ids, for qdq's
    calibration and for the error probe (random ids when there are none); default: the tokenizer
    of the artifact folder around src. activation_type / weight_type: QDQ types (uint16 / uint8 for NPUs).
    scales: qdq only, activation scales to use instead of calibrated ones (shared_scales of another
    graph of the same model).
    """
    from ..export.onnx import read_metadata

    check_kind(kind)
    for t in (activation_type, weight_type):
        if t not in QDQ_TYPES:
            raise SparsedgeError(f"unknown QDQ type {t!r} (known: {', '.join(QDQ_TYPES)})")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_file():
        raise SparsedgeError(f"no such ONNX model file: {src}")
    if src.resolve() == dst.resolve():
        raise SparsedgeError("quantize_onnx writes a new file; dst must differ from src")
    src_model = _load_meta(src)
    if "sparsedge.spec" not in read_metadata(src_model):
        raise SparsedgeError(f"{src} is not a sparsedge decoder graph (no sparsedge.spec metadata)")
    ids = calibration_ids(calib, src, required=kind == "qdq")
    opts = {"activation_type": activation_type, "weight_type": weight_type, "block_size": block_size,
            "accuracy_level": accuracy_level, "symmetric": symmetric, "per_channel": per_channel,
            "calib_ids": ids, "calib_windows": calib_windows, "scales": scales}
    n_linear = len(_linear_matmuls(src_model))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    t0 = time.perf_counter()
    try:
        out = tmp / dst.name
        with _quiet():
            converted = KINDS[kind](src, out, opts)
        seconds = time.perf_counter() - t0
        ops = _ops(_load_meta(out))
        report: dict[str, Any] = {
            "kind": kind,
            "matmuls": n_linear,
            "matmuls_quantized": int(converted),
            "ops": {k: ops[k] for k in ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
                                        "QuantizeLinear", "DequantizeLinear") if ops[k]},
            "src_bytes": _size(src),
            "dst_bytes": _size(out),
            "seconds": round(seconds, 2),
        }
        if kind in ("int4sym", "int8w"):
            report.update(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)
        if kind == "int4":
            report.update(block_size=block_size, symmetric=False, weight_error=opts["weight_error"])
        if kind == "qdq":
            report.update(activation_type=activation_type, weight_type=weight_type)
            if "float_nodes" in opts:
                report["float_nodes"] = opts["float_nodes"]
        if check_error:
            report["error"] = probe(src, out, ids[len(ids) // 2 :] if ids is not None else None)
        stale = dst.with_name(dst.name + ".data")
        if stale.exists() and not out.with_name(stale.name).exists():
            stale.unlink()
        for p in _files(out):
            os.replace(p, dst.with_name(p.name))
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
