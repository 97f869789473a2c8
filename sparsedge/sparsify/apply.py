"""Applying a recipe to the torch reference runtime, with decode-time semantics: every position
is sparsified, each token by its own activations, whether the forward holds 1 token or 512.

``apply`` installs one hook per recipe site on the Decoder: x -> x · (|x| >= t), t [width] or a
scalar per layer. A chunk permutation is applied to the runtime's weights first (function-
preserving), so per-channel FFN thresholds are read in the recipe's neuron order. The returned
``SparseHooks`` counts what it zeroed (achieved sparsity) and can keep the FFN activity masks for
chunk-level sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SparsedgeError
from ..runtimes.torch_ref import TorchRuntime
from .recipe import SparsityRecipe


@dataclass
class SparseHooks:
    recipe: SparsityRecipe
    thresholds: dict[str, list[torch.Tensor]]  # site -> per layer scalar or [width]
    pruned: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    capture_site: str | None = None
    # per layer: list of bool [n, ffn] activity masks at capture_site, in recipe neuron order
    masks: list[list[np.ndarray]] = field(default_factory=list)

    def achieved(self) -> dict[str, float]:
        """Fraction of zeroed entries per site, and their mean over sites under "mean"."""
        by = {s: self.pruned[s] / self.seen[s] for s in self.seen if self.seen[s]}
        if by:
            by["mean"] = float(np.mean(list(by.values())))
        return by

    def layer_masks(self, layer: int) -> np.ndarray:
        return np.concatenate(self.masks[layer]) if self.masks and self.masks[layer] else np.zeros((0, 0), bool)


def _hook(state: SparseHooks, site: str, route: tuple[int, int, float] | None):
    """x -> x · keep, keep = |x| >= t (thresholded sites), further restricted to the top chunks of
    each window when ``route`` = (chunk_size, window, keep fraction) is given."""
    from .chunks import route_top_chunks

    ts = state.thresholds.get(site)
    capture = site == state.capture_site

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = x.abs() >= ts[layer] if ts is not None else torch.ones_like(x, dtype=torch.bool)
        if route is not None:  # [n, ffn]: chunk routing on the thresholded magnitudes
            keep &= route_top_chunks(x.abs() * keep, *route)
        if ts is not None or route is not None:  # a site only captured is not sparsified
            state.pruned[site] = state.pruned.get(site, 0) + int((~keep).sum())
            state.seen[site] = state.seen.get(site, 0) + keep.numel()
        if capture:
            state.masks[layer].append(keep.numpy().copy())
        return x * keep
    return hook


def apply(
    rt: TorchRuntime, recipe: SparsityRecipe, capture_ffn: bool = False, weights_permuted: bool = False
) -> SparseHooks:
    """Install ``recipe`` on ``rt`` (replacing any earlier recipe). Returns the hooks' state.

    weights_permuted: the runtime's weights are in the recipe's neuron order already (an exported
    artifact); otherwise a chunk permutation is applied to them here."""
    from . import methods

    recipe.validate(rt.spec)
    remove(rt)
    ch = recipe.chunks
    if ch is not None and ch.permutation and not weights_permuted:
        from .chunks import permute_ffn

        for layer, perm in enumerate(ch.permutation):
            permute_ffn(rt.model.w, layer, perm)
        rt._sparsedge_perm = ch.permutation  # undone by remove()
    ts = {
        site: [torch.tensor(t, dtype=torch.float32) for t in st.thresholds]
        for site, st in recipe.sites.items()
    }
    ffn_site = methods.get(recipe.method).ffn_site
    route = None
    if ch is not None and ch.routing_window:
        route = (ch.size, ch.routing_window, ch.routing_keep)
    state = SparseHooks(recipe, ts, capture_site=ffn_site if capture_ffn else None,
                        masks=[[] for _ in range(rt.spec.n_layers)] if capture_ffn else [])
    for site in set(ts) | ({ffn_site} if route or capture_ffn else set()):
        rt.model.hooks[site] = _hook(state, site, route if site == ffn_site else None)
    return state


def remove(rt: TorchRuntime) -> None:
    """Back to the dense model: hooks off, weights in their original neuron order."""
    rt.model.hooks.clear()
    perm = getattr(rt, "_sparsedge_perm", None)
    if perm:
        from .chunks import permute_ffn

        for layer, p in enumerate(perm):
            permute_ffn(rt.model.w, layer, np.argsort(np.asarray(p)))
        rt._sparsedge_perm = None


def check_runtime(rt) -> TorchRuntime:
    if not isinstance(rt, TorchRuntime):
        raise SparsedgeError(f"recipes apply to the torch runtime here, not {getattr(rt, 'name', rt)!r}")
    return rt
