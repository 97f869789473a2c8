"""Measuring a recipe honestly on held-out text: perplexity dense vs sparse, achieved sparsity,
top-1 agreement with the dense model, and chunk-level sparsity (BlockFFN) of the FFN activity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import data
from ..runtimes.torch_ref import TorchRuntime
from .apply import apply, remove
from .recipe import SparsityRecipe

CLS_KS = (1, 2, 4, 8)
DEFAULT_CHUNK = 32  # chunk size for CLS when a recipe has no chunking of its own


@dataclass
class RecipeEval:
    ppl_dense: float
    ppl: float
    achieved_sparsity: float  # mean over the recipe's sites of the zeroed fraction
    achieved_by_site: dict[str, float]
    top1_agreement: float
    cls: dict[str, float]  # in the recipe's neuron order (clustered when chunking is on)
    cls_original: dict[str, float] | None  # same activity, original neuron order
    chunk_size: int
    eval_tokens: int
    corpus: str
    corpus_hash: str
    protocol: dict

    def to_dict(self) -> dict:
        r = lambda x: round(float(x), 5)  # noqa: E731
        out = {
            "ppl_dense": r(self.ppl_dense), "ppl": r(self.ppl),
            "achieved_sparsity": r(self.achieved_sparsity),
            "achieved_by_site": {k: r(v) for k, v in self.achieved_by_site.items()},
            "top1_agreement": r(self.top1_agreement),
            "cls": {k: r(v) for k, v in self.cls.items()}, "chunk_size": self.chunk_size,
            "eval_tokens": self.eval_tokens, "corpus": self.corpus, "corpus_hash": self.corpus_hash,
            "protocol": self.protocol,
        }
        if self.cls_original is not None:
            out["cls_original"] = {k: r(v) for k, v in self.cls_original.items()}
        return out


def _cls(hooks, n_layers: int, chunk: int, perm_back: list | None) -> dict[str, float]:
    from .chunks import chunk_level_sparsity

    acc = {k: [] for k in CLS_KS}
    for layer in range(n_layers):
        m = hooks.layer_masks(layer)  # [T, ffn]
        if perm_back is not None:
            m = m[:, np.argsort(np.asarray(perm_back[layer]))]  # back to the original order
        for k, v in chunk_level_sparsity(m, chunk, CLS_KS).items():
            acc[k].append(v)
    return {str(k): float(np.mean(v)) for k, v in acc.items()}


def dense_reference(rt: TorchRuntime, tokenizer, protocol=None, text=None, progress=True) -> data.PplResult:
    remove(rt)
    return data.perplexity(rt, text=text, tokenizer=tokenizer, protocol=protocol, progress=progress)


def evaluate(
    rt: TorchRuntime, tokenizer, recipe: SparsityRecipe, protocol: data.PplProtocol | None = None,
    text: str | None = None, dense: data.PplResult | None = None, progress: bool = True,
) -> RecipeEval:
    """Dense (unless given) and sparse passes over the same evaluation windows."""
    if dense is None:
        dense = dense_reference(rt, tokenizer, protocol, text, progress)
    hooks = apply(rt, recipe, capture_ffn=True)
    try:
        sparse = data.perplexity(rt, text=text, tokenizer=tokenizer, protocol=protocol, progress=progress)
    finally:
        remove(rt)
    chunk = recipe.chunks.size if recipe.chunks else DEFAULT_CHUNK
    perm = recipe.chunks.permutation if recipe.chunks else None
    by = hooks.achieved()
    mean = by.pop("mean")
    return RecipeEval(
        ppl_dense=dense.ppl, ppl=sparse.ppl, achieved_sparsity=mean, achieved_by_site=by,
        top1_agreement=float((sparse.argmax == dense.argmax).mean()),
        cls=_cls(hooks, rt.spec.n_layers, chunk, None),
        cls_original=_cls(hooks, rt.spec.n_layers, chunk, perm) if perm else None,
        chunk_size=chunk, eval_tokens=sparse.eval_tokens, corpus=sparse.corpus,
        corpus_hash=sparse.corpus_hash, protocol=sparse.protocol,
    )
