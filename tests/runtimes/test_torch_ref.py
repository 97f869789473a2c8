"""The torch reference runtime: against transformers, and tree / keep / truncate semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedge import SparsedgeError, arch
from sparsedge.runtimes import tree_depths, tree_mask

TOL = 1e-4
# A branching tree of 8 nodes: two children of the root, grandchildren under both, one deeper.
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 6]


def _fresh_last_logits(rt, tokens):
    """Logits of the last token of ``tokens`` run one at a time from an empty cache."""
    rt.reset()
    out = None
    for t in tokens:
        out = rt.forward([t])[-1]
    rt.reset()
    return out


def test_every_architecture_has_a_tiny_test_model():
    from tiny import ARCHS

    arch.supported_model_types()
    assert set(ARCHS) == set(arch._REGISTRY)


def test_matches_transformers(tiny):
    hf, rt = tiny
    toks = torch.randint(0, rt.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    ref = hf(toks[None]).logits[0].detach().numpy()
    got = rt.forward(toks.numpy())
    assert got.shape == (20, rt.vocab_size)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_matches_transformers_with_cache(tiny):
    """Prefill then single steps through our cache equals one full transformers pass."""
    hf, rt = tiny
    toks = np.random.default_rng(2).integers(0, rt.vocab_size, 16)
    ref = hf(torch.from_numpy(toks)[None]).logits[0].detach().numpy()
    got = [rt.forward(toks[:10])]
    got += [rt.forward(toks[i : i + 1]) for i in range(10, 16)]
    np.testing.assert_allclose(np.concatenate(got), ref, atol=TOL, rtol=0)
    assert rt.n_past == 16


def test_chain_tree_equals_sequential(tiny):
    _, rt = tiny
    rng = np.random.default_rng(3)
    prefix, chain = rng.integers(0, rt.vocab_size, 12), rng.integers(0, rt.vocab_size, 6)
    rt.forward(prefix)
    parents = list(range(-1, len(chain) - 1))
    tree = rt.forward(chain, positions=12 + tree_depths(parents), tree_mask=tree_mask(parents))
    rt.reset()
    rt.forward(prefix)
    seq = np.concatenate([rt.forward([t]) for t in chain])
    np.testing.assert_allclose(tree, seq, atol=TOL, rtol=0)


def test_branching_tree_equals_per_branch(tiny):
    _, rt = tiny
    rng = np.random.default_rng(4)
    # 12-token prefix: longer than the tiny Gemma's sliding window of 8
    prefix, nodes = rng.integers(0, rt.vocab_size, 12), rng.integers(0, rt.vocab_size, len(PARENTS))
    rt.forward(prefix)
    logits = rt.forward(nodes, positions=12 + tree_depths(PARENTS), tree_mask=tree_mask(PARENTS))
    for i in range(len(PARENTS)):
        path, j = [], i
        while j >= 0:
            path.append(nodes[j])
            j = PARENTS[j]
        ref = _fresh_last_logits(rt, list(prefix) + path[::-1])
        np.testing.assert_allclose(logits[i], ref, atol=TOL, rtol=0, err_msg=f"node {i}")


def test_keep_then_continue(tiny):
    _, rt = tiny
    rng = np.random.default_rng(5)
    prefix, nodes = rng.integers(0, rt.vocab_size, 12), rng.integers(0, rt.vocab_size, len(PARENTS))
    nxt = int(rng.integers(0, rt.vocab_size))
    path = [0, 1, 3, 6, 7]  # a root-to-leaf path of PARENTS
    rt.forward(prefix)
    rt.forward(nodes, positions=12 + tree_depths(PARENTS), tree_mask=tree_mask(PARENTS))
    rt.keep(path)
    assert rt.n_past == 12 + len(path)
    got = rt.forward([nxt])[0]
    ref = _fresh_last_logits(rt, list(prefix) + [int(nodes[i]) for i in path] + [nxt])
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_keep_nothing_and_truncate(tiny):
    _, rt = tiny
    rng = np.random.default_rng(6)
    toks = rng.integers(0, rt.vocab_size, 10)
    first = rt.forward(toks[:6])
    rt.forward(toks[6:])
    rt.keep([])  # reject every drafted token
    assert rt.n_past == 6
    rt.truncate(3)
    again = rt.forward(toks[3:6])
    np.testing.assert_allclose(again, first[3:6], atol=TOL, rtol=0)


def test_bad_arguments(tiny):
    _, rt = tiny
    with pytest.raises(SparsedgeError, match="keep"):
        rt.keep([0])
    with pytest.raises(SparsedgeError, match="out of range"):
        rt.forward([rt.vocab_size])
    with pytest.raises(SparsedgeError, match="shape"):
        rt.forward([1, 2], tree_mask=np.ones((3, 3), bool))
    with pytest.raises(SparsedgeError, match="see itself"):
        rt.forward([1, 2], tree_mask=np.zeros((2, 2), bool))
    rt.forward([1, 2, 3])
    with pytest.raises(SparsedgeError, match="0..2"):
        rt.keep([3])
    with pytest.raises(SparsedgeError, match="truncate"):
        rt.truncate(10)
    with pytest.raises(SparsedgeError, match="after their parents"):
        tree_mask([0])


def test_missing_weight_is_a_clear_error(tiny):
    from sparsedge.runtimes.torch_ref import TorchRuntime

    _, rt = tiny
    w = dict(rt.model.w)
    del w["layers.0.q"]
    with pytest.raises(SparsedgeError, match="layers.0.q"):
        TorchRuntime(rt.spec, w)
    w = dict(rt.model.w)
    w["layers.1.down"] = w["layers.1.down"].T
    with pytest.raises(SparsedgeError, match="shape"):
        TorchRuntime(rt.spec, w)


def test_qwen2_biases_are_required_and_used():
    """Qwen2's q/k/v biases: a missing one is a clear error, and they change the function (so that
    test_matches_transformers[qwen2] pins the bias adds)."""
    from sparsedge.runtimes.torch_ref import TorchRuntime
    from tiny import hf_model

    m = hf_model("qwen2")
    spec = arch.spec_from_hf(m.config)
    assert spec.qkv_bias and spec.rope_theta == 1e6 and spec.tie_embeddings
    w = arch.canonical_weights(spec, m.state_dict())
    with pytest.raises(SparsedgeError, match="layers.1.k_bias"):
        TorchRuntime(spec, {k: v for k, v in w.items() if k != "layers.1.k_bias"})
    with pytest.raises(SparsedgeError, match="layers.0.v_bias.*expected \\(32,\\)"):
        TorchRuntime(spec, {**w, "layers.0.v_bias": w["layers.0.v_bias"][:-1]})
    toks = np.arange(3, 15)
    zero = {k: v * 0 if k.endswith("_bias") else v for k, v in w.items()}
    assert np.abs(TorchRuntime(spec, w).forward(toks) - TorchRuntime(spec, zero).forward(toks)).max() > 0.1


def test_qwen2_configs_we_cannot_run_are_refused():
    from tiny import hf_config

    c = hf_config("qwen2")
    c.use_sliding_window, c.sliding_window, c.max_window_layers = True, 8, 1
    c.layer_types = ["full_attention"] + ["sliding_attention"] * 2
    with pytest.raises(SparsedgeError, match="sliding-window attention \\(window 8 < context 512\\)"):
        arch.spec_from_hf(c)
    c.sliding_window = 512  # a window over the whole context is full attention
    assert arch.spec_from_hf(c).layer_types == ["full"] * 3
    c = hf_config("qwen2")
    c.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(SparsedgeError, match="RoPE scaling 'yarn'"):
        arch.spec_from_hf(c)
    c = hf_config("qwen2")
    c.hidden_act = "gelu"
    with pytest.raises(SparsedgeError, match="Qwen2 activation 'gelu'"):
        arch.spec_from_hf(c)


@pytest.mark.slow
def test_real_model_tree_and_keep(real_runtime, real_model):
    rt = real_runtime
    prompt = real_model.tokenizer("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"]
    rng = np.random.default_rng(7)
    nodes = rng.integers(0, rt.vocab_size, len(PARENTS))
    rt.reset()
    rt.forward(prompt)
    n0 = rt.n_past
    logits = rt.forward(nodes, positions=n0 + tree_depths(PARENTS), tree_mask=tree_mask(PARENTS))
    rt.keep([0, 2, 5])
    nxt = rt.forward([11])[0]
    for i in (4, 7):
        path, j = [], i
        while j >= 0:
            path.append(int(nodes[j]))
            j = PARENTS[j]
        rt.reset()
        rt.forward(list(prompt) + path[::-1][:-1])
        ref = rt.forward([path[0]])[0]
        np.testing.assert_allclose(logits[i], ref, atol=TOL, rtol=0)
    rt.reset()
    rt.forward(list(prompt) + [int(nodes[0]), int(nodes[2]), int(nodes[5])])
    np.testing.assert_allclose(nxt, rt.forward([11])[0], atol=TOL, rtol=0)
    rt.reset()


def test_keep_after_the_cache_grew(tiny):
    """The cache regrows inside forward (inference mode); keep() must still compact it."""
    _, rt = tiny
    toks = np.random.default_rng(8).integers(0, rt.vocab_size, 300)
    rt.forward(toks[:298])
    rt.forward(toks[298:], tree_mask=np.eye(2, dtype=bool), positions=[298, 298])
    rt.keep([1])
    got = rt.forward([5])[0]
    ref = _fresh_last_logits(rt, list(toks[:298]) + [int(toks[299]), 5])
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
