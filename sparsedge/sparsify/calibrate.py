"""Calibration: one dense pass over calibration text collects activation statistics at every
site; any method's thresholds at any target sparsity then come from those statistics, and are set
again by a sparse-aware pass.

Statistics (``CalibStats``), per layer:
- rows[site]: |x| of ``rows`` tokens drawn uniformly from all calibration tokens, [rows, width]
  (enough for a quantile good to ~0.1 point, at 1.2 GB for SmolLM2 at 2048 rows);
- up_mean: E|up(x)_i| over every calibration token, [ffn] (CHESS's first pass).
q_in sees the same tensor as qkv_in in a dense pass, so it shares its rows.

Sparse-aware pass (``CalibConfig.sparse_aware``, on by default): at run time every site sees
activations of a model whose earlier sites (earlier layers, and earlier sites of its own layer) are
sparsified already, and that shifts their distribution: dense-pass thresholds over all sites of
SmolLM2-135M at 70% gave 74.4-74.7% on held-out text. So, after the dense pass, the calibration
windows run once more with the recipe applied (apply.py: decode-time semantics), all windows in
lockstep: every window stops at each (layer, site) in forward order until all have reached it;
there the site's layer quantile T is re-taken from the |x| rows of all windows, which are produced
by every earlier site with its final threshold, and only then does any window apply it and go on.
That is layer-by-layer (site-by-site) calibration in one pass: each site hits its target on the
calibration rows exactly as the sparse model will run. The per-channel factors stay (CHESS's
E|up_i| from the dense pass, WINA's column norms), so t_i = T / c_i keeps each method's criterion;
only T moves. Cost: about one more forward over the calibration text (capped by
CalibConfig.sparse_aware_tokens), with every window's KV cache held at once.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data
from ..errors import SparsedgeError
from ..runtimes.torch_model import KVCache
from ..runtimes.torch_ref import TorchRuntime
from . import methods as registry
from .apply import apply, remove
from .recipe import (Calibration, SiteThresholds, SparsityRecipe, check_sparsity,
                     model_fingerprint, site_width)

STAT_SITES = ("qkv_in", "o_in", "ffn_in", "gate_act", "down_in")
_ALIAS = {"q_in": "qkv_in"}  # identical tensors in the dense pass


@dataclass
class CalibConfig:
    tokens: int = 16384  # calibration tokens
    window: int = 512  # tokens per forward, each window from an empty cache
    rows: int = 2048  # sampled token rows kept per (layer, site)
    seed: int = 0
    # a sparse-aware pass after the dense one (module docstring); False: dense-pass thresholds
    sparse_aware: bool = True
    # it runs over the first this many calibration tokens (all of them by default), every window
    # at once: one KV cache per window, 46 KB per token for SmolLM2-135M (0.75 GB at 16,384)
    sparse_aware_tokens: int = 16384


@dataclass
class CalibStats:
    rows: list[dict[str, torch.Tensor]]  # per layer: site -> |x| [rows, width]
    up_mean: list[torch.Tensor]  # per layer: [ffn]
    tokens: int
    corpus: str
    text_hash: str
    seed: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # what the sparse-aware pass re-runs: the calibration tokens [n_win * window] and settings
    ids: np.ndarray | None = None
    config: CalibConfig | None = None

    def site_rows(self, layer: int, site: str) -> torch.Tensor:
        return self.rows[layer][_ALIAS.get(site, site)]


def _sampled_rows(total: int, cfg: CalibConfig) -> list[torch.Tensor]:
    """Which token rows are kept: ``cfg.rows`` of ``total`` drawn uniformly (seeded), as local
    indices per window (window w -> LongTensor [n_w])."""
    rng = np.random.default_rng(cfg.seed)
    picked = np.sort(rng.choice(total, size=min(cfg.rows, total), replace=False))
    return [torch.from_numpy(picked[(picked >= w * cfg.window) & (picked < (w + 1) * cfg.window)]
                             - w * cfg.window) for w in range(total // cfg.window)]


@contextmanager
def _without_lm_head(rt: TorchRuntime):
    """Calibration reads activations, never logits: while it runs, the LM head [vocab, hidden] is
    one row (on SmolLM2-135M its matmul is a fifth of the forward's work)."""
    w = rt.model.w
    head = w["lm_head"]
    w["lm_head"] = head[:1]
    try:
        yield
    finally:
        w["lm_head"] = head


def _run_windows(rt: TorchRuntime, ids: np.ndarray, window: int, state: dict, desc: str, progress: bool):
    """Forward each window of ``ids`` from an empty cache; state["win"] says which one runs."""
    n_win = len(ids) // window
    with _without_lm_head(rt):
        try:
            for win in tqdm(range(n_win), desc=desc, unit="win", disable=not progress):
                state["win"] = win
                rt.reset()
                rt.forward(ids[win * window : (win + 1) * window])
        finally:
            rt.reset()


def collect_stats(
    rt: TorchRuntime, ids: np.ndarray, cfg: CalibConfig, corpus: str, text_hash: str,
    progress: bool = True,
) -> CalibStats:
    """Run the dense model over ``ids`` (first cfg.tokens) and keep the statistics above."""
    t0 = time.perf_counter()
    ids = ids[: cfg.tokens]
    n_win = len(ids) // cfg.window
    if n_win == 0:
        raise SparsedgeError(f"calibration text has {len(ids)} tokens, fewer than one window of {cfg.window}")
    total = n_win * cfg.window
    ids = ids[:total]
    per_win = _sampled_rows(total, cfg)
    start = np.cumsum([0] + [len(p) for p in per_win])  # window w fills rows start[w]:start[w + 1]
    L = rt.spec.n_layers
    # filled in place: no per-window pieces to concatenate (which doubled the peak, 1.2 GB here)
    rows = [{s: torch.empty(int(start[-1]), site_width(rt.spec, s)) for s in STAT_SITES} for _ in range(L)]
    up_sum = [torch.zeros(rt.spec.intermediate_size, dtype=torch.float64) for _ in range(L)]
    state = {"win": 0}
    w = rt.model.w

    def make_hook(site):
        def hook(layer, x):
            win = state["win"]
            rows[layer][site][start[win] : start[win + 1]] = x[per_win[win]].abs()
            if site == "ffn_in":  # E|up_i| over all tokens: up = x @ W_up^T, [n, ffn]
                up_sum[layer] += (x @ w[f"layers.{layer}.up"].T).abs().sum(0, dtype=torch.float64)
            return x
        return hook

    saved = dict(rt.model.hooks)
    rt.model.hooks.clear()
    rt.model.hooks.update({s: make_hook(s) for s in STAT_SITES})
    try:
        _run_windows(rt, ids, cfg.window, state, "calibrate", progress)
    finally:
        rt.model.hooks.clear()
        rt.model.hooks.update(saved)
    up_mean = [(u / total).float() for u in up_sum]
    return CalibStats(rows, up_mean, total, corpus, text_hash, cfg.seed, time.perf_counter() - t0,
                      ids=ids, config=cfg)


def sparse_aware_thresholds(
    rt: TorchRuntime, recipe: SparsityRecipe, stats: CalibStats,
    threshold: Callable[[str, int, torch.Tensor], float | torch.Tensor], progress: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """The lockstep pass of the module docstring. ``recipe`` gives the sites (its thresholds are
    replaced before use); threshold(site, layer, rows) -> the site's thresholds (a float or
    [width]) from |x| rows [rows, width] of all windows. Returns site -> per layer thresholds, the
    ones every window ran with. Leaves ``rt`` dense.

    Each window's forward runs in a thread of its own, with its own KV cache; one lock lets one
    window compute at a time (so each has the machine's intra-op threads), and a barrier per
    (layer, site) holds every window until the site's thresholds are set."""
    if stats.ids is None or stats.config is None:
        raise SparsedgeError("these calibration statistics do not keep their tokens (collect_stats does)")
    if recipe.chunks is not None:  # thresholds come from rows in the original neuron order
        raise SparsedgeError("the sparse-aware pass takes a recipe before chunking")
    cfg = stats.config
    W = cfg.window
    n_win = max(1, min(len(stats.ids), cfg.sparse_aware_tokens) // W)
    ids = stats.ids[: n_win * W]
    per_win = _sampled_rows(len(ids), cfg)  # the dense pass's rows when it covers all tokens
    hooks = apply(rt, recipe)  # thresholding hooks that read hooks.thresholds[site][layer]
    sparsify = dict(rt.model.hooks)
    run = threading.Lock()  # held by the one window that computes
    got: list[torch.Tensor | None] = [None] * n_win  # window -> its sampled |x| rows at this site
    at: dict[str, object] = {}  # the (site, layer) every window has reached
    bar = tqdm(total=rt.spec.n_layers * len(recipe.sites), desc="calibrate (sparse-aware)",
               unit="site", disable=not progress)

    def set_threshold():  # the barrier's action: runs once, when all windows wait at (site, layer)
        site, layer = at["site"], at["layer"]
        t = threshold(site, layer, torch.cat(got))  # got: per window [n_w, width]
        hooks.thresholds[site][layer] = torch.as_tensor(t, dtype=torch.float32)
        bar.update()

    barrier = threading.Barrier(n_win, action=set_threshold)
    local = threading.local()

    def lockstep(site):
        def hook(layer, x):  # x [W, width]
            got[local.win] = x[per_win[local.win]].abs().float()
            at["site"], at["layer"] = site, layer
            run.release()
            try:
                barrier.wait()
            finally:
                run.acquire()
            return sparsify[site](layer, x)
        return hook

    errors: list[BaseException] = []
    pos = torch.arange(W)
    mask = torch.ones(W, W, dtype=torch.bool).tril()  # causal within the window, [W, W]

    def window(w):
        local.win = w
        toks = torch.from_numpy(np.ascontiguousarray(ids[w * W : (w + 1) * W]))
        with run:
            try:
                rt.model(toks, pos, mask, KVCache(rt.spec, rt.cache.dtype, capacity=W))
            except BaseException as e:  # a broken barrier is the echo of another window's error
                errors.append(e)
                barrier.abort()

    try:
        for site in recipe.sites:
            rt.model.hooks[site] = lockstep(site)
        with _without_lm_head(rt):
            threads = [threading.Thread(target=window, args=(w,), daemon=True) for w in range(n_win)]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            except BaseException:  # e.g. Ctrl-C: release every waiting window before cleaning up
                barrier.abort()
                for t in threads:
                    if t.is_alive():
                        t.join()
                raise
    finally:
        remove(rt)
        bar.close()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return hooks.thresholds


def _quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of all entries (kthvalue: exact, no size limit like torch.quantile)."""
    flat = x.reshape(-1)
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


def layer_threshold(method: registry.Method, site: str, layer: int, rows: torch.Tensor, weights,
                    stats: CalibStats, target: float) -> float | torch.Tensor:
    """T (a float), or t_i = T / c_i ([width]) for a criterion |x_i|·c_i; T the target quantile
    of the criterion over |x| ``rows`` [rows, width]."""
    scale_fn = method.scales.get(site)
    if scale_fn is None:
        return _quantile(rows, target)
    c = scale_fn(layer, weights, stats).float().clamp_min(1e-12)  # [width]
    return _quantile(rows * c, target) / c


def site_thresholds(method: registry.Method, site: str, stats: CalibStats, weights, target: float):
    """Per layer, from the dense-pass rows: T (scalar) or t_i = T / c_i (list)."""
    out: list[float | list[float]] = []
    for layer in range(len(stats.rows)):
        t = layer_threshold(method, site, layer, stats.site_rows(layer, site), weights, stats, target)
        out.append(t.tolist() if isinstance(t, torch.Tensor) else t)
    return out


def recipe_from_stats(
    method_name: str, target: float, stats: CalibStats, rt: TorchRuntime, scope="all",
    sparse_aware: bool | None = None, progress: bool = False,
) -> SparsityRecipe:
    """Thresholds of ``method`` at ``target`` over the sites of ``scope`` (see methods.scope_sites):
    from the dense-pass statistics, then (sparse_aware; default: the statistics' CalibConfig) set
    again by the sparse-aware pass over the calibration tokens (module docstring). Leaves ``rt``
    dense."""
    method = registry.get(method_name)
    chosen = registry.scope_sites(method, scope)
    check_sparsity(target)
    if method.needs_up_stats and not stats.up_mean:
        raise SparsedgeError(f"{method.name} needs E|up| statistics")
    if sparse_aware is None:
        sparse_aware = stats.config.sparse_aware if stats.config is not None else False
    t0 = time.perf_counter()
    sites = {
        site: SiteThresholds(criterion=crit, thresholds=site_thresholds(method, site, stats, rt.model.w, target))
        for site, crit in method.sites.items() if site in chosen
    }
    cal = Calibration(corpus=stats.corpus, tokens=stats.tokens, text_hash=stats.text_hash,
                      seed=stats.seed, seconds=round(stats.seconds, 2))
    r = SparsityRecipe(method=method.name, target_sparsity=target, model=model_fingerprint(rt.spec),
                       sites=sites, calibration=cal, tensors=_tensors(chosen)).validate(rt.spec)
    if sparse_aware:
        ts = sparse_aware_thresholds(
            rt, r, stats, lambda site, layer, rows: layer_threshold(method, site, layer, rows, rt.model.w,
                                                                    stats, target), progress)
        for site, st in r.sites.items():
            st.thresholds = [t.tolist() if t.ndim else float(t) for t in ts[site]]
        cal.sparse_aware = True
        cal.seconds = round(stats.seconds + time.perf_counter() - t0, 2)
    return r.validate(rt.spec)


# weight tensors whose rows / columns each site lets a kernel skip
_SITE_TENSORS = {"qkv_in": ("q", "k", "v"), "q_in": ("q",), "o_in": ("o",), "ffn_in": ("gate", "up"),
                 "gate_act": ("up", "down"), "down_in": ("down",)}


def _tensors(sites) -> list[str]:
    return sorted({t for s in sites for t in _SITE_TENSORS[s]})
