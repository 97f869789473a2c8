"""Token Recycling: every verification's logits are candidates worth keeping. An adjacency matrix
holds, for each token, the top-k tokens the target predicted after it the last time it was
verified; a draft is the matrix expanded breadth-first below the root along a static template.

The matrix persists across requests (warm start), can be seeded from a corpus with one pass of
the target (``seed``), and saved / loaded with numpy. Confidence per node is the measured
acceptance rate of its bucket (rank among siblings, depth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ....errors import SparsedgeError
from ..tree import Draft, template
from . import Drafter, DraftRequest, Rates, Target, register


# values per chunk when top_k bounds its search by chunk maxima
TOPK_CHUNK = 128
# confidence buckets by the successor's probability among the kept top-k
PROB_BINS = 10


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first (equal logits in index order): [rows,
    vocab] -> [rows, k].

    A full argpartition over a 49,152-entry vocabulary costs ~0.4 ms a row, a third of a native
    decoding step when every verified row is observed. Instead: the k-th largest of the rows'
    chunk maxima ([vocab / 128] of them) is at most the k-th largest logit (k chunks hold a value
    at least that large), so the top k are among the few entries at or above it."""
    logits = np.asarray(logits)
    rows, n = logits.shape
    out = np.empty((rows, k), dtype=np.int64)
    full = n // TOPK_CHUNK * TOPK_CHUNK
    for r in range(rows):
        x = logits[r]
        if full // TOPK_CHUNK > k:
            bound = np.partition(x[:full].reshape(-1, TOPK_CHUNK).max(axis=1), -k)[-k]
            cand = np.flatnonzero(x >= bound)  # ascending: ties keep the lower index first
        else:
            cand = np.arange(n)
        v = x[cand]
        if cand.size > k:
            keep = np.sort(np.argpartition(-v, k - 1)[:k])
            cand, v = cand[keep], v[keep]
        out[r] = cand[np.argsort(-v, kind="stable")]
    return out


class RecycleDrafter(Drafter):
    name = "recycle"

    def __init__(self, vocab_size: int, k: int = 8, tree: str = "tree32", update: str = "all",
                 context: int = 2, pairs: int = 1 << 16):
        if update not in ("all", "path"):
            raise SparsedgeError("update must be 'all' or 'path'")
        if context not in (1, 2):
            raise SparsedgeError(f"recycle context must be 1 or 2 tokens, got {context}")
        if pairs < 2 or pairs & (pairs - 1):
            raise SparsedgeError(f"recycle pairs must be a power of two >= 2, got {pairs}")
        self.paths = template(tree)
        if max(max(p) for p in self.paths) >= k:
            raise SparsedgeError(f"template {tree} needs more than {k} successors per token")
        self.succ = np.full((vocab_size, k), -1, dtype=np.int32)  # [vocab, k] token -> top-k successors
        # [vocab, k] each successor's probability under a softmax over the k logits kept (the
        # tail left out, so an overestimate, but as sharp as the target was): nodes are bucketed
        # by it, and the bucket's measured acceptance is the node's confidence
        self.prob = np.zeros((vocab_size, k), dtype=np.float32)
        # context=2: the successors seen after a token *pair* (previous token, token) win over the
        # token's own row (with free verification 1.80 -> 1.89 tokens per step on the suite); a
        # pair not held falls back to that row. A direct-mapped table of ``pairs`` slots indexed
        # by a hash of the pair (a newer pair evicts an older one in its slot): bounded memory,
        # 3.5 MB at 65,536 slots, and stores that are numpy scatters.
        self.pair_key = np.full(pairs, -1, dtype=np.int64)  # [pairs] prev * vocab + token, -1 empty
        self.pair_succ = np.full((pairs, k), -1, dtype=np.int32)  # [pairs, k]
        self.pair_prob = np.zeros((pairs, k), dtype=np.float32)  # [pairs, k]
        self._shift = np.uint64(64 - (pairs.bit_length() - 1))
        self.vocab = vocab_size
        self.k, self.update, self.context = k, update, context
        self.rates = Rates()

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        """Fibonacci hashing of pair keys [n] int64 -> slots [n] (uint64 products wrap mod 2^64)."""
        return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> self._shift).astype(np.int64)

    def _successors(self, prev: int, tok: int) -> tuple[np.ndarray, np.ndarray, bool]:
        if self.context == 2 and prev >= 0:
            key = prev * self.vocab + tok
            s = int(self._slots(np.array([key], dtype=np.int64))[0])
            if self.pair_key[s] == key:
                return self.pair_succ[s], self.pair_prob[s], True
        return self.succ[tok], self.prob[tok], False

    def propose(self, req: DraftRequest) -> Draft:
        draft = Draft()
        where: dict[tuple[int, ...], int] = {(): -1}
        prev = req.context[-2] if len(req.context) > 1 else -1
        tok_of: dict[tuple[int, ...], int] = {(): req.context[-1]}
        rows: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, bool]] = {}
        for p in self.paths:  # parents come first (template() sorts by length)
            par = p[:-1]
            if par not in tok_of:
                continue
            if par not in rows:
                before = tok_of[par[:-1]] if par else prev
                rows[par] = self._successors(before, tok_of[par])
            succ, prob, sharp = rows[par]
            t = int(succ[p[-1]])
            if t < 0:
                continue
            bucket = (min(int(prob[p[-1]] * PROB_BINS), PROB_BINS - 1), min(len(p) - 1, 3), sharp)
            where[p] = draft.add(where[par], t, self.rates.get(bucket), src=self.name, tag=bucket)
            tok_of[p] = t
        return draft

    def _store(self, prev: np.ndarray, toks: np.ndarray, logits: np.ndarray) -> None:
        """The target's logits [n, vocab] after tokens ``toks`` [n], each after ``prev`` [n] (-1:
        unknown): their top-k successors and those successors' probabilities."""
        top = top_k(logits, self.k)
        lt = np.take_along_axis(logits, top, axis=1).astype(np.float64)  # [n, k], best first
        e = np.exp(lt - lt[:, :1])
        prob = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        self.succ[toks] = top
        self.prob[toks] = prob
        if self.context == 2:
            known = prev >= 0
            keys = prev[known].astype(np.int64) * self.vocab + toks[known]
            s = self._slots(keys)
            self.pair_key[s], self.pair_succ[s], self.pair_prob[s] = keys, top[known], prob[known]

    def observe(self, v, logits, path, next_token, context) -> None:
        self.rates.update(v, path, self.name)
        rows = np.arange(v.k) if self.update == "all" else np.asarray(path)
        # each row's previous token: its parent row's token, or for the root the context's
        # token before it (context[-1] is the root)
        before = context[-2] if len(context) > 1 else -1
        par = v.parents[rows]
        prev = np.where(par >= 0, v.tokens[np.maximum(par, 0)], before)
        self._store(prev, v.tokens[rows], logits[rows])

    def seed(self, runtime, ids: Sequence[int], window: int = 256) -> None:
        """Fill the matrix from one teacher-forced pass of the target over ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        for s in range(0, len(ids), window):
            chunk = ids[s : s + window]
            runtime.reset()
            prev = np.concatenate([[-1], chunk[:-1]])  # the forward saw no token before the chunk
            self._store(prev, chunk, runtime.forward(chunk))
        runtime.reset()

    def save(self, path: str | Path) -> None:
        """The one-token matrix and its probabilities, as a .npz (the pair table is not kept: it
        holds the texts seen most recently)."""
        np.savez(Path(path), succ=self.succ, prob=self.prob)

    def load(self, path: str | Path) -> None:
        """A matrix from ``save`` (.npz), or a bare successor matrix (.npy: probabilities unknown,
        so every node starts in the lowest confidence bucket and rates are learned as it runs)."""
        data = np.load(Path(path))
        m = data["succ"] if hasattr(data, "files") else data
        pr = data["prob"] if hasattr(data, "files") and "prob" in data.files else np.zeros(m.shape, np.float32)
        if m.shape != self.succ.shape or pr.shape != m.shape:
            raise SparsedgeError(f"{path}: adjacency matrix of shape {m.shape}, expected {self.succ.shape}")
        self.succ, self.prob = m.astype(np.int32), pr.astype(np.float32)


@register("recycle")
def _make(target: Target, arg: str | None) -> RecycleDrafter:
    d = RecycleDrafter(target.runtime.vocab_size)
    if arg:
        d.load(arg)
    return d
