"""Drafters: where candidate tokens come from. One flat module each, behind a registry that fails
loudly on unknown names:

- ``ngram``: lookup in the context, generated text and (optionally) a corpus (ngram.py);
- ``recycle``: Token Recycling's adjacency matrix of top-k successors (recycle.py);
- ``layerskip``: the target's own weights with some layers skipped (layerskip.py);
- ``sparse``: the target's own weights at a high activation sparsity (sparse.py);
- ``model``: any other model with the same tokenizer, on any runtime (model.py).

A drafter spec on the command line is ``NAME`` or ``NAME:ARG`` (e.g. ``sparse:r70.json``,
``model:small-artifact@native``); several are joined with commas and their trees merged.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ....errors import SparsedgeError
from ..sampling import SamplingConfig
from ..tree import Draft, Verify


@dataclass
class Target:
    """The model being decoded, so that a drafter can open its own view of the same weights."""

    runtime: Any  # the target Runtime
    model: Any = None  # what it was opened from: a LoadedModel, an artifact folder or a .gguf path
    runtime_name: str = "torch"
    opts: dict = field(default_factory=dict)  # threads, quant


@dataclass
class DraftRequest:
    context: list[int]  # committed tokens; the last is the root (not yet in the target's cache)
    budget: int  # the most nodes the verifier will take
    sampling: SamplingConfig
    rng: np.random.Generator
    min_prob: float = 0.0  # stop growing a path whose estimated probability falls below this


class Rates:
    """Online estimates of P(node accepted | parent accepted) per bucket (a drafter's tag), from
    what verification actually accepted: Beta(1, 1) prior, so an unseen bucket starts at 0.5."""

    def __init__(self, prior: tuple[float, float] = (1.0, 2.0)):
        self.prior = prior
        self.acc: dict[Any, list[float]] = {}

    def get(self, bucket: Any) -> float:
        a, t = self.acc.get(bucket, self.prior)
        return a / t

    def update(self, v: Verify, path: Sequence[int], src: str) -> None:
        on_path = set(path)
        for row in range(1, v.k):
            node = v.nodes[row - 1]
            if node.src != src or int(v.parents[row]) not in on_path:
                continue  # its parent was rejected: no evidence about this node
            a = self.acc.setdefault(node.tag, list(self.prior))
            a[0] += row in on_path
            a[1] += 1.0


class Drafter:
    """Base: proposes a Draft below the root; learns from each verification."""

    name = ""
    sequential = False  # True when every drafted token costs a forward of a draft model

    def begin(self, prompt: Sequence[int]) -> None:
        """A new request starts (warm state such as caches and matrices is kept)."""

    def propose(self, req: DraftRequest) -> Draft:
        raise NotImplementedError

    def observe(self, v: Verify, logits: np.ndarray, path: list[int], next_token: int,
                context: Sequence[int]) -> None:
        """After a verification: v the forward's rows, logits [k, vocab], path the accepted rows
        (root first), next_token the target's token after the path, context as proposed on."""

    def close(self) -> None:
        pass


class Combined(Drafter):
    """Several drafters' trees merged into one trie."""

    def __init__(self, drafters: Sequence[Drafter]):
        self.drafters = list(drafters)
        self.name = ",".join(d.name for d in self.drafters)
        self.sequential = any(d.sequential for d in self.drafters)

    @property
    def forwards(self) -> int:
        """Draft-model forwards so far (what speculative_generate prices a sequential draft by)."""
        return sum(getattr(d, "forwards", 0) for d in self.drafters)

    def begin(self, prompt):
        for d in self.drafters:
            d.begin(prompt)

    def propose(self, req):
        out = Draft()
        for d in self.drafters:
            out.merge(d.propose(req))
        return out

    def observe(self, v, logits, path, next_token, context):
        for d in self.drafters:
            d.observe(v, logits, path, next_token, context)

    def close(self):
        for d in self.drafters:
            d.close()


_MODULES = ("ngram", "recycle", "layerskip", "sparse", "model")
DRAFTERS: dict[str, Callable[..., Drafter]] = {}


def register(name: str):
    def deco(factory):
        if name in DRAFTERS:
            raise ValueError(f"drafter {name!r} registered twice")
        DRAFTERS[name] = factory
        return factory
    return deco


def names() -> list[str]:
    for m in _MODULES:  # idempotent: a module registers once, when first imported
        importlib.import_module(f"{__package__}.{m}")
    return list(DRAFTERS)


def make_drafter(spec: str, target: Target) -> Drafter:
    """``NAME[:ARG][,NAME[:ARG]...]`` -> a Drafter (Combined when several)."""
    known = names()
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts:
        raise SparsedgeError("no drafter given")
    out = []
    for p in parts:
        name, _, arg = p.partition(":")
        if name not in DRAFTERS:
            raise SparsedgeError(f"unknown drafter {name!r} (known: {', '.join(known)})")
        out.append(DRAFTERS[name](target, arg or None))
    return out[0] if len(out) == 1 else Combined(out)


__all__ = ["Drafter", "DraftRequest", "Combined", "Rates", "Target", "DRAFTERS", "make_drafter", "names",
           "register"]
