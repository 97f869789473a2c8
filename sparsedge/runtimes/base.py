"""The Runtime protocol (DESIGN.md §2) and the tree helpers every runtime shares.

A runtime holds one sequence's KV cache. ``forward`` appends k entries and returns their logits;
``keep`` keeps a subset of those k (the accepted path of a draft tree) and compacts the cache;
``truncate`` and ``reset`` roll it back. Decoding is written once against this interface.

Optional attribute ``exact_trees`` (default True): whether every row of a tree-masked forward, and
every step after ``keep`` of a branch, gives bit-identical logits to sequential decoding. Runtimes
whose numerics depend on the cache layout or batch composition set it False, and speculative
decoding then verifies chains only, so that its output still equals plain greedy's.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import SparsedgeError


@runtime_checkable
class Runtime(Protocol):
    name: str

    @property
    def n_past(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def forward(
        self,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray | None = None,
        tree_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append k tokens; return float32 logits [k, vocab].

        positions: [k] ints, default n_past + arange(k). tree_mask: bool [k, k], row i true at the
        new tokens token i sees (its ancestors and itself); default causal (lower triangle). Every
        earlier cache entry is visible to every new token.
        """
        ...

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these of the last-appended entries (0..k-1, in this order), compacting the cache."""
        ...

    def truncate(self, n: int) -> None: ...

    def reset(self) -> None: ...


def check_forward_args(
    tokens, positions, tree_mask, n_past: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and default the arguments of ``forward``: tokens [k], positions [k], mask bool [k, k]."""
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    k = toks.shape[0]
    if k == 0:
        raise SparsedgeError("forward needs at least one token")
    if toks.min() < 0 or toks.max() >= vocab_size:
        raise SparsedgeError(f"token id out of range 0..{vocab_size - 1}")
    if positions is None:
        pos = n_past + np.arange(k, dtype=np.int64)
    else:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.shape[0] != k:
            raise SparsedgeError(f"{pos.shape[0]} positions for {k} tokens")
    if tree_mask is None:
        mask = np.tril(np.ones((k, k), dtype=bool))
    else:
        mask = np.asarray(tree_mask, dtype=bool)
        if mask.shape != (k, k):
            raise SparsedgeError(f"tree_mask has shape {mask.shape}, expected {(k, k)}")
        if not mask.diagonal().all():
            raise SparsedgeError("tree_mask must let every token see itself")
    return toks, pos, mask


def additive_bias(allowed: np.ndarray, mask_value) -> np.ndarray:
    """bool [k, total] -> the additive attention bias float32 [1, 1, k, total] of sparsedge's ONNX
    graphs: 0 where a key is visible, mask_value (the graph's sparsedge.mask_value) where hidden."""
    return np.where(allowed, np.float32(0.0), np.float32(mask_value)).astype(np.float32)[None, None]


def check_keep_indices(indices, last_k: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= last_k):
        raise SparsedgeError(f"keep indices must lie in 0..{last_k - 1}")
    if len(set(idx.tolist())) != idx.size:
        raise SparsedgeError("keep indices must be distinct")
    return idx


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    """Depth of each node (roots have depth 0); parents[i] < i, or -1 for a root."""
    depth = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        if p >= i:
            raise SparsedgeError("tree nodes must come after their parents")
        depth[i] = 0 if p < 0 else depth[p] + 1
    return depth


def tree_mask(parents: Sequence[int]) -> np.ndarray:
    """bool [k, k]: row i is true at i and at every ancestor of i."""
    k = len(parents)
    m = np.eye(k, dtype=bool)
    for i, p in enumerate(parents):
        if p >= i:
            raise SparsedgeError("tree nodes must come after their parents")
        if p >= 0:
            m[i] |= m[p]
    return m
