"""The method registry. One flat module per method (cats.py, chess.py, wina.py, teal.py) registers
a ``Method``: which sites it thresholds, and for each site the per-channel scale c_i that turns
|x_i| into the method's criterion |x_i|·c_i (None: the criterion is |x_i| itself).

Calibration then takes, per layer and site, T = the target quantile of the criterion over
calibration activations, and stores t_i = T / c_i (or T): at run time every method is the same
rule, keep x_i where |x_i| >= t_i.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..arch import ModelSpec
from ..errors import SparsedgeError

# scale(layer, weights, stats) -> [width] tensor or None
Scale = Callable[[int, Mapping[str, torch.Tensor], "object"], Optional[torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    sites: Mapping[str, str]  # site -> criterion, for people ("|x|", "|x_i|·‖W[:,i]‖₂", ...)
    attn_sites: tuple[str, ...]  # which of those are attention inputs (the rest are the FFN's)
    scales: Mapping[str, Scale]  # sites whose criterion has a per-channel factor
    ffn_site: str  # where FFN neuron activity is read (for chunk-level sparsity)
    needs_up_stats: bool = False  # CHESS: E|up_i| from a calibration pass


_REGISTRY: dict[str, Method] = {}
_MODULES = ("cats", "chess", "wina", "teal")


def register(m: Method) -> Method:
    if m.name in _REGISTRY:
        raise ValueError(f"method {m.name!r} registered twice")
    _REGISTRY[m.name] = m
    return m


def _load_all() -> None:
    if not _REGISTRY:
        for mod in _MODULES:
            importlib.import_module(f"{__package__}.{mod}")


def names() -> list[str]:
    _load_all()
    return list(_REGISTRY)


def get(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise SparsedgeError(f"unknown sparsity method {name!r} (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


SCOPES = ("all", "ffn", "attn")


def scope_sites(m: Method, scope: str | Sequence[str]) -> list[str]:
    """The sites a recipe covers: "all" of the method's; "ffn", its FFN neuron site alone (the
    activations whose sparsity skips whole neurons: gate_act or down_in); "attn", its attention
    inputs; or a comma-separated list of the method's sites."""
    if isinstance(scope, str) and scope in SCOPES:
        chosen = {"all": list(m.sites), "ffn": [m.ffn_site], "attn": list(m.attn_sites)}[scope]
    else:
        chosen = [s.strip() for s in (scope.split(",") if isinstance(scope, str) else scope)]
        bad = [s for s in chosen if s not in m.sites]
        if bad:
            raise SparsedgeError(
                f"method {m.name} does not cover {', '.join(bad)} (its sites: {', '.join(m.sites)}; "
                f"or a scope: {', '.join(SCOPES)})"
            )
    if not chosen:
        raise SparsedgeError(f"method {m.name} has no {scope} sites")
    return chosen


def column_norms(*ws: torch.Tensor) -> torch.Tensor:
    """‖W[:, i]‖₂ over the rows of the stacked consuming weights ([out, in] each) -> [in]."""
    return torch.cat(ws, dim=0).float().norm(dim=0)


def ffn_width(spec: ModelSpec) -> int:
    return spec.intermediate_size
