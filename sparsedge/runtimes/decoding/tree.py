"""Draft trees as data: a trie of candidate continuations, static templates, and the choice of
which nodes one verification forward should carry, sized from the runtime's cost curve.

A draft hangs below the *root*: the last committed token, not yet in the target's KV cache. One
verification forward carries [root] + the chosen nodes; node i's logits give the target's
distribution for i's children. Positions are n_past + depth (root depth 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ...errors import SparsedgeError


@dataclass
class Node:
    token: int
    parent: int  # index in Draft.nodes, -1 = the root
    conf: float  # estimated P(target accepts this node | its parent was accepted), in [0, 1]
    q: np.ndarray | None = None  # the draft distribution this token was sampled from, or None (deterministic)
    src: str = ""  # which drafter proposed it (per-drafter statistics)
    tag: object = None  # drafter-private data (e.g. the n-gram match length)


@dataclass
class Draft:
    """A trie of candidate tokens below the root. Nodes are stored parents-first."""

    nodes: list[Node] = field(default_factory=list)
    _children: dict[int, dict[int, int]] = field(default_factory=dict)  # parent -> token -> index

    def add(self, parent: int, token: int, conf: float, q: np.ndarray | None = None, src: str = "",
            tag: object = None) -> int:
        """Add a child of ``parent`` (-1: the root); deterministic siblings with the same token are
        merged (keeping the higher confidence). Sampled tokens (q given) are never merged: the
        sampling rule needs each to be an independent draw."""
        if parent >= len(self.nodes):
            raise SparsedgeError(f"draft parent {parent} does not exist")
        kids = self._children.setdefault(parent, {})
        if q is None and token in kids:
            i = kids[token]
            if conf > self.nodes[i].conf:
                self.nodes[i].conf, self.nodes[i].src, self.nodes[i].tag = conf, src, tag
            return i
        self.nodes.append(Node(int(token), parent, float(min(max(conf, 0.0), 1.0)), q, src, tag))
        i = len(self.nodes) - 1
        if q is None:
            kids[token] = i
        return i

    def add_path(self, tokens: Sequence[int], confs: Sequence[float], parent: int = -1, src: str = "",
                 tag: object = None) -> int:
        for t, c in zip(tokens, confs):
            parent = self.add(parent, t, c, src=src, tag=tag)
        return parent

    def merge(self, other: "Draft") -> None:
        """Graft every node of ``other`` into this trie (union of two drafters' proposals)."""
        where: dict[int, int] = {-1: -1}
        for i, n in enumerate(other.nodes):
            where[i] = self.add(where[n.parent], n.token, n.conf, n.q, n.src, n.tag)

    def __len__(self) -> int:
        return len(self.nodes)

    def path_probs(self) -> np.ndarray:
        """P(node accepted) estimated as the product of confidences along its path, [n]."""
        pp = np.zeros(len(self.nodes))
        for i, n in enumerate(self.nodes):
            pp[i] = n.conf * (1.0 if n.parent < 0 else pp[n.parent])
        return pp

    def chain(self) -> "Draft":
        """The single most likely path (speculative decoding with one candidate sequence)."""
        pp = self.path_probs()
        out, node, parent = Draft(), -1, -1
        while True:
            kids = [i for i, n in enumerate(self.nodes) if n.parent == node]
            if not kids:
                return out
            node = max(kids, key=lambda i: pp[i])
            n = self.nodes[node]
            parent = out.add(parent, n.token, n.conf, n.q, n.src, n.tag)


@dataclass
class Verify:
    """What one verification forward carries: the root and the chosen nodes, parents-first."""

    tokens: np.ndarray  # [k] root token then node tokens
    parents: np.ndarray  # [k] parent index within this list, -1 for the root
    depth: np.ndarray  # [k] root 0
    nodes: list[Node]  # [k - 1] the chosen draft nodes (row i + 1)

    @property
    def k(self) -> int:
        return int(self.tokens.shape[0])

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.k)]
        for i in range(1, self.k):
            kids[int(self.parents[i])].append(i)
        return kids


class CostCurve:
    """t(k)/t(1) of one runtime, measured at a few k and interpolated linearly (extrapolated
    linearly past the last point): what one more node in the verification forward costs."""

    def __init__(self, ks: Sequence[int], ratios: Sequence[float]):
        if len(ks) < 1 or ks[0] != 1:
            raise SparsedgeError("a cost curve starts at k = 1")
        self.ks = np.asarray(ks, dtype=float)
        self.r = np.maximum.accumulate(np.maximum(np.asarray(ratios, dtype=float), 1.0))

    def __call__(self, k: int) -> float:
        if k <= self.ks[-1] or len(self.ks) == 1:
            return float(np.interp(k, self.ks, self.r))
        slope = (self.r[-1] - self.r[-2]) / (self.ks[-1] - self.ks[-2])
        return float(self.r[-1] + slope * (k - self.ks[-1]))

    def as_dict(self) -> dict[str, float]:
        return {str(int(k)): round(float(r), 3) for k, r in zip(self.ks, self.r)}

    @classmethod
    def linear(cls) -> "CostCurve":
        """No measurement: every token costs as much as the first (the pessimistic bound)."""
        return cls([1, 2], [1.0, 2.0])


def choose(root: int, draft: Draft, budget: int, cost: CostCurve, extra_cost: float = 0.0) -> Verify:
    """The root token and the draft nodes to verify: the top-n by estimated path probability (a set closed under ancestors,
    since path probabilities never grow along a path), with n <= budget chosen to maximise expected
    tokens per unit of cost, (1 + sum of path probabilities) / (cost(1 + n) + extra_cost).
    ``extra_cost`` is the step's fixed overhead in units of t(1) (drafting time, for example)."""
    pp = draft.path_probs()
    # stable order: by probability, then parents-first (so ancestors win ties)
    order = sorted(range(len(pp)), key=lambda i: (-pp[i], i))[: max(0, budget)]
    best_n, best = 0, 1.0 / (cost(1) + extra_cost)
    gain = 1.0
    for n, i in enumerate(order, start=1):
        gain += pp[i]
        v = gain / (cost(1 + n) + extra_cost)
        if v > best + 1e-12:
            best_n, best = n, v
    keep = sorted(order[:best_n])  # parents-first again
    row = {-1: 0}
    tokens, parents, depth, nodes = [int(root)], [-1], [0], []
    for j, i in enumerate(keep, start=1):
        n = draft.nodes[i]
        if n.parent not in row:  # cannot happen for conf <= 1; guard against a bad drafter
            raise SparsedgeError("draft node chosen without its parent")
        row[i] = j
        tokens.append(n.token)
        parents.append(row[n.parent])
        depth.append(depth[row[n.parent]] + 1)
        nodes.append(n)
    return Verify(np.asarray(tokens, dtype=np.int64), np.asarray(parents, dtype=np.int64),
                  np.asarray(depth, dtype=np.int64), nodes)


# Static templates as data (Medusa-style choice lists): each entry is a path of child ranks below
# the root, e.g. (0, 1) = the best child's second-best child. A drafter that ranks candidates per
# node (recycle, model top-k) fills a template; choose() then trims it by cost.
TEMPLATES: dict[str, list[tuple[int, ...]]] = {
    "chain8": [(0,) * d for d in range(1, 9)],
    "tree16": [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (0, 0, 0),
               (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)],
    "tree32": [(0,), (1,), (2,), (3,), (4,), (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
               (2, 0), (2, 1), (3, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1),
               (1, 0, 0), (1, 1, 0), (2, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0),
               (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0),
               (0, 0, 0, 0, 0, 0, 0)],
}


def template(name: str) -> list[tuple[int, ...]]:
    if name not in TEMPLATES:
        raise SparsedgeError(f"unknown tree template {name!r} (known: {', '.join(TEMPLATES)})")
    paths = TEMPLATES[name]
    for p in paths:  # every prefix must be in the template too (a tree, not a forest of holes)
        if len(p) > 1 and p[:-1] not in paths:
            raise SparsedgeError(f"template {name}: {p} lacks its parent {p[:-1]}")
    return sorted(paths, key=lambda p: (len(p), p))
