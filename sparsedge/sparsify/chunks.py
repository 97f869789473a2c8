"""Chunk sparsity: BlockFFN's chunk-level sparsity (CLS), co-activation clustering of FFN neurons,
function-preserving neuron permutations, training-free top-chunk routing, and expert-level CLS of
MoE models.

Shapes: a mask or criterion is [T, ffn] (token x neuron); a chunk is ``chunk_size`` consecutive
neurons, so a layer has ffn / chunk_size chunks. A permutation ``perm`` [ffn] means
"new neuron j = old neuron perm[j]".

Why CLS and not per-token sparsity: a kernel that skips whole chunks (or an MoE that skips whole
experts) only saves memory traffic for chunks that no token of the batch (draft tree, verify
window) activates. BlockFFN defines CLS_k over windows of k consecutive tokens:
CLS_k = 1 - (active chunk-windows) / (all chunk-windows). DESIGN §3 measured on SmolLM2 at 50%
per-token sparsity that only ~0.1% of 32-neuron chunks are fully inactive in the original neuron
order; clustering neurons that fire together (``cluster_neurons``) and permuting the FFN
(``permute_ffn``) raises that several-fold without changing the model's function.

The numpy parts (CLS, clustering) do not need torch; torch is imported only where tensors are used.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from ..errors import SparsedgeError

if TYPE_CHECKING:  # torch is optional on the runtime path (pyproject: the [torch] extra)
    import torch

DEFAULT_KS = (1, 2, 4, 8)

# cluster_neurons subsamples at most this many tokens: co-activation statistics of 1536 neurons
# are stable well before 4k tokens, and the cost of each k-means iteration is linear in tokens.
CLUSTER_MAX_TOKENS = 4096

# MoE families whose router picks the top num_experts_per_tok experts of softmax(router logits),
# as transformers' MixtralTopKRouter / Qwen2MoeTopKRouter / Qwen3MoeTopKRouter do (model_type keys).
SOFTMAX_TOPK_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


# ---------------------------------------------------------------------------------------------
# validation shared by everything below


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise SparsedgeError(f"chunk_size must be an integer, got {chunk_size!r}")
    if chunk_size <= 0:
        raise SparsedgeError(f"chunk_size must be positive, got {chunk_size}")
    return int(chunk_size)


def _n_chunks(ffn: int, chunk_size: int) -> int:
    chunk_size = _check_chunk_size(chunk_size)
    if ffn % chunk_size:
        raise SparsedgeError(f"chunk_size {chunk_size} does not divide the FFN width {ffn}")
    return ffn // int(chunk_size)


def _as_mask(mask) -> np.ndarray:
    """bool [T, ffn] from a numpy array or a CPU torch tensor."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise SparsedgeError(f"mask must be 2-D [tokens, neurons], got shape {m.shape}")
    return m.astype(bool, copy=False)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in out):
        raise SparsedgeError(f"window sizes ks must be positive integers, got {out!r}")
    return tuple(int(k) for k in out)


def _check_perm(perm, n: int) -> np.ndarray:
    """perm as int64 [n], or SparsedgeError if it is not a permutation of range(n)."""
    p = np.asarray(perm)
    if p.ndim != 1 or p.shape[0] != n:
        raise SparsedgeError(f"permutation must have shape ({n},), got {p.shape}")
    if p.dtype.kind not in "iu":
        raise SparsedgeError(f"permutation must hold integers, got dtype {p.dtype}")
    p = p.astype(np.int64)
    if n and (p.min() < 0 or p.max() >= n or np.bincount(p, minlength=n).max() != 1):
        raise SparsedgeError(f"not a permutation of range({n}): indices repeat or fall outside")
    return p


# ---------------------------------------------------------------------------------------------
# chunk-level sparsity (BlockFFN)


def _window_counts(mask: np.ndarray, chunk_size: int, ks: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """{k: (active chunk-windows, all chunk-windows)} for one block of rows; a partial last window
    is dropped."""
    T, ffn = mask.shape
    n_chunks = _n_chunks(ffn, chunk_size)
    chunk_on = mask.reshape(T, n_chunks, chunk_size).any(axis=2)  # [T, n_chunks]
    out = {}
    for k in ks:
        nwin = T // k
        on = chunk_on[: nwin * k].reshape(nwin, k, n_chunks).any(axis=1)  # [nwin, n_chunks]
        out[k] = (int(on.sum()), nwin * n_chunks)
    return out


class ClsMeter:
    """Streams CLS_k over many blocks of rows, e.g. [128, ffn] per layer and evaluation batch.

    Each ``add`` windows its own rows (a partial last window is dropped), so pass blocks whose
    length is a multiple of every k (8 for the default ks) to get the same figure as one call on
    the concatenation.
    """

    def __init__(self, chunk_size: int, ks: Iterable[int] = DEFAULT_KS):
        self.chunk_size = chunk_size
        self.ks = _check_ks(ks)
        _check_chunk_size(chunk_size)  # now, not at the first add
        self.ffn: int | None = None
        self.active = {k: 0 for k in self.ks}
        self.total = {k: 0 for k in self.ks}

    def add(self, mask) -> None:
        m = _as_mask(mask)
        if self.ffn is None:
            _n_chunks(m.shape[1], self.chunk_size)
            self.ffn = m.shape[1]
        elif m.shape[1] != self.ffn:
            raise SparsedgeError(f"mask has {m.shape[1]} neurons; earlier masks had {self.ffn}")
        for k, (a, t) in _window_counts(m, self.chunk_size, self.ks).items():
            self.active[k] += a
            self.total[k] += t

    def result(self) -> dict[int, float]:
        short = [k for k in self.ks if self.total[k] == 0]
        if short:
            raise SparsedgeError(f"no complete window of k={short[0]} tokens was added; CLS is undefined")
        return {k: 1.0 - self.active[k] / self.total[k] for k in self.ks}


def chunk_level_sparsity(mask: np.ndarray, chunk_size: int, ks=DEFAULT_KS) -> dict[int, float]:
    """BlockFFN's CLS_k for each k: mask bool [T, ffn] (True = neuron active for that token)."""
    meter = ClsMeter(chunk_size, ks)
    meter.add(mask)
    return meter.result()


# ---------------------------------------------------------------------------------------------
# co-activation clustering


def _balanced_assign(score: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row (neuron) of score [ffn, n_chunks] to a column (chunk) holding exactly
    ``capacity`` rows, greedily by score: in each round every unassigned neuron proposes to its
    best chunk with room left, and each chunk accepts its highest-scoring proposers up to its room.
    Returns the chunk of every neuron, int64 [ffn]."""
    ffn, n_chunks = score.shape
    room = np.full(n_chunks, capacity, dtype=np.int64)
    assign = np.full(ffn, -1, dtype=np.int64)
    todo = np.arange(ffn)
    while todo.size:
        s = np.where(room[None, :] > 0, score[todo], -np.inf)  # [n_todo, n_chunks]
        want = s.argmax(axis=1)  # [n_todo]
        best = s[np.arange(todo.size), want]
        # group proposals by chunk, best first (ties: lower neuron index, for determinism)
        order = np.lexsort((todo, -best, want))
        want_o = want[order]
        first = np.searchsorted(want_o, want_o, side="left")
        rank = np.arange(order.size) - first  # rank of each proposal within its chunk
        ok = rank < room[want_o]
        won = order[ok]
        assign[todo[won]] = want[won]
        np.subtract.at(room, want[won], 1)
        todo = np.delete(todo, won)
    return assign


def _one_hot(assign: np.ndarray, n_chunks: int) -> np.ndarray:
    """Membership matrix float32 [ffn, n_chunks] of an assignment int64 [ffn]."""
    a = np.zeros((assign.size, n_chunks), dtype=np.float32)
    a[np.arange(assign.size), assign] = 1.0
    return a


def _centroids(x: np.ndarray, assign: np.ndarray, n_chunks: int) -> np.ndarray:
    """Unit-norm mean of each chunk's member rows: x [ffn, T] -> [n_chunks, T]."""
    # every chunk has the same number of members, so sorting by chunk gives equal-length groups
    order = np.argsort(assign, kind="stable")
    c = x[order].reshape(n_chunks, -1, x.shape[1]).sum(axis=1)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _kmeanspp(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows (distance 1 - cosine): indices of n rows."""
    ffn = x.shape[0]
    first = int(rng.integers(ffn))
    picks = [first]
    d = np.maximum(1.0 - x @ x[first], 0.0)  # [ffn]
    for _ in range(n - 1):
        tot = float(d.sum())
        i = int(rng.choice(ffn, p=d / tot)) if tot > 0 else int(rng.integers(ffn))
        picks.append(i)
        d = np.minimum(d, np.maximum(1.0 - x @ x[i], 0.0))
    return np.asarray(picks)


def _spherical_kmeans(x: np.ndarray, chunk_size: int, rng: np.random.Generator, iters: int) -> np.ndarray:
    """Balanced spherical k-means of the rows of x [ffn, T]: chunk of every row, int64 [ffn]."""
    n_chunks = x.shape[0] // chunk_size
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1.0)  # all-zero rows stay zero
    assign = _balanced_assign(x @ x[_kmeanspp(x, n_chunks, rng)].T, chunk_size)
    for _ in range(iters):
        new = _balanced_assign(x @ _centroids(x, assign, n_chunks).T, chunk_size)  # cosine scores
        if np.array_equal(new, assign):
            break
        assign = new
    return assign


# Refinement temperature: a chunk with n active members at a token counts exp(-beta * n) towards
# the score of the neurons that are silent there. 0.5 beat 0.25..2 (and annealing) on SmolLM2.
SOFT_AND_BETA = 0.5


def cluster_neurons(mask: np.ndarray, chunk_size: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """Permutation int64 [ffn] (new neuron j = old neuron perm[j]) that puts neurons which fire
    together into the same chunk of ``chunk_size`` consecutive positions. mask bool [T, ffn].

    Balanced clustering into n_chunks = ffn / chunk_size chunks of exactly chunk_size neurons, each
    iteration scoring every (neuron, chunk) pair with a matrix product and assigning greedily under
    the capacity constraint (``_balanced_assign``). Two phases of at most ``iters`` iterations:

    1. spherical k-means (k-means++ seeding) on the neurons' *silence* vectors (columns of ~mask):
       cosine = P(both off) / sqrt(P(i off) P(j off)) rewards neurons that are quiet together, which
       is what a fully inactive chunk needs;
    2. refinement on the objective itself, the number of (token, chunk) pairs with no active
       member: with n_on [T, n_chunks] the active members per chunk, a neuron scores
       sum_t off[t, i] * exp(-beta * n_on[t, c]) for chunk c (a smooth version of "chunk c is
       silent when i is"; the hard version has no signal while nearly no chunk is ever silent).

    Returns the assignment with the most fully inactive (token, chunk) pairs seen. At most
    CLUSTER_MAX_TOKENS tokens are used (a seeded sample). Chunks come out in the order of their
    smallest original neuron, members in ascending original order.
    """
    m = _as_mask(mask)
    T, ffn = m.shape
    n_chunks = _n_chunks(ffn, chunk_size)
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise SparsedgeError(f"iters must be a positive integer, got {iters!r}")
    if T == 0:
        raise SparsedgeError("mask has no tokens; cannot cluster neurons")
    rng = np.random.default_rng(seed)
    if T > CLUSTER_MAX_TOKENS:
        m = m[np.sort(rng.choice(T, CLUSTER_MAX_TOKENS, replace=False))]
    on = m.astype(np.float32)  # [T', ffn]
    off = 1.0 - on

    # phase 1 only seeds phase 2: a quarter of the tokens is enough and 4x cheaper
    n_init = min(on.shape[0], CLUSTER_MAX_TOKENS // 4)
    init_rows = np.sort(rng.choice(on.shape[0], n_init, replace=False))
    assign = _spherical_kmeans(np.ascontiguousarray(off[init_rows].T), chunk_size, rng, iters)
    n_on = on @ _one_hot(assign, n_chunks)  # [T', n_chunks] active members per chunk and token
    best, best_silent = assign, int((n_on == 0).sum())
    for _ in range(iters):
        score = off.T @ np.exp(-SOFT_AND_BETA * n_on)  # [ffn, n_chunks]
        new = _balanced_assign(score, chunk_size)
        if np.array_equal(new, assign):
            break
        assign = new
        n_on = on @ _one_hot(assign, n_chunks)
        silent = int((n_on == 0).sum())
        if silent > best_silent:
            best, best_silent = assign, silent

    # chunk order: by smallest member; within a chunk: ascending original index
    first = np.full(n_chunks, ffn, dtype=np.int64)
    np.minimum.at(first, best, np.arange(ffn))
    rank = np.empty(n_chunks, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_chunks)
    return np.lexsort((np.arange(ffn), rank[best])).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# function-preserving permutations


def permute_ffn(weights: dict[str, "torch.Tensor"], layer: int, perm) -> None:
    """Permute layer ``layer``'s FFN neurons in the canonical weight dict, in place: rows of
    ``gate`` and ``up`` [ffn, hidden] and columns of ``down`` [hidden, ffn] by perm [ffn].

    The model computes the same function (the FFN output is a sum over neurons). The three dict
    entries are replaced by new tensors; tensors shared with another model are left untouched.
    """
    import torch

    p = f"layers.{layer}."
    missing = [n for n in ("gate", "up", "down") if p + n not in weights]
    if missing:
        raise SparsedgeError(f"weights lack tensor {p + missing[0]!r}")
    ffn = weights[p + "gate"].shape[0]
    idx = torch.from_numpy(_check_perm(perm, ffn))
    weights[p + "gate"] = weights[p + "gate"][idx]
    weights[p + "up"] = weights[p + "up"][idx]
    weights[p + "down"] = weights[p + "down"][:, idx].contiguous()


def permute_channels(t, perm):
    """A per-FFN-channel vector (or [..., ffn] array) in the permuted neuron order: t[..., perm].

    Use it for CHESS per-channel thresholds, E|up_i| statistics, anything indexed by neuron."""
    p = _check_perm(perm, t.shape[-1])
    if isinstance(t, np.ndarray):
        return t[..., p]
    import torch

    return t[..., torch.from_numpy(p).to(t.device)]


# ---------------------------------------------------------------------------------------------
# training-free chunk routing


def _kept_chunks(keep: float, n_chunks: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < keep <= 1.0:
        raise SparsedgeError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return max(1, math.floor(keep * n_chunks + 0.5))  # round half up, at least one chunk


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise SparsedgeError(f"window must be a positive integer, got {window!r}")
    return int(window)


def route_top_chunks(crit: "torch.Tensor", chunk_size: int, window: int, keep: float) -> "torch.Tensor":
    """Bool mask [n, ffn]: in each window of ``window`` consecutive rows (a partial last window is
    its own window), keep the m = round(keep * n_chunks) chunks (at least 1) with the largest sum
    of crit [n, ffn] (nonnegative, e.g. |down_in|) over the window's tokens and the chunk's
    neurons, for every token of that window. CLS_window is therefore exactly 1 - m / n_chunks."""
    import torch

    if crit.ndim != 2:
        raise SparsedgeError(f"criterion must be 2-D [tokens, neurons], got shape {tuple(crit.shape)}")
    n, ffn = crit.shape
    n_chunks = _n_chunks(ffn, chunk_size)
    window = _check_window(window)
    m = _kept_chunks(keep, n_chunks)
    nwin = -(-n // window)
    per_tok = crit.float().reshape(n, n_chunks, chunk_size).sum(-1)  # [n, n_chunks]
    padded = torch.zeros(nwin * window, n_chunks, dtype=per_tok.dtype, device=crit.device)
    padded[:n] = per_tok
    per_win = padded.view(nwin, window, n_chunks).sum(1)  # [nwin, n_chunks]
    top = per_win.topk(m, dim=1).indices  # [nwin, m]
    on = torch.zeros(nwin, n_chunks, dtype=torch.bool, device=crit.device).scatter_(1, top, True)
    on = on.repeat_interleave(window, 0)[:n]  # [n, n_chunks]: each token gets its window's chunks
    return on.repeat_interleave(chunk_size, 1)  # [n, ffn]


Hook = Callable[[int, "torch.Tensor"], "torch.Tensor"]


def routing_hook(chunk_size: int, window: int, keep: float, inner: Hook | None = None) -> Hook:
    """A Decoder hook (layer, x [k, ffn]) -> x * route_top_chunks(|x|, ...), for a site such as
    ``down_in``. ``inner`` (e.g. a threshold hook of a sparsity recipe) is applied first, so routing
    ranks chunks by what survives it. Windows are rows of one forward call (a decode step of one
    token is a window of one)."""
    # fail at construction, not at the first forward
    _check_window(window)
    _kept_chunks(keep, 1)
    _check_chunk_size(chunk_size)

    def hook(layer: int, x: "torch.Tensor") -> "torch.Tensor":
        if inner is not None:
            x = inner(layer, x)
        return x * route_top_chunks(x.abs(), chunk_size, window, keep).to(x.dtype)

    return hook


# ---------------------------------------------------------------------------------------------
# MoE expert-level CLS


def moe_expert_cls_per_layer(hf_model, input_ids: np.ndarray, ks=DEFAULT_KS) -> list[dict[int, float]]:
    """CLS_k over experts (chunk_size 1: an expert is a chunk) of every MoE layer of a transformers
    Mixtral / Qwen2-MoE / Qwen3-MoE model, from one forward over input_ids [T] or [B, T] (each
    sequence is windowed on its own). A token activates the num_experts_per_tok experts with the
    largest softmax(router logits), as the models' routers select them. Layers without a router
    (Qwen's mlp_only_layers) are skipped."""
    import torch

    cfg = hf_model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SOFTMAX_TOPK_MOE:
        raise SparsedgeError(
            f"expert-level CLS supports MoE model types {', '.join(SOFTMAX_TOPK_MOE)}; got {mt!r}"
        )
    ks = _check_ks(ks)
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise SparsedgeError(f"input_ids must be integer [T] or [B, T], got shape {ids.shape}")
    top_k = int(cfg.num_experts_per_tok)
    with torch.inference_mode():
        out = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_router_logits=True,
                       use_cache=False)
    logits = out.router_logits
    if not logits:
        raise SparsedgeError(f"{type(hf_model).__name__} returned no router logits")
    B, T = ids.shape
    per_layer = []
    for lg in logits:  # [B*T, n_experts] per MoE layer
        n_exp = lg.shape[-1]
        chosen = torch.softmax(lg.float(), dim=-1).topk(top_k, dim=-1).indices  # [B*T, top_k]
        mask = torch.zeros(B * T, n_exp, dtype=torch.bool).scatter_(1, chosen, True)
        meter = ClsMeter(1, ks)
        for row in mask.view(B, T, n_exp).numpy():
            meter.add(row)
        per_layer.append(meter.result())
    return per_layer


def moe_expert_cls(hf_model, input_ids: np.ndarray, ks=DEFAULT_KS) -> dict[int, float]:
    """Expert-level CLS_k averaged over the MoE layers (see moe_expert_cls_per_layer)."""
    per_layer = moe_expert_cls_per_layer(hf_model, input_ids, ks)
    return {k: float(np.mean([d[k] for d in per_layer])) for k in per_layer[0]}
