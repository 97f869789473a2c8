"""Which path of a verified draft tree to accept, so that the output is exactly the target's.

Greedy: from the root, follow the child whose token equals the target's argmax at the current
node, as long as one exists; then append the target's argmax at the last accepted node.

Sampling (lossless): at each node, with p the target's distribution there, walk the children in
order. Each child is a one-candidate speculative-sampling step against the current p:
- a sampled child x (drawn from the draft distribution q independently of everything else) is
  accepted if u·q(x) <= p(x); on rejection p becomes norm(max(0, p − q));
- a deterministic child x (an n-gram or recycled candidate: q is a point mass at x) is accepted
  with probability p(x); on rejection p becomes p with x removed, renormalised.
If a child is accepted, continue from it; if all are rejected, sample the next token from the
current p. Each step returns a token distributed as the p it started from, so by induction the
emitted token is distributed as the target's (Leviathan et al. 2023 for one candidate; SpecInfer's
multi-candidate rule for independent siblings). Merging duplicate *sampled* siblings would break
the independence, which is why Draft never merges them.
"""

from __future__ import annotations

import numpy as np

from .sampling import SamplingConfig, probs
from .tree import Verify


def accept_greedy(v: Verify, logits: np.ndarray) -> tuple[list[int], int]:
    """(accepted rows starting with the root 0, the next token). logits [k, vocab]."""
    target = logits.argmax(axis=-1)  # [k]
    kids = v.children()
    row, path = 0, [0]
    while True:
        nxt = next((c for c in kids[row] if v.tokens[c] == target[row]), None)
        if nxt is None:
            return path, int(target[row])
        path.append(nxt)
        row = nxt


def accept_sample(
    v: Verify, logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator
) -> tuple[list[int], int]:
    kids = v.children()
    row, path = 0, [0]
    while True:
        p = probs(logits[row], cfg)  # float64 [vocab]
        moved = False
        for c in kids[row]:
            x = int(v.tokens[c])
            q = v.nodes[c - 1].q
            u = rng.random()
            if q is None:
                if u < p[x]:
                    moved = True
                else:
                    p = p.copy()
                    p[x] = 0.0
                    p /= p.sum()
            else:
                if u * q[x] <= p[x]:
                    moved = True
                else:
                    r = np.maximum(p - q, 0.0)
                    s = r.sum()
                    # s == 0 only if p <= q everywhere, i.e. p == q, where rejection has probability 0
                    p = r / s if s > 0 else p
            if moved:
                path.append(c)
                row = c
                break
        if not moved:
            return path, int(rng.choice(p.shape[0], p=p))
