"""Chunk sparsity: CLS against a loop reference, co-activation clustering on planted groups,
function-preserving permutations on every tiny architecture, top-chunk routing, and MoE
expert-level CLS against the routers' own weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedge.errors import SparsedgeError
from sparsedge.runtimes.torch_ref import TorchRuntime
from sparsedge.sparsify import chunks as C


def loop_counts(mask: np.ndarray, chunk: int, k: int) -> tuple[int, int]:
    """(active, total) chunk-windows by BlockFFN's definition, one window and chunk at a time."""
    T, ffn = mask.shape
    active = total = 0
    for w in range(T // k):
        for c in range(ffn // chunk):
            total += 1
            active += bool(mask[w * k : (w + 1) * k, c * chunk : (c + 1) * chunk].any())
    return active, total


def loop_cls(mask: np.ndarray, chunk: int, k: int) -> float:
    active, total = loop_counts(mask, chunk, k)
    return 1.0 - active / total


# ---------------------------------------------------------------------------------------------
# chunk-level sparsity


def test_cls_hand_example():
    # 4 neurons in 2 chunks of 2; chunk activity per token: [1,0], [0,0], [0,1], [1,0]
    mask = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], dtype=bool)
    assert C.chunk_level_sparsity(mask, 2, ks=(1, 2, 4)) == {1: 5 / 8, 2: 1 / 4, 4: 0.0}
    # a fifth, dense token: a window of its own for k=1, dropped as a partial window for k=2, 4
    mask5 = np.vstack([mask, np.ones((1, 4), dtype=bool)])
    assert C.chunk_level_sparsity(mask5, 2, ks=(1, 2, 4)) == {1: 0.5, 2: 1 / 4, 4: 0.0}
    # chunk_size 1, k=1: plain sparsity (3 of 16 entries active)
    assert C.chunk_level_sparsity(mask, 1, ks=(1,))[1] == pytest.approx(1 - 3 / 16)


@pytest.mark.parametrize("density", [0.02, 0.2, 0.6])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_cls_matches_loop_reference(density, chunk):
    rng = np.random.default_rng(int(density * 100) + chunk)
    mask = rng.random((37, 64)) < density  # 37 tokens: partial last windows for k = 2, 3, 8
    got = C.chunk_level_sparsity(mask, chunk, ks=(1, 2, 3, 8))
    assert list(got) == [1, 2, 3, 8]
    for k, v in got.items():
        assert v == pytest.approx(loop_cls(mask, chunk, k), abs=1e-12)


def test_cls_default_ks_and_torch_input():
    rng = np.random.default_rng(1)
    mask = rng.random((16, 32)) < 0.1
    got = C.chunk_level_sparsity(torch.from_numpy(mask), 8)
    assert list(got) == [1, 2, 4, 8]
    assert got[8] == pytest.approx(loop_cls(mask, 8, 8))


def test_cls_meter_streams_blocks():
    rng = np.random.default_rng(2)
    mask = rng.random((96, 64)) < 0.05
    whole = C.chunk_level_sparsity(mask, 8)
    meter = C.ClsMeter(8)
    for start in range(0, 96, 16):  # blocks that are multiples of 8: same windows as one call
        meter.add(mask[start : start + 16])
    assert meter.result() == pytest.approx(whole, abs=1e-12)

    # blocks of 12 rows are windowed on their own: each contributes one k=8 window (rows 0-7)
    meter = C.ClsMeter(8, ks=(8,))
    active = total = 0
    for start in range(0, 96, 12):
        meter.add(mask[start : start + 12])
        a, t = loop_counts(mask[start : start + 12], 8, 8)
        active, total = active + a, total + t
    assert total == 8 * 8
    assert meter.result()[8] == pytest.approx(1 - active / total, abs=1e-12)


def test_cls_errors():
    mask = np.zeros((8, 64), dtype=bool)
    for bad in (0, -4, 3, 2.0, True):
        with pytest.raises(SparsedgeError, match="chunk_size"):
            C.chunk_level_sparsity(mask, bad)
    with pytest.raises(SparsedgeError, match="chunk_size"):
        C.ClsMeter(0)
    with pytest.raises(SparsedgeError, match="2-D"):
        C.chunk_level_sparsity(np.zeros(64, dtype=bool), 8)
    with pytest.raises(SparsedgeError, match="window sizes"):
        C.chunk_level_sparsity(mask, 8, ks=(0, 1))
    with pytest.raises(SparsedgeError, match="k=16"):
        C.chunk_level_sparsity(mask, 8, ks=(1, 16))  # 8 tokens hold no window of 16
    meter = C.ClsMeter(8)
    meter.add(mask)
    with pytest.raises(SparsedgeError, match="32 neurons"):
        meter.add(np.zeros((8, 32), dtype=bool))
    with pytest.raises(SparsedgeError, match="no complete window"):
        C.ClsMeter(8).result()


# ---------------------------------------------------------------------------------------------
# co-activation clustering


def planted(seed: int, T: int = 2000, groups: int = 16, size: int = 16):
    """Mask [T, groups*size] whose neurons fire in groups, columns shuffled; and each column's group.

    A group is on for a token with probability 0.3; then each member fires with probability 0.9,
    otherwise 0.02 (noise both ways)."""
    r = np.random.default_rng(seed)
    ffn = groups * size
    group_on = np.repeat(r.random((T, groups)) < 0.3, size, axis=1)  # [T, ffn]
    on = np.where(group_on, r.random((T, ffn)) < 0.9, r.random((T, ffn)) < 0.02)
    shuffle = r.permutation(ffn)
    return on[:, shuffle], np.repeat(np.arange(groups), size)[shuffle]


def is_perm(p: np.ndarray, n: int) -> bool:
    return p.dtype == np.int64 and p.shape == (n,) and np.array_equal(np.sort(p), np.arange(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_recovers_planted_groups(seed):
    mask, group = planted(seed)
    perm = C.cluster_neurons(mask, 16, seed=seed)
    assert is_perm(perm, 256)
    by_chunk = group[perm].reshape(16, 16)  # planted group of each member of each new chunk
    assert (by_chunk == by_chunk[:, :1]).all(), "every chunk must be exactly one planted group"
    before = C.chunk_level_sparsity(mask, 16)
    after = C.chunk_level_sparsity(mask[:, perm], 16)
    # a chunk is silent when its group is off and no member misfires: 0.7 * 0.98**16 = 0.51
    assert before[1] < 0.05 and after[1] > 0.45
    assert after[2] > 0.2 > before[2]


def test_cluster_finds_silent_chunks_in_latent_factor_data():
    # no planted groups: neurons fire when a noisy projection of an 8-d latent is negative
    r = np.random.default_rng(0)
    pre = r.standard_normal((2000, 8)) @ r.standard_normal((8, 256)) + 0.5 * r.standard_normal((2000, 256))
    mask = pre + 1.0 < 0  # about 35% active
    perm = C.cluster_neurons(mask, 16)
    assert C.chunk_level_sparsity(mask, 16, ks=(1,))[1] < 0.01
    assert C.chunk_level_sparsity(mask[:, perm], 16, ks=(1,))[1] > 0.08


def test_cluster_deterministic_ordered_and_subsampled(monkeypatch):
    # force the token-subsampling path (T > CLUSTER_MAX_TOKENS) on a small mask
    monkeypatch.setattr(C, "CLUSTER_MAX_TOKENS", 600)
    mask, group = planted(5, T=2000, groups=8, size=8)
    perm = C.cluster_neurons(mask, 8, seed=3)
    assert np.array_equal(perm, C.cluster_neurons(mask, 8, seed=3))
    assert is_perm(perm, 64)
    chunks = perm.reshape(8, 8)
    assert (np.diff(chunks, axis=1) > 0).all()  # members ascending
    assert (np.diff(chunks[:, 0]) > 0).all()  # chunks ordered by their smallest member
    by_chunk = group[perm].reshape(8, 8)
    assert (by_chunk == by_chunk[:, :1]).all()


def test_cluster_handles_dead_and_always_on_neurons():
    rng = np.random.default_rng(4)
    mask = rng.random((200, 32)) < 0.5
    mask[:, :5] = False  # never fire
    mask[:, 5:9] = True  # always fire
    perm = C.cluster_neurons(mask, 8, iters=5)
    assert is_perm(perm, 32)


def test_cluster_errors():
    mask = np.zeros((10, 64), dtype=bool)
    with pytest.raises(SparsedgeError, match="does not divide"):
        C.cluster_neurons(mask, 48)
    with pytest.raises(SparsedgeError, match="chunk_size"):
        C.cluster_neurons(mask, 0)
    with pytest.raises(SparsedgeError, match="iters"):
        C.cluster_neurons(mask, 8, iters=0)
    with pytest.raises(SparsedgeError, match="no tokens"):
        C.cluster_neurons(np.zeros((0, 64), dtype=bool), 8)


# ---------------------------------------------------------------------------------------------
# function-preserving permutations


def token_ids(rt: TorchRuntime, n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, rt.vocab_size, n)


def layer_perms(rt: TorchRuntime, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(rt.spec.intermediate_size) for _ in range(rt.spec.n_layers)]


def test_permute_ffn_preserves_logits(tiny):
    _, rt = tiny
    ids = token_ids(rt)
    orig = dict(rt.model.w)
    ref = TorchRuntime(rt.spec, orig).forward(ids)
    perms = layer_perms(rt)
    for i, p in enumerate(perms):
        C.permute_ffn(rt.model.w, i, p)
    w0 = rt.model.w
    assert torch.equal(w0["layers.0.gate"], orig["layers.0.gate"][perms[0]])
    assert torch.equal(w0["layers.0.up"], orig["layers.0.up"][perms[0]])
    assert torch.equal(w0["layers.0.down"], orig["layers.0.down"][:, perms[0]])
    assert not torch.equal(w0["layers.0.gate"], orig["layers.0.gate"])
    np.testing.assert_allclose(rt.forward(ids), ref, atol=1e-5, rtol=0)

    # the original tensors (shared with the HF model) are untouched ...
    assert not torch.equal(orig["layers.0.gate"], w0["layers.0.gate"])
    np.testing.assert_allclose(TorchRuntime(rt.spec, orig).forward(ids), ref, atol=0, rtol=0)
    # ... and a permutation that misses down's columns does change the function
    bad = dict(orig)
    bad["layers.0.gate"] = orig["layers.0.gate"][perms[0]]
    bad["layers.0.up"] = orig["layers.0.up"][perms[0]]
    assert np.abs(TorchRuntime(rt.spec, bad).forward(ids) - ref).max() > 1e-3


def threshold_hook(t: list[torch.Tensor]):
    """A CHESS-like per-channel threshold at gate_act: zero x_i where |x_i| < t[layer][i]."""
    return lambda layer, x: x * (x.abs() >= t[layer])


def test_permute_channels_moves_thresholds_with_neurons(tiny):
    _, rt = tiny
    ids = token_ids(rt, seed=1)
    ffn = rt.spec.intermediate_size
    rng = np.random.default_rng(7)
    t = [torch.from_numpy(rng.uniform(0.0, 0.1, ffn).astype(np.float32))
         for _ in range(rt.spec.n_layers)]
    zeroed = []
    hook = threshold_hook(t)

    def counting(layer, x):
        y = hook(layer, x)
        zeroed.append(float((y == 0).float().mean()))
        return y

    rt.model.hooks["gate_act"] = counting
    ref = rt.forward(ids)
    assert np.mean(zeroed) > 0.2  # the thresholds do act
    rt.reset()

    perms = layer_perms(rt, seed=2)
    for i, p in enumerate(perms):
        C.permute_ffn(rt.model.w, i, p)
    moved = [C.permute_channels(t[i], perms[i]) for i in range(len(t))]
    rt.model.hooks["gate_act"] = threshold_hook(moved)
    np.testing.assert_allclose(rt.forward(ids), ref, atol=1e-5, rtol=0)
    rt.reset()
    rt.model.hooks["gate_act"] = threshold_hook(t)  # unpermuted thresholds on the permuted model
    assert np.abs(rt.forward(ids) - ref).max() > 1e-3


def test_permute_channels_numpy_and_batched():
    p = np.array([2, 0, 3, 1])
    assert np.array_equal(C.permute_channels(np.array([10, 11, 12, 13]), p), [12, 10, 13, 11])
    a = np.arange(8).reshape(2, 4)
    assert np.array_equal(C.permute_channels(a, p), a[:, p])
    assert torch.equal(C.permute_channels(torch.arange(4.0), p), torch.tensor([2.0, 0.0, 3.0, 1.0]))


@pytest.mark.parametrize(
    "perm, msg",
    [
        ([0, 1, 1, 3], "not a permutation"),
        ([0, 1, 2, 4], "not a permutation"),
        ([-1, 0, 1, 2], "not a permutation"),
        ([0, 1, 2], r"shape \(4,\)"),
        ([0.0, 1.0, 2.0, 3.0], "integers"),
    ],
)
def test_permutation_errors(perm, msg):
    w = {"layers.0.gate": torch.zeros(4, 2), "layers.0.up": torch.zeros(4, 2),
         "layers.0.down": torch.zeros(2, 4)}
    with pytest.raises(SparsedgeError, match=msg):
        C.permute_ffn(w, 0, np.array(perm))
    with pytest.raises(SparsedgeError, match=msg):
        C.permute_channels(torch.zeros(4), np.array(perm))
    with pytest.raises(SparsedgeError, match="layers.1.gate"):
        C.permute_ffn(w, 1, np.arange(4))


# ---------------------------------------------------------------------------------------------
# top-chunk routing


@pytest.mark.parametrize("n, window", [(24, 4), (26, 4), (5, 1), (3, 8)])
def test_route_top_chunks_keeps_the_heaviest_chunks(n, window):
    rng = np.random.default_rng(n + window)
    crit = rng.random((n, 64)).astype(np.float32)  # continuous: no ties
    chunk, keep = 8, 0.5
    mask = C.route_top_chunks(torch.from_numpy(crit), chunk, window, keep).numpy()
    assert mask.shape == (n, 64) and mask.dtype == bool
    m = 4  # round(0.5 * 8 chunks)
    for start in range(0, n, window):  # the last window may be partial: it is routed on its own
        rows = slice(start, min(n, start + window))
        sums = crit[rows].reshape(-1, 8, chunk).sum(axis=(0, 2))  # [8] per chunk over the window
        want = np.zeros(8, dtype=bool)
        want[np.argsort(-sums)[:m]] = True
        assert (mask[rows] == np.repeat(want, chunk)[None, :]).all()
    full = (n // window) * window
    if full:  # exactly m chunks active in every window, so CLS_window = 1 - m / n_chunks
        assert C.chunk_level_sparsity(mask[:full], chunk, ks=(window,))[window] == pytest.approx(1 - m / 8)


@pytest.mark.parametrize("keep, kept", [(1.0, 8), (0.01, 1), (0.3125, 3), (0.25, 2), (0.7, 6)])
def test_route_top_chunks_count(keep, kept):
    crit = torch.rand(16, 64)
    mask = C.route_top_chunks(crit, 8, 2, keep)
    per_tok = mask.view(16, 8, 8).all(-1).sum(-1)  # whole chunks kept per token
    assert (per_tok == kept).all() and (mask.view(16, 8, 8).any(-1).sum(-1) == kept).all()
    cls = C.chunk_level_sparsity(mask.numpy(), 8, ks=(1, 2))
    assert cls == pytest.approx({1: 1 - kept / 8, 2: 1 - kept / 8})


def test_routing_hook_applies_inner_first():
    seen = []

    def inner(layer, x):  # a threshold hook: zero |x| < 0.95
        seen.append(layer)
        return x * (x.abs() >= 0.95)

    x = torch.tensor([[0.9, -0.9, 1.0, 0.1]])  # chunk sums 1.8 | 1.1, after inner 0 | 1.0
    assert torch.equal(C.routing_hook(2, 1, 0.5)(3, x), torch.tensor([[0.9, -0.9, 0.0, 0.0]]))
    assert torch.equal(C.routing_hook(2, 1, 0.5, inner=inner)(3, x), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    assert seen == [3]


def test_routing_hook_on_runtime(tiny):
    _, rt = tiny
    ids = token_ids(rt, n=16, seed=3)
    dense = rt.forward(ids)
    rt.reset()
    rt.model.hooks["down_in"] = C.routing_hook(16, 4, 1.0)
    assert np.array_equal(rt.forward(ids), dense)  # keep everything: the same function
    rt.reset()

    hook = C.routing_hook(16, 4, 0.5)
    routed = []
    rt.model.hooks["down_in"] = lambda l, x: (routed.append(hook(l, x)), routed[-1])[1]
    out = rt.forward(ids)
    assert len(routed) == rt.spec.n_layers
    n_chunks = rt.spec.intermediate_size // 16
    want = 1 - (n_chunks // 2) / n_chunks
    for x in routed:  # [16, ffn]: exactly half the chunks carry anything in each window of 4
        cls = C.chunk_level_sparsity((x != 0).numpy(), 16, ks=(1, 4))
        assert cls == pytest.approx({1: want, 4: want})
    assert np.abs(out - dense).max() > 1e-3


def test_routing_errors():
    crit = torch.rand(4, 64)
    for keep in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(SparsedgeError, match="keep"):
            C.route_top_chunks(crit, 8, 1, keep)
        with pytest.raises(SparsedgeError, match="keep"):
            C.routing_hook(8, 1, keep)
    for window in (0, -1, 1.5):
        with pytest.raises(SparsedgeError, match="window"):
            C.route_top_chunks(crit, 8, window, 0.5)
        with pytest.raises(SparsedgeError, match="window"):
            C.routing_hook(8, window, 0.5)
    with pytest.raises(SparsedgeError, match="does not divide"):
        C.route_top_chunks(crit, 48, 1, 0.5)
    with pytest.raises(SparsedgeError, match="chunk_size"):
        C.routing_hook(0, 1, 0.5)
    with pytest.raises(SparsedgeError, match="2-D"):
        C.route_top_chunks(torch.rand(64), 8, 1, 0.5)


# ---------------------------------------------------------------------------------------------
# MoE expert-level CLS


def moe_model(family: str, **extra):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=8, **common, **extra)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, **common, **extra)
    else:
        cfg = tf.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, head_dim=8, **common, **extra)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def test_moe_families_are_the_supported_ones():
    assert set(MOE_FAMILIES) == set(C.SOFTMAX_TOPK_MOE)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_expert_cls_matches_router_weights(family):
    model = moe_model(family)
    ids = np.random.default_rng(0).integers(0, 128, 64)
    router = model.model.layers[0].mlp.gate
    captured = []
    handle = router.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().clone()))
    try:
        per_layer = C.moe_expert_cls_per_layer(model, ids)
    finally:
        handle.remove()
    assert len(per_layer) == 2

    # independent: the router's input and weight, top-2 logits by argsort, loop CLS over experts
    h = captured[0].reshape(-1, 32).numpy()  # [T, hidden]
    logits = h @ router.weight.detach().numpy().T  # [T, 8]
    mask = np.zeros((64, 8), dtype=bool)
    np.put_along_axis(mask, np.argsort(-logits, axis=1)[:, :2], True, axis=1)
    for k in (1, 2, 4, 8):
        assert per_layer[0][k] == pytest.approx(loop_cls(mask, 1, k), abs=1e-12)

    for d in per_layer:
        assert d[1] == pytest.approx(1 - 2 / 8, abs=1e-12)  # every token uses exactly top_k experts
        assert d[1] >= d[2] >= d[4] >= d[8] >= 0.0
    assert d[2] < d[1]  # unions over windows do grow: the measure is not trivially constant
    avg = C.moe_expert_cls(model, ids)
    assert avg == pytest.approx({k: np.mean([d[k] for d in per_layer]) for k in (1, 2, 4, 8)})


def test_moe_expert_cls_batches_and_skips_dense_layers():
    model = moe_model("qwen3_moe", mlp_only_layers=[0])
    ids = np.random.default_rng(1).integers(0, 128, (2, 32))
    both = C.moe_expert_cls_per_layer(model, ids, ks=(1, 4))
    assert len(both) == 1  # layer 0 is a dense MLP: no router
    one, two = (C.moe_expert_cls_per_layer(model, row, ks=(1, 4))[0] for row in ids)
    # equal lengths: each sequence holds half the windows
    assert both[0][4] == pytest.approx((one[4] + two[4]) / 2, abs=1e-12)


def test_moe_errors():
    from tiny import hf_model

    with pytest.raises(SparsedgeError, match="MoE model types"):
        C.moe_expert_cls(hf_model("llama"), np.arange(8))
    model = moe_model("mixtral")
    with pytest.raises(SparsedgeError, match="input_ids"):
        C.moe_expert_cls(model, np.zeros(8, dtype=np.float32))
    with pytest.raises(SparsedgeError, match="input_ids"):
        C.moe_expert_cls(model, np.zeros((1, 2, 8), dtype=np.int64))
    with pytest.raises(SparsedgeError, match="k=16"):
        C.moe_expert_cls(model, np.arange(8), ks=(16,))
