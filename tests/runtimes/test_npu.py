"""The NPU path: static-shape graphs equal the torch reference (prefill, tree steps across graph
chunks, keep), stay within the NPU's limits (static shapes, rank <= 4), quantize to QDQ with shared
scales, and run on the QNN HTP execution provider (an emulator on x86) with the CPU fallback
disabled, where greedy tokens match the same QDQ graphs on the CPU provider and speculative
decoding with the k-token graph is lossless."""

from __future__ import annotations

import numpy as np
import pytest

from sparsedge import SparsedgeError, load
from sparsedge.export.onnx import StaticShape, export_onnx
from sparsedge.runtimes import open_runtime
from sparsedge.runtimes.base import tree_depths, tree_mask
from sparsedge.runtimes.decoding import (CostCurve, GenerationConfig, SpecConfig, SpecStats, Target, generate,
                                         make_drafter, speculative_generate)
from sparsedge.runtimes.npu import NpuRuntime, qnn_available
from tiny import UNSUPPORTED, arch_params, save_folder

onnx = pytest.importorskip("onnx")
needs_qnn = pytest.mark.skipif(not qnn_available(), reason="the QNN execution provider is not installed "
                               "(pip install onnxruntime-qnn)")
TOL = 1e-4
# verification priced as free (every draft node is taken): these tests are about losslessness, and
# a given curve spares emulator minutes of measuring it (measure_cost on the NpuRuntime measures
# only k = 1, 2 and each graph's size; tree sizing from costs is tested in test_speculative)
FLAT = CostCurve([1, 8], [1.0, 1.0])


@pytest.fixture(scope="module", params=arch_params("npu"))
def static_pair(request, tmp_path_factory):
    """A tiny model's torch reference and its fp32 static graphs (context 32; 1 and 4 tokens)."""
    from sparsedge import arch
    from sparsedge.runtimes.torch_ref import TorchRuntime
    from tiny import hf_model

    m = hf_model(request.param)
    spec = arch.spec_from_hf(m.config)
    rt = TorchRuntime(spec, arch.canonical_weights(spec, m.state_dict()))
    d = tmp_path_factory.mktemp(f"static_{request.param}")
    paths = [export_onnx(spec, rt.model.w, d, static=StaticShape(32, k), file_name=f"model.k{k}.onnx",
                         progress=False) for k in (1, 4)]
    return rt, paths


def test_static_graphs_match_torch(static_pair):
    """Prefill longer than any graph (chunked), an 8-node tree split over two 4-token calls (the
    second chunk sees the first through the tree mask), keep() of a branch, then a plain step."""
    ref, paths = static_pair
    ref.reset()
    npu = NpuRuntime(paths, provider="cpu")
    rng = np.random.default_rng(0)
    toks = rng.integers(0, ref.vocab_size, 10)
    np.testing.assert_allclose(npu.forward(toks), ref.forward(toks), atol=TOL, rtol=0)
    parents = [-1, 0, 0, 1, 1, 2, 3, 6]
    tt, pos, mask = rng.integers(0, ref.vocab_size, 8), 10 + tree_depths(parents), tree_mask(parents)
    np.testing.assert_allclose(npu.forward(tt, pos, mask), ref.forward(tt, pos, mask), atol=TOL, rtol=0)
    npu.keep([0, 1, 3, 6])
    ref.keep([0, 1, 3, 6])
    assert npu.n_past == ref.n_past == 14
    np.testing.assert_allclose(npu.forward([5]), ref.forward([5]), atol=TOL, rtol=0)
    npu.truncate(12)
    ref.truncate(12)
    np.testing.assert_allclose(npu.forward([7, 8]), ref.forward([7, 8]), atol=TOL, rtol=0)
    assert npu.cost_ks == (1, 2, 4)


def test_static_graph_fits_an_npu(static_pair):
    """Every shape is fixed, every tensor has rank <= 4 (HTP kernels stop at 4), the cache outputs
    are only the new entries, and positions come in as host-computed rotary tables."""
    _, paths = static_pair
    m = onnx.shape_inference.infer_shapes(onnx.load(str(paths[1])), strict_mode=True)
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert "position_ids" not in ins and ins["rope_cos.0"][1] == 4
    assert ins["attention_bias"] == [1, 1, 4, 32] and ins["past_key_values.0.key"][0] == 32
    assert ins["kv_slot_source"] == [32]
    assert outs["present.0.key"][0] == 4
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        assert all(d.dim_value > 0 for d in dims), v.name  # static
        assert len(dims) <= 4, v.name


def test_bad_use_is_a_clear_error(static_pair, tmp_path):
    ref, paths = static_pair
    npu = NpuRuntime(paths, provider="cpu")
    with pytest.raises(SparsedgeError, match="hold 32 cache entries"):
        npu.forward(np.zeros(33, dtype=np.int64))
    with pytest.raises(SparsedgeError, match="unknown NPU provider"):
        NpuRuntime(paths, provider="gpu")
    dyn = export_onnx(ref.spec, ref.model.w, tmp_path / "dyn", progress=False)
    with pytest.raises(SparsedgeError, match="not a static sparsedge decoder graph"):
        NpuRuntime([dyn], provider="cpu")
    other = export_onnx(ref.spec, ref.model.w, tmp_path / "c16", static=StaticShape(16, 2), progress=False)
    with pytest.raises(SparsedgeError, match="same model and context"):
        NpuRuntime([paths[0], other], provider="cpu")
    with pytest.raises(SparsedgeError, match="no such"):
        NpuRuntime(tmp_path / "nowhere")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED["npu"]))
def test_refused_architectures(name, tmp_path):
    """Static graphs that would drop Qwen2's q/k/v biases are refused: by the exporter, and by an
    npu artifact export before it writes anything."""
    import re

    from sparsedge import arch
    from sparsedge.export.artifact import ExportConfig, export
    from tiny import hf_model

    m = hf_model(name)
    spec = arch.spec_from_hf(m.config)
    reason = re.escape(UNSUPPORTED["npu"][name])
    with pytest.raises(SparsedgeError, match=reason):
        export_onnx(spec, arch.canonical_weights(spec, m.state_dict()), tmp_path / "npu", static=StaticShape(32, 1),
                    progress=False)
    assert list(tmp_path.iterdir()) == []
    loaded = load(str(save_folder(name, tmp_path / "hf")), progress=False)
    with pytest.raises(SparsedgeError, match=reason):
        export(loaded, tmp_path / "art", ExportConfig(formats=("npu",)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---- the npu artifact format on a tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_npu(tmp_path_factory):
    """A tiny llama with varied text exported in the npu format (QDQ A16W8, context 96, 1- and
    4-token graphs), and prompts for it."""
    from sparsedge.export.artifact import ExportConfig, export

    d = tmp_path_factory.mktemp("npu")
    loaded = load(str(save_folder("llama", d / "hf", init_range=0.3)), progress=False)
    m = export(loaded, d / "art", ExportConfig(formats=("npu",), npu_context=96, npu_verify_tokens=4),
               progress=False)
    art = load(str(d / "art"), progress=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, art.spec.vocab_size, 6).tolist() for _ in range(5)]
    prompts[0] = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repetitive: the n-gram drafter gets accepted
    return {"art": art, "manifest": m, "prompts": prompts}


def test_npu_export_writes_two_graphs_with_shared_scales(tiny_npu):
    from sparsedge.quantize.onnx import shared_scales

    m = tiny_npu["manifest"]
    assert set(m["quality"]) == {"npu/model.k1.onnx", "npu/model.k4.onnx"}
    assert m["npu"] == {"context": 96, "verify_tokens": 4, "activation_type": "uint16", "weight_type": "uint8"}
    for q in m["quality"].values():
        assert q["kind"] == "qdq" and q["float_nodes"] > 0 and q["error"]["top1_agreement"] >= 0.8
    folder = tiny_npu["art"].path / "npu"
    a, b = shared_scales(folder / "model.k1.onnx"), shared_scales(folder / "model.k4.onnx")
    assert len(a) > 50 and a.keys() == b.keys()
    assert all(float(a[t][0]["scale"]) == float(b[t][0]["scale"]) for t in a)
    assert all(int(a[t][0]["zero_point"]) == int(b[t][0]["zero_point"]) for t in a)
    # the KV cache crosses the graph boundary as uint16 integers; per layer and kind, the past
    # input, the concatenation of past and new entries, and the cache gathered from it (the present
    # output is a slice of it too) share one encoding
    m = onnx.load(str(folder / "model.k4.onnx"), load_external_data=False)
    kv = [v for v in list(m.graph.input) + list(m.graph.output) if v.name.startswith(("past_", "present."))]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.UINT16 for v in kv)
    for i in range(tiny_npu["art"].spec.n_layers):
        for kind in ("key", "value"):
            assert float(b[f"past_key_values.{i}.{kind}"][0]["scale"]) == float(b[f"kv.{i}.{kind}"][0]["scale"])
            assert float(b[f"cache.{i}.{kind}"][0]["scale"]) == float(b[f"kv.{i}.{kind}"][0]["scale"])


def _rows(rt, prompt):
    """Logits of 4 tokens after a prompt: in one call, one by one, and as a tree branch then keep()."""
    rt.reset()
    rt.forward(prompt)
    n = len(prompt)
    chain = rt.forward([9, 10, 11, 12])
    rt.truncate(n)
    seq = np.concatenate([rt.forward([t]) for t in (9, 10, 11, 12)])
    rt.truncate(n)
    tree = rt.forward([9, 7, 10, 11], positions=[n, n + 1, n + 1, n + 2], tree_mask=tree_mask([-1, 0, 0, 2]))
    rt.keep([0, 2, 3])
    after = rt.forward([12])
    return chain, seq, np.concatenate([tree[[0, 2, 3]], after])


@pytest.mark.parametrize("provider", ["cpu", pytest.param("qnn", marks=needs_qnn)])
def test_npu_rows_are_exact_whatever_the_call(tiny_npu, provider):
    """A token's logits are bit-identical alone, in a chain, in a tree and after keep(): what makes
    speculative decoding lossless on the NPU. By default (exact=None) the runtime finds that its two
    graphs differ and runs every call through the 4-token one."""
    rt = open_runtime(tiny_npu["art"], "npu", provider=provider)
    assert [g.tokens for g in rt._use] == [4] and rt.exact_trees
    chain, seq, tree = _rows(rt, tiny_npu["prompts"][1])
    assert np.array_equal(chain, seq) and np.array_equal(tree, seq)
    # both graphs in use: close (shared scales), not identical
    fast = NpuRuntime(tiny_npu["art"].path / "npu", provider=provider, exact=False)
    assert [g.tokens for g in fast._use] == [1, 4] and not fast.exact_trees
    chain, seq, _ = _rows(fast, tiny_npu["prompts"][1])
    np.testing.assert_allclose(chain, seq, atol=0.05 * np.abs(seq).max(), rtol=0)


def test_npu_speculative_is_lossless_on_cpu(tiny_npu):
    rt = open_runtime(tiny_npu["art"], "npu", provider="cpu")
    dr = make_drafter("ngram", Target(rt, tiny_npu["art"], "npu", {"provider": "cpu"}))
    cfg = GenerationConfig(max_new_tokens=24)
    st = SpecStats()
    for p in tiny_npu["prompts"]:
        want = list(generate(rt, p, cfg))
        assert list(speculative_generate(rt, p, cfg, dr, SpecConfig(mode="tree", budget=3, cost=FLAT), st)) == want
    assert st.accepted > 0


def test_npu_runtime_errors(tiny_npu, tmp_path):
    with pytest.raises(SparsedgeError, match="runs the artifact's QDQ graphs"):
        open_runtime(tiny_npu["art"], "npu", quant="int4", provider="cpu")
    from sparsedge.export.artifact import ExportConfig

    with pytest.raises(SparsedgeError, match="npu_verify_tokens must lie"):
        ExportConfig(formats=("npu",), npu_context=8, npu_verify_tokens=8)


@needs_qnn
def test_tiny_npu_on_the_qnn_htp_backend(tiny_npu):
    """On QNN HTP (CPU fallback disabled, so nothing can silently run on the CPU): logits close to
    the CPU provider's on the same graphs (HTP runs the float ops in fp16; a random tiny model's
    top-2 gaps are too small for its greedy tokens to be compared: the real model's are, below),
    and speculative decoding is lossless there."""
    htp = open_runtime(tiny_npu["art"], "npu")
    assert htp.providers[0] == "QNNExecutionProvider"
    cpu = open_runtime(tiny_npu["art"], "npu", provider="cpu")
    p = tiny_npu["prompts"][0]
    want, got = cpu.forward(p), htp.forward(p)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    cfg = GenerationConfig(max_new_tokens=16)
    # the model drafter on the same artifact (its own HTP session): drafts that get accepted
    dr = make_drafter(f"model:{tiny_npu['art'].path}@npu", Target(htp, tiny_npu["art"], "npu", {}))
    st = SpecStats()
    for p in tiny_npu["prompts"][:2]:
        want = list(generate(htp, p, cfg))
        assert list(speculative_generate(htp, p, cfg, dr, SpecConfig(mode="tree", budget=3, cost=FLAT), st)) == want
    assert st.accepted > 0


# ---- the real model on the emulated HTP ----------------------------------------------------------

# short raw prompts: each prompt plus 16 tokens fits three 8-token calls (the emulator takes ~25 s
# per call of the 8-token graph, ~13 s for the 1-token graph, on 2 cores)
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
                "The three primary colors are", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def real_npu(real_model, tmp_path_factory):
    """smollm2-135m exported with --target qualcomm-npu's settings (context 512, 1- and 8-token
    graphs, QDQ A16W8)."""
    from sparsedge.export.artifact import export
    from sparsedge.targets import export_config

    d = tmp_path_factory.mktemp("real_npu")
    export(real_model, d / "art", export_config("qualcomm-npu"), progress=False)
    art = load(str(d / "art"), progress=False)
    return {"art": art, "prompts": [art.tokenizer(p)["input_ids"] for p in REAL_PROMPTS]}


@pytest.mark.slow
@needs_qnn
def test_real_model_on_the_emulated_htp(real_npu):
    """On QNN HTP with the CPU fallback disabled: greedy tokens match the CPU provider's on the same
    QDQ graphs for all 16 tokens on >= 4 of 5 prompts, the text is coherent, and speculative
    decoding verified with the 8-token graph gives HTP's own greedy tokens exactly.

    Measured: 4 of 5 prompts, 79 of 80 positions; the one parting is at a top-2 gap of 0.085 (HTP
    and the CPU provider are 0.13-0.35 logits apart on average: HTP runs the float ops in fp16).

    HTP greedy is read teacher-forced: one pass of the 8-token graph over the prompt and the CPU's
    16 tokens (3 emulator calls instead of 16, at ~25 s each). A token's logits on one graph are
    bit-identical whether it comes alone, in a chain or in a tree (the graph writes new entries
    into their cache slots, test_npu_rows_are_exact_whatever_the_call), so HTP greedy decoding
    produces the CPU's tokens exactly when its argmax at each position is the CPU's next token, and
    otherwise the CPU's tokens up to the first mismatch, then HTP's argmax: what speculative
    decoding on HTP must reproduce."""
    from sparsedge.runtimes.decoding.drafters.model import RuntimeDrafter

    art = real_npu["art"]
    cpu = open_runtime(art, "npu", provider="cpu")
    htp = open_runtime(art, "npu", exact=True)  # the 8-token graph for every call, as the default would
    assert htp.providers[0] == "QNNExecutionProvider" and [g.tokens for g in htp._use] == [8] and htp.exact_trees
    cfg = GenerationConfig(max_new_tokens=16)
    same, agree, texts, htp_greedy = [], 0, [], []
    for p in real_npu["prompts"]:
        want = list(generate(cpu, p, cfg))
        texts.append(art.tokenizer.decode(want))
        htp.reset()
        got = htp.forward(p + want[:-1]).argmax(1)[len(p) - 1 :].tolist()
        same.append(got == want)
        agree += sum(a == b for a, b in zip(got, want))
        j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        htp_greedy.append(want[:j] + got[j : j + 1])  # what HTP greedy decoding produces, as far as known
    print(f"HTP greedy = CPU greedy for 16 tokens on {sum(same)} of 5 prompts; {agree} of 80 positions agree")
    assert sum(same) >= 4, (same, agree, texts)
    assert "Paris" in texts[0] and "return" in texts[1], texts

    # speculative decoding on HTP: drafts from the same graphs on the CPU provider (mostly
    # accepted), verified on HTP: its output is HTP's greedy, token for token
    dr = RuntimeDrafter(open_runtime(art, "npu", provider="cpu", exact=True), "model", max_depth=7)
    st = SpecStats()
    for p, greedy in list(zip(real_npu["prompts"], htp_greedy))[:2]:
        out = list(speculative_generate(htp, p, cfg, dr, SpecConfig(mode="spec", budget=7, cost=FLAT), st))
        assert out[: len(greedy)] == greedy
    assert st.steps <= 12  # 2 x 16 tokens in far fewer HTP calls than tokens


def test_cli_runs_the_npu_artifact(tiny_npu, capsys):
    import json

    from sparsedge.cli import main

    art = str(tiny_npu["art"].path)
    assert main(["run", art, "--runtime", "npu", "--provider", "cpu", "-p", "ab", "-n", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "npu" and out["new_tokens"] == 4
    assert main(["run", art, "--runtime", "torch", "--provider", "cpu", "-p", "ab", "-n", "4"]) == 1
    assert "--provider applies to --runtime npu" in capsys.readouterr().err
