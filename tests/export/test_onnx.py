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
    """conftest's architectures, those the exporter refuses skipped (see test_refused_architectures)."""
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


@pytest.mark.parametrize("name", sorted(UNSUPPORTED["onnx"]))
def test_refused_architectures(name, tmp_path):
    """What the graph cannot compute (Qwen2's q/k/v biases) is refused, not dropped: by the exporter,
    and by an artifact export before it writes anything."""
    from sparsedge import arch, load
    from sparsedge.export.artifact import ExportConfig, export

    m = hf_model(name)
    spec = arch.spec_from_hf(m.config)
    with pytest.raises(SparsedgeError, match=re.escape(UNSUPPORTED["onnx"][name])):
        export_onnx(spec, arch.canonical_weights(spec, m.state_dict()), tmp_path / "onnx", progress=False)
    assert list(tmp_path.iterdir()) == []
    loaded = load(str(save_folder(name, tmp_path / "hf")), progress=False)
    with pytest.raises(SparsedgeError, match=re.escape(UNSUPPORTED["onnx"][name])):
        export(loaded, tmp_path / "art", ExportConfig(formats=("gguf", "onnx")), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
