"""N-gram lookup drafting (prompt lookup / "lookahead"-style caches): the longest suffix of the
context that occurred before proposes what followed it, several occurrences as a tree.

The history holds every request's prompt and generated text (and an optional corpus), documents
separated by SEP, so the cache stays warm across requests. Confidence of a node is the measured
acceptance rate of its bucket (match length, depth), learned from every verification.
"""

from __future__ import annotations

from typing import Sequence

from ..tree import Draft
from . import Drafter, DraftRequest, Rates, Target, register

SEP = -1


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, candidates: int = 4, depth: int = 10,
                 corpus: Sequence[int] | None = None):
        self.max_n, self.min_n, self.candidates, self.depth = max_n, min_n, candidates, depth
        self.hist: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions of the next token
        self.start = 0  # where the current request begins in hist
        self.rates = Rates()
        if corpus is not None:
            self.add_corpus(corpus)

    def add_corpus(self, ids: Sequence[int]) -> None:
        """Index a corpus as a document of its own (a warm cache before any request)."""
        if self.hist and self.hist[-1] != SEP:
            self.hist.append(SEP)
        self._extend(list(ids))
        self.hist.append(SEP)
        self.start = len(self.hist)

    def _extend(self, toks: Sequence[int]) -> None:
        h = self.hist
        for t in toks:
            h.append(int(t))
            j = len(h)  # position of the token that will follow the n-grams ending here
            for n in range(1, self.max_n + 1):
                if j - n < 0:
                    break
                gram = tuple(h[j - n : j])
                if SEP in gram:
                    break
                self.index.setdefault(gram, []).append(j)

    def begin(self, prompt: Sequence[int]) -> None:
        if self.hist and self.hist[-1] != SEP:
            self.hist.append(SEP)
        self.start = len(self.hist)

    def _sync(self, context: Sequence[int]) -> None:
        mine = len(self.hist) - self.start
        if mine > len(context) or list(self.hist[self.start :]) != list(context[:mine]):
            # the context is not an extension of what we indexed (a caller reused us oddly): new document
            self.begin(context)
            mine = 0
        self._extend(context[mine:])

    def propose(self, req: DraftRequest) -> Draft:
        self._sync(req.context)
        draft, h, end = Draft(), self.hist, len(self.hist)
        taken: set[tuple[int, ...]] = set()
        for n in range(min(self.max_n, len(req.context)), self.min_n - 1, -1):
            gram = tuple(req.context[-n:])
            # most recent occurrences first; the last entry is the context's own suffix (no continuation)
            for pos in reversed(self.index.get(gram, ())):
                if pos >= end:
                    continue
                cont = []
                for t in h[pos : pos + self.depth]:
                    if t == SEP:
                        break
                    cont.append(t)
                key = tuple(cont)
                if not cont or key in taken:
                    continue
                taken.add(key)
                parent = -1
                for d, t in enumerate(cont):
                    parent = draft.add(parent, t, self.rates.get((n, min(d, 3))), src=self.name, tag=(n, min(d, 3)))
                if len(taken) >= self.candidates:
                    return draft
            if taken:  # longest match first: shorter n-grams only when longer ones found nothing
                return draft
        return draft

    def observe(self, v, logits, path, next_token, context) -> None:
        self.rates.update(v, path, self.name)


@register("ngram")
def _make(target: Target, arg: str | None) -> NgramDrafter:
    return NgramDrafter(max_n=int(arg) if arg else 4)
