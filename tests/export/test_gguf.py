"""The GGUF writer and the GGUF quant types, read back with gguf-py's own reader.

Every check compares against the Hugging Face weights and tokenizer the tiny models were saved
with, through code written here independently of the writer (the q/k un-permutation, the
dequantize-and-compare error figures).
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from sparsedge import SparsedgeError, arch, load
from sparsedge.export.gguf import RECIPE_KEY, VERSION_KEY, write_gguf
from sparsedge.quantize.gguf import QUANTS, check_quant
from needs import need
from tiny import hf_model, save_folder, tiny_tokenizer

T = gguf.TokenType


def _save_with_merges(arch_name: str, path):
    """A tiny HF folder whose BPE learned merges (tiny.save_folder's 256-token BPE has none)."""
    tok = tiny_tokenizer(320, arch=arch_name)
    m = hf_model(arch_name, vocab=len(tok))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load(str(_save_with_merges("llama", tmp_path_factory.mktemp("m") / "llama")), progress=False)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return load(str(_save_with_merges("qwen2", tmp_path_factory.mktemp("m") / "qwen2")), progress=False)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load(str(save_folder("gemma3", tmp_path_factory.mktemp("m") / "gemma3")), progress=False)


def _hf_weights(loaded) -> dict[str, np.ndarray]:
    """HF state-dict name -> fp32 array, straight from the saved folder."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).state_dict()
    return {k: v.numpy() for k, v in sd.items()}


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows -> HF's rotate-half rows, per head."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        block = w[h * hd : (h + 1) * hd]
        out[h * hd : h * hd + hd // 2] = block[0::2]  # even rows were the first half
        out[h * hd + hd // 2 : (h + 1) * hd] = block[1::2]
    return out


LLAMA_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GEMMA3_GGUF_TO_HF = {
    **{k: v for k, v in LLAMA_GGUF_TO_HF.items() if "ffn_norm" not in k},
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
QWEN2_GGUF_TO_HF = {
    **LLAMA_GGUF_TO_HF,
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
}
GGUF_TO_HF = {"llama": LLAMA_GGUF_TO_HF, "gemma3": GEMMA3_GGUF_TO_HF, "qwen2": QWEN2_GGUF_TO_HF}


def _expand(table: dict[str, str], n_layers: int) -> dict[str, str]:
    out = {}
    for g, h in table.items():
        for i in range(n_layers) if "{i}" in g else [None]:
            out[g.format(i=i)] = h.format(i=i)
    return out


def _reference(loaded, hf) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the HF weight in llama.cpp's layout, built here independently."""
    spec = loaded.spec
    table = _expand(GGUF_TO_HF[spec.arch], spec.n_layers)
    ref = {}
    for g, h in table.items():
        w = hf[h]
        if spec.arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            n = spec.n_heads if ".attn_q." in g else spec.n_kv_heads
            # the inverse of _unpermute: interleave the two halves of each head
            hd = w.shape[0] // n
            w = w.reshape(n, 2, hd // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)
            assert np.array_equal(_unpermute(w, n), hf[h])
        if spec.arch == "gemma3" and w.ndim == 1:
            w = w + np.float32(1.0)
        ref[g] = w
    return ref


# ----------------------------------------------------------------------------- F32 layout


def test_llama_f32_tensors_round_trip(llama, tmp_path):
    path = tmp_path / "m.gguf"
    rep = write_gguf(llama, path, progress=False)
    assert rep["quant"] == "f32" and rep["bytes"] == path.stat().st_size
    r = gguf.GGUFReader(str(path))
    hf = _hf_weights(llama)
    spec = llama.spec
    table = _expand(LLAMA_GGUF_TO_HF, spec.n_layers)
    names = {t.name for t in r.tensors}
    assert names == set(table)  # tied embeddings: no output.weight, and nothing else
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        w = np.asarray(t.data)
        want = hf[table[t.name]]
        assert w.shape == want.shape, t.name
        assert list(t.shape) == list(reversed(want.shape))  # ggml order: ne0 = row length
        if ".attn_q." in t.name or ".attn_k." in t.name:
            n = spec.n_heads if ".attn_q." in t.name else spec.n_kv_heads
            assert not np.array_equal(w, want)  # permuted ...
            np.testing.assert_array_equal(_unpermute(w, n), want)  # ... and exactly invertible
        else:
            np.testing.assert_array_equal(w, want)


def test_llama_metadata(llama, tmp_path):
    from sparsedge import __version__

    path = tmp_path / "m.gguf"
    write_gguf(llama, path, progress=False)
    r = gguf.GGUFReader(str(path))
    spec, cfg = llama.spec, llama.hf_config
    f = lambda k: _field(r, k)  # noqa: E731
    assert f("general.architecture") == "llama"
    assert f("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert f("llama.block_count") == spec.n_layers
    assert f("llama.embedding_length") == spec.hidden_size
    assert f("llama.feed_forward_length") == spec.intermediate_size
    assert f("llama.attention.head_count") == spec.n_heads
    assert f("llama.attention.head_count_kv") == spec.n_kv_heads
    assert f("llama.rope.dimension_count") == spec.head_dim
    assert f("llama.rope.freq_base") == pytest.approx(spec.rope_theta)
    assert f("llama.attention.layer_norm_rms_epsilon") == pytest.approx(spec.rms_eps)
    assert f("llama.context_length") == cfg.max_position_embeddings
    assert f("llama.vocab_size") == spec.vocab_size
    assert f(VERSION_KEY) == __version__ and f(RECIPE_KEY) is None

    tok = llama.tokenizer
    tj = json.loads(tok.backend_tokenizer.to_str())
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    tokens = f("tokenizer.ggml.tokens")
    assert len(tokens) == spec.vocab_size
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = f("tokenizer.ggml.token_type")
    specials = {tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>")}
    assert {i for i, ty in enumerate(types) if ty == T.CONTROL} == specials
    assert all(ty == T.NORMAL for i, ty in enumerate(types) if i not in specials)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert merges and f("tokenizer.ggml.merges") == merges
    assert f("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert f("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert f("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert f("tokenizer.ggml.add_bos_token") is False  # this tokenizer adds no BOS
    assert f("tokenizer.chat_template") == tok.chat_template


def test_bpe_without_merges_still_has_the_merges_key(tmp_path):
    """tiny.save_folder's BPE learned no merges: llama.cpp still requires the key (empty)."""
    loaded = load(str(save_folder("llama", tmp_path / "m")), progress=False)
    write_gguf(loaded, tmp_path / "m.gguf", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert "tokenizer.ggml.merges" in r.fields and _field(r, "tokenizer.ggml.merges") == []


def _recipe(spec, chunk_perm=None):
    from sparsedge.sparsify.recipe import Calibration, Chunking, SiteThresholds, SparsityRecipe, model_fingerprint

    return SparsityRecipe(
        method="cats", target_sparsity=0.5, model=model_fingerprint(spec),
        sites={"gate_act": SiteThresholds("|act(gate)|", [0.05] * spec.n_layers)},
        calibration=Calibration(corpus="test", tokens=0, text_hash="0"), tensors=["up", "down"],
        chunks=None if chunk_perm is None else Chunking(size=16, permutation=chunk_perm),
    )


def test_recipe_and_permuted_weights(llama, tmp_path):
    """The recipe rides along as JSON; ``weights`` (here chunk-permuted) replace the model's own."""
    from sparsedge.sparsify.chunks import permute_ffn
    from sparsedge.sparsify.recipe import SparsityRecipe

    spec = llama.spec
    rng = np.random.default_rng(0)
    perms = [rng.permutation(spec.intermediate_size).tolist() for _ in range(spec.n_layers)]
    recipe = _recipe(spec, perms)
    w = dict(llama.state_dict())
    for i, p in enumerate(perms):
        permute_ffn(w, i, p)
    path = tmp_path / "m.gguf"
    write_gguf(llama, path, weights=w, recipe=recipe, progress=False)
    r = gguf.GGUFReader(str(path))
    back = SparsityRecipe.from_dict(json.loads(_field(r, RECIPE_KEY)))
    assert back.to_dict() == recipe.to_dict()
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    hf = _hf_weights(llama)
    for i, p in enumerate(perms):
        gate, down = hf[f"model.layers.{i}.mlp.gate_proj.weight"], hf[f"model.layers.{i}.mlp.down_proj.weight"]
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_gate.weight"], gate[p])
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_down.weight"], down[:, p])


def test_gemma3_layout_and_metadata(gemma, tmp_path):
    path = tmp_path / "g.gguf"
    write_gguf(gemma, path, progress=False)
    r = gguf.GGUFReader(str(path))
    spec = gemma.spec
    ref = _reference(gemma, _hf_weights(gemma))
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    assert set(data) == set(ref)
    for name, want in ref.items():  # norms as 1 + w; q/k unpermuted (llama.cpp's gemma3 is NEOX)
        np.testing.assert_array_equal(data[name], want, err_msg=name)
    f = lambda k: _field(r, k)  # noqa: E731
    assert f("general.architecture") == "gemma3"
    assert f("gemma3.attention.key_length") == spec.head_dim == f("gemma3.attention.value_length")
    assert f("gemma3.attention.sliding_window") == spec.sliding_window
    assert f("gemma3.attention.sliding_window_pattern") == [t == "sliding" for t in spec.layer_types]
    assert f("gemma3.rope.freq_base") == pytest.approx(spec.rope_theta)
    assert f("gemma3.rope.freq_base_swa") == pytest.approx(spec.rope_theta_local)


def test_qwen2_layout_and_metadata(qwen2, tmp_path):
    """HF's rotate-half q/k rows as they are (llama.cpp's qwen2 is NEOX) and the q/k/v biases as
    blk.N.attn_{q,k,v}.bias, unpermuted too; the qwen2 hparams and the Qwen2 pre-tokenizer."""
    path = tmp_path / "q.gguf"
    write_gguf(qwen2, path, progress=False)
    r = gguf.GGUFReader(str(path))
    spec, hf = qwen2.spec, _hf_weights(qwen2)
    ref = _reference(qwen2, hf)
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    assert set(data) == set(ref)  # tied embeddings: no output.weight
    assert {n for n in data if n.endswith(".bias")} == {f"blk.{i}.attn_{x}.bias" for i in range(spec.n_layers)
                                                        for x in "qkv"}
    for name, want in ref.items():
        np.testing.assert_array_equal(data[name], want, err_msg=name)
    assert np.abs(data["blk.0.attn_k.bias"]).max() > 0  # the tiny model's biases are not zero
    f = lambda k: _field(r, k)  # noqa: E731
    assert f("general.architecture") == "qwen2"
    assert f("qwen2.block_count") == spec.n_layers
    assert f("qwen2.embedding_length") == spec.hidden_size
    assert f("qwen2.feed_forward_length") == spec.intermediate_size
    assert f("qwen2.attention.head_count") == spec.n_heads
    assert f("qwen2.attention.head_count_kv") == spec.n_kv_heads
    assert f("qwen2.rope.freq_base") == pytest.approx(1e6) == spec.rope_theta
    assert f("qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(spec.rms_eps)
    assert f("qwen2.context_length") == qwen2.hf_config.max_position_embeddings
    # transformers' Qwen2Tokenizer pre-tokenizes with Qwen2's split, which llama.cpp calls "qwen2"
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "qwen2"


def test_qwen2_q8_0_keeps_biases_f32(qwen2, tmp_path):
    path = tmp_path / "q.q8_0.gguf"
    rep = write_gguf(qwen2, path, quant="q8_0", progress=False)
    indep = _independent_errors(path, _reference(qwen2, _hf_weights(qwen2)))
    assert set(indep) == set(rep["tensors"])
    for name, (ttype, _, rel_rms) in indep.items():
        assert ttype == ("F32" if name.endswith((".bias", "norm.weight")) else "Q8_0"), name
        assert rep["tensors"][name]["rel_rms"] == pytest.approx(rel_rms, rel=1e-3, abs=1e-9)
    assert 0 < rep["errors"]["max_rel_rms"] < 0.01


def test_qwen2_gguf_loads_back_in_transformers(qwen2, tmp_path, monkeypatch):
    """transformers reads our qwen2 GGUF (its own un-mapping of names, no un-permutation for qwen2)
    into a model computing the original's logits; sparsedge.load converts it like any GGUF."""
    from transformers import AutoModelForCausalLM

    write_gguf(qwen2, tmp_path / "q.gguf", progress=False)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32)
    orig = AutoModelForCausalLM.from_pretrained(str(qwen2.path), dtype=torch.float32)
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), orig(ids).logits.numpy(), atol=1e-4, rtol=0)
    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path / "home"))
    m = load(str(tmp_path / "q.gguf"), progress=False)
    assert m.kind == "gguf" and m.spec.rms_eps == pytest.approx(qwen2.spec.rms_eps)  # a float32 in GGUF
    assert dataclasses.replace(m.spec, rms_eps=qwen2.spec.rms_eps) == qwen2.spec


def test_what_llama_cpp_would_compute_differently_is_refused(gemma, tmp_path):
    odd = dataclasses.replace(gemma, spec=dataclasses.replace(gemma.spec, attn_scale=0.5))
    with pytest.raises(SparsedgeError, match="attention scale"):
        write_gguf(odd, tmp_path / "x.gguf", progress=False)
    biased = dataclasses.replace(gemma, spec=dataclasses.replace(gemma.spec, arch="llama", act="silu", qk_norm=False,
                                                                 sandwich_norm=False, norm_offset=0.0, embed_scale=1.0,
                                                                 attn_scale=None, sliding_window=None, qkv_bias=True))
    with pytest.raises(SparsedgeError, match="cannot write a llama GGUF: q/k/v biases"):
        write_gguf(biased, tmp_path / "x.gguf", progress=False)
    wide = dataclasses.replace(biased, spec=dataclasses.replace(biased.spec, arch="qwen2", head_dim=32))
    with pytest.raises(SparsedgeError, match="cannot write a qwen2 GGUF: 4 heads of 32 for hidden size 64"):
        write_gguf(wide, tmp_path / "x.gguf", progress=False)
    other = dataclasses.replace(gemma, spec=dataclasses.replace(gemma.spec, arch="mixtral"))
    with pytest.raises(SparsedgeError, match="no GGUF writer for architecture 'mixtral'"):
        write_gguf(other, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- quant types


def _independent_errors(path, ref: dict[str, np.ndarray]) -> dict[str, tuple[str, float, float]]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        w = ref[t.name].astype(np.float64)
        e = deq.reshape(w.shape) - w
        out[t.name] = (t.tensor_type.name, np.abs(e).max() / np.abs(w).max(),
                       np.sqrt((e**2).mean()) / np.sqrt((w**2).mean()))
    return out


@pytest.mark.parametrize("quant, weight_type, embed_type, rms_bound",
                         [("f16", "F16", "F16", 1e-3), ("q8_0", "Q8_0", "Q8_0", 0.01), ("q4_0", "Q4_0", "Q8_0", 0.15)])
def test_python_quants_report_their_error(llama, tmp_path, quant, weight_type, embed_type, rms_bound):
    path = tmp_path / f"m.{quant}.gguf"
    rep = write_gguf(llama, path, quant=quant, progress=False)
    assert _field(gguf.GGUFReader(str(path)), "general.file_type") == QUANTS[quant].file_type
    ref = _reference(llama, _hf_weights(llama))
    indep = _independent_errors(path, ref)
    assert set(indep) == set(rep["tensors"])
    for name, (ttype, rel_max, rel_rms) in indep.items():
        entry = rep["tensors"][name]
        assert entry["type"] == ttype
        want = "F32" if ref[name].ndim == 1 else embed_type if name == "token_embd.weight" else weight_type
        assert ttype == want, name
        assert entry["rel_max_abs"] == pytest.approx(rel_max, rel=1e-3, abs=1e-9)
        assert entry["rel_rms"] == pytest.approx(rel_rms, rel=1e-3, abs=1e-9)
    err = rep["errors"]
    quantized = [v for v in indep.values() if v[0] != "F32"]
    assert err["quantized_tensors"] == len(quantized)
    assert err["max_rel_rms"] == pytest.approx(max(v[2] for v in quantized), rel=1e-3)
    assert err["mean_rel_rms"] == pytest.approx(np.mean([v[2] for v in quantized]), rel=1e-3)
    assert 0 < err["max_rel_rms"] < rms_bound
    assert err["max_rel_max_abs"] < 1.0


def test_rows_that_are_not_whole_blocks_stay_f32(tmp_path):
    """Hidden size 48 is not a whole number of Q4_0's 32-value blocks: tensors with rows of 48 stay
    F32, ffn_down (rows of the intermediate size 96 = 3 blocks) is quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load(str(tmp_path / "m"), progress=False)
    rep = write_gguf(loaded, tmp_path / "m.gguf", quant="q4_0", progress=False)
    types = {n: e["type"] for n, e in rep["tensors"].items()}
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.ffn_gate.weight"] == types["blk.0.attn_q.weight"] == "F32"
    assert types["token_embd.weight"] == "F32"


def test_q4_k_m_through_llama_cpp(llama, tmp_path):
    need("llama_cpp")
    path = tmp_path / "m.q4_k_m.gguf"
    rep = write_gguf(llama, path, quant="q4_k_m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.q4_k_m.gguf"]  # the F32 temporary is gone
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert _field(r, VERSION_KEY) is not None  # llama.cpp carries our keys over
    indep = _independent_errors(path, _reference(llama, _hf_weights(llama)))
    for name, (ttype, rel_max, rel_rms) in indep.items():
        assert rep["tensors"][name]["type"] == ttype
        assert rep["tensors"][name]["rel_rms"] == pytest.approx(rel_rms, rel=1e-3, abs=1e-9)
    # rows of 64 / 128 are not whole 256-value K blocks: llama.cpp falls back to 32-blocks
    assert {v[0] for v in indep.values()} - {"F32"}
    assert 0 < rep["errors"]["max_rel_rms"] < 0.15


def test_unknown_quant_is_a_clear_error(llama, tmp_path):
    known = r"\(known: f32, f16, q8_0, q4_0, q4_k_m\)"
    with pytest.raises(SparsedgeError, match=r"unknown GGUF quant type 'q3_zz' " + known):
        write_gguf(llama, tmp_path / "m.gguf", quant="q3_zz", progress=False)
    with pytest.raises(SparsedgeError, match="known: "):
        check_quant("Q5_K_S")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("bad", ["shape", "nan", "missing"])
def test_failed_write_leaves_nothing(llama, tmp_path, bad):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"an older file")
    w = dict(llama.state_dict())
    if bad == "shape":
        w["layers.1.up"] = w["layers.1.up"][:, :-1]
    elif bad == "nan":
        w["layers.2.down"] = w["layers.2.down"].clone()
        w["layers.2.down"][0, 0] = float("nan")
    else:
        del w["layers.0.v"]
    with pytest.raises(SparsedgeError, match={"shape": "layers.1.up has shape", "nan": "NaN",
                                              "missing": "lack layers.0.v"}[bad]):
        write_gguf(llama, path, quant="q8_0", weights=w, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind
    assert path.read_bytes() == b"an older file"  # and the old file untouched


def test_every_architecture_has_a_gguf_writer():
    from sparsedge.export.gguf import ARCHS
    from tiny import ARCHS as TINY

    arch.supported_model_types()
    assert set(ARCHS) == set(arch._REGISTRY) == set(TINY)
