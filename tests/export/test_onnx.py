"""The ONNX exporter: a valid graph with the documented signature, the same function as the torch
reference (dense, batched, and with a sparsity recipe in the graph), atomic writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sparsedge import SparsedgeError
from sparsedge.arch import ModelSpec
from sparsedge.export.onnx import MASK_VALUE, export_onnx, input_names, output_names

from tiny import UNSUPPORTED, arch_params, hf_model, save_folder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4


@pytest.fixture(params=arch_params("onnx"))
def arch_name(request) -> str:
    """conftest's architectures, any that tiny.UNSUPPORTED["onnx"] lists skipped (none now; Qwen2's
    q/k/v biases: test_qwen2_biases_are_one_add_per_layer_and_matter)."""
    return request.param


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _causal_feed(spec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Graph inputs for a plain causal pass over ids [b, s] from an empty cache."""
    b, s = ids.shape
    pos = np.broadcast_to(np.arange(s), (b, s))
    causal = np.tril(np.ones((s, s), dtype=bool))

    def bias(allowed):
        return np.broadcast_to(np.where(allowed, 0.0, MASK_VALUE), (b, 1, s, s)).astype(np.float32)

    feed = {"input_ids": ids.astype(np.int64), "position_ids": pos.astype(np.int64), "attention_bias": bias(causal)}
    if spec.sliding_window is not None:
        feed["sliding_attention_bias"] = bias(causal & ((pos[0][:, None] - pos[0][None, :]) < spec.sliding_window))
    for name in input_names(spec)[len(feed):]:
        feed[name] = np.zeros((b, spec.n_kv_heads, 0, spec.head_dim), np.float32)
    return feed


def test_graph_is_valid_with_the_documented_signature(tiny, tmp_path):
    _, rt = tiny
    spec = rt.spec
    path = export_onnx(spec, rt.model.w, tmp_path / "onnx", progress=False)
    assert path == tmp_path / "onnx" / "model.onnx" and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert list(ins) == input_names(spec) and list(outs) == output_names(spec)
    assert ins["input_ids"] == ["batch", "seq"] and ins["attention_bias"] == ["batch", 1, "seq", "total"]
    assert ins["past_key_values.0.key"] == ["batch", spec.n_kv_heads, "past", spec.head_dim]
    assert outs["present.0.value"] == ["batch", spec.n_kv_heads, "total", spec.head_dim]
    assert outs["logits"] == ["batch", "seq", spec.vocab_size]
    assert ("sliding_attention_bias" in ins) == (spec.arch == "gemma3")
    meta = {p.key: p.value for p in m.metadata_props}
    assert ModelSpec.from_dict(json.loads(meta["sparsedge.spec"])) == spec
    # only standard ONNX ops: any runtime can run it
    assert {o.domain for o in m.opset_import} == {""}


def test_batched_pass_matches_torch(tiny, tmp_path):
    """Two sequences in one batch, each equal to the torch reference on its own (dynamic batch)."""
    _, rt = tiny
    path = export_onnx(rt.spec, rt.model.w, tmp_path / "onnx", progress=False)
    ids = np.random.default_rng(0).integers(0, rt.vocab_size, (2, 12))
    out = _session(path).run(None, _causal_feed(rt.spec, ids))
    logits, presents = out[0], out[1:]
    assert logits.shape == (2, 12, rt.vocab_size)
    assert presents[0].shape == (2, rt.spec.n_kv_heads, 12, rt.spec.head_dim)
    for b in range(2):
        rt.reset()
        np.testing.assert_allclose(logits[b], rt.forward(ids[b]), atol=TOL, rtol=0)


@pytest.fixture
def recipe_pair(tiny, tmp_path):
    """A chunked CHESS recipe (per-channel thresholds, q and o inputs, permuted FFN) and a TEAL one
    (every linear input), calibrated on the tiny model."""
    from sparsedge import sparsify
    from tiny import tiny_tokenizer

    _, rt = tiny
    tok = tiny_tokenizer()
    stats = sparsify.calibration_stats(rt, tok, config=sparsify.CalibConfig(tokens=512, window=128, rows=256),
                                       progress=False)
    chess = sparsify.add_chunking(sparsify.recipe_from_stats("chess", 0.5, stats, rt), stats, 16)
    teal = sparsify.recipe_from_stats("teal", 0.5, stats, rt)
    return rt, {"chess": chess, "teal": teal}


@pytest.mark.parametrize("method", ["chess", "teal"])
def test_recipe_in_the_graph_computes_the_sparse_function(recipe_pair, tmp_path, method):
    """Logits of the exported sparse graph equal the torch reference with the recipe applied, differ
    from the dense model's, and every site zeroes the same fraction of entries."""
    from sparsedge.runtimes.onnxrt import OnnxRuntime
    from sparsedge.sparsify import apply, remove

    rt, recipes = recipe_pair
    recipe = recipes[method]
    toks = np.random.default_rng(3).integers(0, rt.vocab_size, 24)
    dense = rt.forward(toks)
    rt.reset()
    hooks = apply(rt, recipe)  # permutes the runtime's FFN when the recipe is chunked
    want = rt.forward(toks)
    achieved = hooks.achieved()
    remove(rt)
    assert np.abs(want - dense).max() > 1e-2  # the recipe changes the function

    path = export_onnx(rt.spec, rt.model.w, tmp_path / "onnx", recipe=recipe, progress=False)
    got = OnnxRuntime(path, rt.spec, threads=1).forward(toks)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    # achieved sparsity per site, read from the graph's own keep masks (GreaterOrEqual outputs)
    m = onnx.load(str(path))
    masks = {n.output[0]: n.name.split(".")[3] for n in m.graph.node if n.op_type == "GreaterOrEqual"}
    assert {s for s in masks.values()} == set(recipe.sites)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.BOOL, None) for o in masks)
    probe = tmp_path / "probe.onnx"
    onnx.save(m, str(probe))
    feed = _causal_feed(rt.spec, toks[None])
    outs = _session(probe).run(list(masks), feed)
    for site in recipe.sites:
        keep = [o for o, name in zip(outs, masks) if masks[name] == site]
        zeroed = 1.0 - sum(int(k.sum()) for k in keep) / sum(k.size for k in keep)
        assert zeroed == pytest.approx(achieved[site], abs=2e-3), site


def test_permuted_weights_flag(recipe_pair, tmp_path):
    """Weights already in the recipe's neuron order (as the artifact writer hands them) give the
    same graph function as original weights permuted by the exporter."""
    from sparsedge.runtimes.onnxrt import OnnxRuntime
    from sparsedge.sparsify.chunks import permute_ffn

    rt, recipes = recipe_pair
    recipe = recipes["chess"]
    w = dict(rt.model.w)
    for layer, perm in enumerate(recipe.chunks.permutation):
        permute_ffn(w, layer, perm)
    a = export_onnx(rt.spec, rt.model.w, tmp_path / "a", recipe=recipe, progress=False)
    b = export_onnx(rt.spec, w, tmp_path / "b", recipe=recipe, progress=False, weights_permuted=True)
    toks = np.arange(3, 19)
    np.testing.assert_allclose(OnnxRuntime(a, threads=1).forward(toks), OnnxRuntime(b, threads=1).forward(toks),
                               atol=1e-6, rtol=0)


def test_bad_input_leaves_nothing_and_reexport_replaces(tiny, tmp_path):
    _, rt = tiny
    out = tmp_path / "onnx"
    bad = {k: v for k, v in rt.model.w.items() if k != "layers.0.q"}
    with pytest.raises(SparsedgeError, match="layers.0.q"):
        export_onnx(rt.spec, bad, out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    first = export_onnx(rt.spec, rt.model.w, out, progress=False)
    (out / "model.onnx.data").write_bytes(b"stale side file of an older, larger export")
    again = export_onnx(rt.spec, rt.model.w, out, progress=False)
    assert again == first and sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no temp folder left behind


def test_qwen2_biases_are_one_add_per_layer_and_matter(tmp_path):
    """Qwen2's q/k/v biases are one Add per layer on the fused projection, [q_bias * scale, k_bias,
    v_bias] (the attention scale folded in as into W_q), and they are what makes the graph equal
    the torch reference: the same graph with them zeroed is far from it. The static (NPU) graphs
    still refuse them (tests/runtimes/test_npu.py)."""
    from onnx import numpy_helper

    from sparsedge import arch
    from sparsedge.export.onnx import check_supported
    from sparsedge.runtimes.onnxrt import OnnxRuntime
    from sparsedge.runtimes.torch_ref import TorchRuntime

    m = hf_model("qwen2")
    spec = arch.spec_from_hf(m.config)
    w = arch.canonical_weights(spec, m.state_dict())
    check_supported(spec)
    with pytest.raises(SparsedgeError, match=re.escape(UNSUPPORTED["npu"]["qwen2"])):
        check_supported(spec, static=True)
    path = export_onnx(spec, w, tmp_path / "onnx", progress=False)
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    adds = [n for n in g.node if n.op_type == "Add" and any(x.endswith(".qkv_bias") for x in n.input)]
    assert len(adds) == spec.n_layers
    for i in range(spec.n_layers):
        want = np.concatenate([w[f"layers.{i}.{b}_bias"].numpy() * (spec.scale if b == "q" else 1.0)
                               for b in "qkv"])
        np.testing.assert_allclose(inits[f"layers.{i}.qkv_bias"], want, rtol=1e-6, atol=0)

    toks = np.random.default_rng(5).integers(0, spec.vocab_size, 20)
    ref = TorchRuntime(spec, w).forward(toks)
    np.testing.assert_allclose(OnnxRuntime(path, spec, threads=1).forward(toks), ref, atol=TOL, rtol=0)
    zeroed = {k: v * 0 if k.endswith("_bias") else v for k, v in w.items()}
    off = export_onnx(spec, zeroed, tmp_path / "zeroed", progress=False)
    assert np.abs(OnnxRuntime(off, spec, threads=1).forward(toks) - ref).max() > 0.1


def test_qwen2_artifact_with_gguf_and_onnx(tmp_path):
    """An artifact export of a tiny Qwen2 in both formats writes the GGUF, the fp32 graph and its
    int4 variant, and the fp32 graph of the artifact computes the torch reference's function."""
    from sparsedge import load, open_runtime
    from sparsedge.export.artifact import ExportConfig, export
    from sparsedge.runtimes.torch_ref import TorchRuntime

    loaded = load(str(save_folder("qwen2", tmp_path / "hf")), progress=False)
    out = tmp_path / "art"
    cfg = ExportConfig(formats=("gguf", "onnx"), gguf_quants=("f32",), onnx_quants=("fp32", "int4"))
    man = export(loaded, out, cfg, progress=False)
    assert man["spec"]["arch"] == "qwen2" and man["onnx_quants"] == ["fp32", "int4"]
    assert {"model.f32.gguf", "onnx/model.onnx", "onnx/model.int4.onnx"} <= set(man["files"])
    err = man["quality"]["onnx/model.int4.onnx"]["error"]
    assert 0 < err["rel_rms_error"] <= 0.5, err
    toks = np.random.default_rng(6).integers(0, loaded.spec.vocab_size, 16)
    want = TorchRuntime(loaded.spec, loaded.state_dict()).forward(toks)
    got = open_runtime(str(out), "onnxruntime", quant="fp32", threads=1).forward(toks)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
