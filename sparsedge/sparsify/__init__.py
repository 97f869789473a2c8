"""sparsify/: calibrated activation sparsity (CATS, CHESS, WINA, TEAL-style) and chunk sparsity.

    recipe = calibrate("smollm2-135m", "chess", 0.5)          # -> SparsityRecipe
    hooks = apply(runtime, recipe)                             # torch reference, decode semantics
    result = evaluate(runtime, tokenizer, recipe)              # ppl, achieved sparsity, top-1, CLS
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import data
from ..errors import SparsedgeError
from .apply import SparseHooks, apply, remove
from .calibrate import CalibConfig, CalibStats, collect_stats, recipe_from_stats
from .evaluate import RecipeEval, dense_reference, evaluate
from .methods import get as get_method
from .methods import names as method_names
from .recipe import Chunking, SparsityRecipe, check_sparsity

FFN_SITES = ("gate_act", "down_in")


def calibration_stats(rt, tokenizer, text: str | None = None, config: CalibConfig | None = None,
                      progress: bool = True, corpus: str | None = None) -> CalibStats:
    cfg = config or CalibConfig()
    if text is None:
        text, corpus = data.calibration_text(), f"{data.CORPUS_NAME}:calibration"
    ids = data.tokenize(tokenizer, text)
    return collect_stats(rt, ids, cfg, corpus or "user-text", data.text_hash(text), progress)


def add_chunking(recipe: SparsityRecipe, stats: CalibStats, size: int, cluster: bool = True,
                 routing_window: int | None = None, routing_keep: float | None = None,
                 seed: int = 0) -> SparsityRecipe:
    """Group each layer's FFN neurons into chunks of ``size``: by co-activation on the calibration
    sample (cluster=True) or in the original order. Per-channel FFN thresholds follow the
    permutation, so the recipe's function is unchanged."""
    from .chunks import cluster_neurons, permute_channels

    ffn = recipe.model["intermediate_size"]
    if size <= 0 or ffn % size:
        raise SparsedgeError(f"chunk size {size} does not divide the FFN width {ffn}")
    if routing_keep is not None and not 0 < routing_keep <= 1:
        raise SparsedgeError(f"routing keep fraction must be in (0, 1], got {routing_keep}")
    perms = None
    if cluster:
        site = get_method(recipe.method).ffn_site
        perms = []
        for layer in range(recipe.model["n_layers"]):
            t = torch.tensor(recipe.sites[site].thresholds[layer], dtype=torch.float32)
            active = (stats.site_rows(layer, site) >= t).numpy()  # [rows, ffn] calibration activity
            perm = cluster_neurons(active, size, seed=seed)
            perms.append([int(i) for i in perm])
            for s in FFN_SITES:
                if s in recipe.sites and isinstance(recipe.sites[s].thresholds[layer], list):
                    th = np.asarray(recipe.sites[s].thresholds[layer], dtype=np.float32)
                    recipe.sites[s].thresholds[layer] = permute_channels(th, perm).tolist()
    recipe.chunks = Chunking(size=size, permutation=perms, routing_window=routing_window,
                             routing_keep=routing_keep)
    return recipe.validate()


def calibrate(
    model: Any, method: str, sparsity: float, scope: str = "all", chunk_size: int | None = None,
    cluster: bool = True,
    text: str | None = None, config: CalibConfig | None = None, progress: bool = True,
) -> SparsityRecipe:
    """Calibrate ``method`` at ``sparsity`` on a model argument / LoadedModel (torch reference)."""
    from ..runtimes import open_runtime
    from ..sources import LoadedModel, load

    get_method(method)
    check_sparsity(sparsity)
    loaded = model if isinstance(model, LoadedModel) else load(model)
    rt = open_runtime(loaded, "torch")
    stats = calibration_stats(rt, loaded.tokenizer, text, config, progress)
    recipe = recipe_from_stats(method, sparsity, stats, rt, scope, progress=progress)
    if chunk_size:
        add_chunking(recipe, stats, chunk_size, cluster=cluster)
    return recipe


__all__ = [
    "CalibConfig", "CalibStats", "Chunking", "RecipeEval", "SparseHooks", "SparsityRecipe",
    "add_chunking", "apply", "calibrate", "calibration_stats", "check_sparsity", "collect_stats",
    "dense_reference", "evaluate", "get_method", "method_names", "recipe_from_stats", "remove",
]
