"""Speculative and draft-tree decoding on any Runtime, lossless under greedy and sampling.

Each step (the root is the last committed token, not yet in the target's cache):
  draft   drafter.propose(context) -> a trie of candidates below the root
  choose  the nodes worth verifying, sized from the runtime's cost curve t(k)/t(1)
  verify  one forward of [root] + nodes: tree mask = ancestors + self, positions n_past + depth
  accept  the longest path the target agrees with (accept.py), plus the target's own next token
  keep    runtime.keep(accepted rows): the cache now ends with the accepted path
  observe drafters learn from the verification (rates, n-gram caches, recycled logits)
Tokens are yielded as they are accepted.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ...errors import SparsedgeError
from ..base import tree_mask
from .accept import accept_greedy, accept_sample
from .drafters import Drafter, DraftRequest
from .generate import GenerationConfig, GenerationStats, prefill
from .sampling import Sampler
from .tree import CostCurve, Draft, choose

MODES = ("spec", "tree")


@dataclass
class SpecConfig:
    mode: str = "tree"  # "spec": one candidate chain per step; "tree": a draft tree
    budget: int = 16  # the most draft nodes one verification carries
    cost: CostCurve | None = None  # t(k)/t(1) of the runtime; measured once per runtime when None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SparsedgeError(f"unknown decoding mode {self.mode!r} (known: greedy, {', '.join(MODES)})")
        if self.budget < 1:
            raise SparsedgeError(f"the draft budget must be >= 1, got {self.budget}")


@dataclass
class SpecStats(GenerationStats):
    steps: int = 0  # verification forwards
    drafted: int = 0  # draft nodes verified
    accepted: int = 0  # draft tokens accepted (the target's own token per step not counted)
    draft_s: float = 0.0  # proposing, choosing and observing
    verify_s: float = 0.0  # the target's forwards, acceptance and keep()
    draft_forwards: int = 0  # forwards of a drafter that runs a model (its share of draft_s)
    cost: dict = field(default_factory=dict)
    mode: str = ""  # the mode used: "spec" when the runtime cannot verify trees exactly

    @property
    def mean_accepted(self) -> float:
        """Tokens produced per verification step (accepted drafts + the target's token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "mean_accepted": round(self.mean_accepted, 4),
                "acceptance_rate": round(self.acceptance_rate, 4), "drafted": self.drafted,
                "accepted": self.accepted, "draft_s": round(self.draft_s, 4),
                "verify_s": round(self.verify_s, 4), "draft_forwards": self.draft_forwards, "cost_curve": self.cost, "mode": self.mode}


_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def measure_cost(runtime, tokens: Sequence[int], ks: Sequence[int] = (1, 2, 4, 8, 16),
                 reps: int = 3) -> tuple[CostCurve, float]:
    """(t(k)/t(1) curve, t(1) seconds), medians of ``reps`` forwards of k tokens on top of the
    runtime's current cache, which is restored after each. Cached per runtime object."""
    if runtime in _COSTS:
        return _COSTS[runtime]
    # a runtime whose cost is a step function names the points worth measuring (NpuRuntime: one
    # static graph per token count, so t(k) is flat between them)
    ks = tuple(getattr(runtime, "cost_ks", ks))
    n = runtime.n_past
    toks = np.resize(np.asarray(tokens, dtype=np.int64), max(ks))
    times = []
    runtime.forward(toks[:1])  # warm-up
    runtime.truncate(n)
    for k in ks:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            runtime.forward(toks[:k])
            ts.append(time.perf_counter() - t0)
            runtime.truncate(n)
        times.append(float(np.median(ts)))
    curve = CostCurve(list(ks), [t / times[0] for t in times])
    _COSTS[runtime] = (curve, times[0])
    return curve, times[0]


def speculative_generate(
    runtime, prompt_ids: Sequence[int], cfg: GenerationConfig, drafter: Drafter,
    spec: SpecConfig | None = None, stats: SpecStats | None = None,
) -> Iterator[int]:
    """Yield new tokens as verification accepts them; the output equals plain ``generate``'s
    under greedy decoding and follows the same distribution under sampling."""
    spec = spec or SpecConfig()
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.size == 0:
        raise SparsedgeError("the prompt is empty")
    st = stats if stats is not None else SpecStats()
    st.prompt_tokens = int(prompt.size)
    sampling = cfg.sampling
    sample = Sampler(sampling)
    rng = sample.rng  # the acceptance rule draws from the same seeded stream
    stop = set(cfg.stop_ids)
    runtime.reset()
    t0 = time.perf_counter()
    logits = prefill(runtime, prompt)
    if spec.cost is not None:
        cost, t1 = spec.cost, None
    else:  # measured on the real cache, outside the decode timing
        cost, t1 = measure_cost(runtime, prompt)
    st.cost = cost.as_dict()
    tok = sample(logits)
    drafter.begin(prompt.tolist())
    context = prompt.tolist() + [tok]
    st.prefill_s = time.perf_counter() - t0
    t_start = time.perf_counter()
    # an extra draft node is worth its verification cost only if its acceptance probability beats
    # the marginal cost (in units of t(1)); sequential drafters also pay a draft forward per token
    min_prob = cost(5) - cost(4)
    draft_fwd = 0.0  # measured draft forward time / t(1), for sequential drafters
    # ``st`` and the drafter's forward count may accumulate across calls: this call's shares
    fw0, draft_s0, dfw0 = getattr(drafter, "forwards", 0), st.draft_s, st.draft_forwards

    # a runtime whose tree rows are not bit-exact with sequential decoding (onnxrt.py explains
    # when) verifies chains only, so that the output still equals plain greedy's
    exact_trees = getattr(runtime, "exact_trees", True)
    st.mode = spec.mode if exact_trees else "spec"
    produced = 0  # this call's count (``st`` may be shared across calls and accumulate)

    def emit(t: int) -> bool:
        nonlocal produced
        produced += 1
        st.new_tokens += 1
        st.tokens.append(t)
        st.stopped = t in stop
        st.decode_s = time.perf_counter() - t_start
        return st.stopped or produced >= cfg.max_new_tokens

    done = emit(tok)
    yield tok
    while not done:
        left = cfg.max_new_tokens - produced  # tokens still wanted; a step yields <= nodes + 1
        ta = time.perf_counter()
        req = DraftRequest(context, min(spec.budget, max(left - 1, 0)), sampling, rng,
                           min_prob=min(0.95, min_prob + (draft_fwd if drafter.sequential else 0.0)))
        draft = drafter.propose(req) if req.budget > 0 else None
        if draft is not None and (spec.mode == "spec" or not exact_trees):
            draft = draft.chain()
        v = choose(context[-1], draft if draft is not None else Draft(), req.budget, cost)
        tb = time.perf_counter()
        n_past = runtime.n_past
        logits = runtime.forward(v.tokens, positions=n_past + v.depth, tree_mask=tree_mask(v.parents))
        if sampling.greedy:
            path, nxt = accept_greedy(v, logits)
        else:
            path, nxt = accept_sample(v, logits, sampling, rng)
        runtime.keep(path)
        tc = time.perf_counter()
        drafter.observe(v, logits, path, nxt, context)
        td = time.perf_counter()
        st.steps += 1
        st.drafted += v.k - 1
        st.accepted += len(path) - 1
        st.verify_s += tc - tb
        st.draft_s += (tb - ta) + (td - tc)
        fw = getattr(drafter, "forwards", 0) - fw0  # this call's draft-model forwards so far
        st.draft_forwards = dfw0 + fw
        if drafter.sequential and t1 and fw > 0:  # running mean of one draft forward in units of t(1)
            draft_fwd = ((st.draft_s - draft_s0) / fw) / t1
        for t in [int(v.tokens[r]) for r in path[1:]] + [nxt]:
            context.append(t)
            done = emit(t)
            yield t
            if done:
                break
