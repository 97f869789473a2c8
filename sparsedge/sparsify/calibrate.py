"""Calibration: one dense pass over calibration text collects activation statistics at every
site; any method's thresholds at any target sparsity then come from those statistics.

Statistics (``CalibStats``), per layer:
- rows[site]: |x| of ``rows`` tokens drawn uniformly from all calibration tokens, [rows, width]
  (enough for a quantile good to ~0.1 point, at 1.2 GB for SmolLM2 at 2048 rows);
- up_mean: E|up(x)_i| over every calibration token, [ffn] (CHESS's first pass).
q_in sees the same tensor as qkv_in in a dense pass, so it shares its rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data
from ..errors import SparsedgeError
from ..runtimes.torch_ref import TorchRuntime
from . import methods as registry
from .recipe import (Calibration, SiteThresholds, SparsityRecipe, check_sparsity,
                     model_fingerprint)

STAT_SITES = ("qkv_in", "o_in", "ffn_in", "gate_act", "down_in")
_ALIAS = {"q_in": "qkv_in"}  # identical tensors in the dense pass


@dataclass
class CalibConfig:
    tokens: int = 16384  # calibration tokens
    window: int = 512  # tokens per forward, each window from an empty cache
    rows: int = 2048  # sampled token rows kept per (layer, site)
    seed: int = 0


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

    def site_rows(self, layer: int, site: str) -> torch.Tensor:
        return self.rows[layer][_ALIAS.get(site, site)]


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
    rng = np.random.default_rng(cfg.seed)
    picked = np.sort(rng.choice(total, size=min(cfg.rows, total), replace=False))
    # rows of each window that are sampled: window w -> local indices
    per_win = [torch.from_numpy(picked[(picked >= w * cfg.window) & (picked < (w + 1) * cfg.window)]
                                - w * cfg.window) for w in range(n_win)]
    L = rt.spec.n_layers
    kept: list[dict[str, list[torch.Tensor]]] = [{s: [] for s in STAT_SITES} for _ in range(L)]
    up_sum = [torch.zeros(rt.spec.intermediate_size, dtype=torch.float64) for _ in range(L)]
    state = {"win": 0}
    w = rt.model.w

    def make_hook(site):
        def hook(layer, x):
            kept[layer][site].append(x[per_win[state["win"]]].abs().float())
            if site == "ffn_in":  # E|up_i| over all tokens: up = x @ W_up^T, [n, ffn]
                up_sum[layer] += (x @ w[f"layers.{layer}.up"].T).abs().sum(0, dtype=torch.float64)
            return x
        return hook

    saved = dict(rt.model.hooks)
    rt.model.hooks.clear()
    rt.model.hooks.update({s: make_hook(s) for s in STAT_SITES})
    try:
        for win in tqdm(range(n_win), desc="calibrate", unit="win", disable=not progress):
            state["win"] = win
            rt.reset()
            rt.forward(ids[win * cfg.window : (win + 1) * cfg.window])
    finally:
        rt.model.hooks.clear()
        rt.model.hooks.update(saved)
        rt.reset()
    rows = [{s: torch.cat(v[s]) for s in STAT_SITES} for v in kept]
    up_mean = [(u / total).float() for u in up_sum]
    return CalibStats(rows, up_mean, total, corpus, text_hash, cfg.seed, time.perf_counter() - t0)


def _quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of all entries (kthvalue: exact, no size limit like torch.quantile)."""
    flat = x.reshape(-1)
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


def site_thresholds(method: registry.Method, site: str, stats: CalibStats, weights, target: float):
    """Per layer: T (scalar) or t_i = T / c_i (list), T the target quantile of |x_i|·c_i."""
    out: list[float | list[float]] = []
    scale_fn = method.scales.get(site)
    for layer in range(len(stats.rows)):
        rows = stats.site_rows(layer, site)  # [rows, width]
        if scale_fn is None:
            out.append(_quantile(rows, target))
            continue
        c = scale_fn(layer, weights, stats).float().clamp_min(1e-12)  # [width]
        T = _quantile(rows * c, target)
        out.append((T / c).tolist())
    return out


def recipe_from_stats(
    method_name: str, target: float, stats: CalibStats, rt: TorchRuntime, scope="all"
) -> SparsityRecipe:
    """Thresholds of ``method`` at ``target`` over the sites of ``scope`` (see methods.scope_sites)."""
    method = registry.get(method_name)
    chosen = registry.scope_sites(method, scope)
    check_sparsity(target)
    if method.needs_up_stats and not stats.up_mean:
        raise SparsedgeError(f"{method.name} needs E|up| statistics")
    sites = {
        site: SiteThresholds(criterion=crit, thresholds=site_thresholds(method, site, stats, rt.model.w, target))
        for site, crit in method.sites.items() if site in chosen
    }
    cal = Calibration(corpus=stats.corpus, tokens=stats.tokens, text_hash=stats.text_hash,
                      seed=stats.seed, seconds=round(stats.seconds, 2))
    return SparsityRecipe(method=method.name, target_sparsity=target, model=model_fingerprint(rt.spec),
                          sites=sites, calibration=cal, tensors=_tensors(chosen)).validate(rt.spec)


# weight tensors whose rows / columns each site lets a kernel skip
_SITE_TENSORS = {"qkv_in": ("q", "k", "v"), "q_in": ("q",), "o_in": ("o",), "ffn_in": ("gate", "up"),
                 "gate_act": ("up", "down"), "down_in": ("down",)}


def _tensors(sites) -> list[str]:
    return sorted({t for s in sites for t in _SITE_TENSORS[s]})
