"""The sparsity recipe: one JSON file that drives the torch reference, the ONNX graph and the
native kernels alike, so all three compute the same function.

Every method reduces at run time to one rule per (layer, site): keep x_i where |x_i| >= t_i,
zero it otherwise. t is a scalar per layer, or a vector over the site's channels (CHESS's
channel-wise thresholds; WINA's criterion |x_i|·‖W[:, i]‖₂ >= T folded into t_i = T / ‖W[:, i]‖₂).
The method name and criterion are recorded for people; runtimes need only the thresholds.

Sites (sparsedge.runtimes.torch_model.SITES): qkv_in, q_in, o_in, ffn_in, gate_act, down_in.
Per-channel FFN thresholds (gate_act, down_in) are in the recipe's neuron order, that is after the
chunk permutation when chunking is on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import ModelSpec
from ..errors import SparsedgeError
from ..runtimes.torch_model import SITES

RECIPE_FORMAT = 1


def site_width(spec: ModelSpec, site: str) -> int:
    """Channels at a site: the input width of the linear layers it feeds."""
    return {
        "qkv_in": spec.hidden_size, "q_in": spec.hidden_size, "ffn_in": spec.hidden_size,
        "o_in": spec.n_heads * spec.head_dim,
        "gate_act": spec.intermediate_size, "down_in": spec.intermediate_size,
    }[site]


def model_fingerprint(spec: ModelSpec) -> dict[str, Any]:
    """What a recipe must agree with to apply to a model."""
    return {
        "arch": spec.arch, "n_layers": spec.n_layers, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
    }


@dataclass
class SiteThresholds:
    criterion: str  # for people: what was thresholded, e.g. "|x|", "|act(gate)_i|·E|up_i|"
    # per layer: a float (all channels) or a list of floats, one per channel
    thresholds: list[float | list[float]]


@dataclass
class Chunking:
    size: int  # neurons per chunk
    # per layer: new neuron j is original neuron permutation[l][j] (gate/up rows, down columns)
    permutation: list[list[int]] | None = None
    # chunk routing: per window of `window` tokens keep the top round(keep * n_chunks) chunks
    routing_window: int | None = None
    routing_keep: float | None = None


@dataclass
class Calibration:
    corpus: str
    tokens: int
    text_hash: str
    seed: int = 0
    seconds: float | None = None  # dense pass plus the sparse-aware pass
    # thresholds set by the sparse-aware pass (sparsify/calibrate.py), not the dense pass alone;
    # recipes written before it existed load as False
    sparse_aware: bool = False


@dataclass
class SparsityRecipe:
    method: str
    target_sparsity: float
    model: dict[str, Any]  # model_fingerprint of the model it was calibrated on
    sites: dict[str, SiteThresholds]
    calibration: Calibration
    # weight tensors whose work the sparsity skips (rows or columns), e.g. ["up", "down"]
    tensors: list[str] = field(default_factory=list)
    chunks: Chunking | None = None
    # measured on held-out text: achieved sparsity, ppl dense/sparse, top-1 agreement, CLS
    results: dict[str, Any] = field(default_factory=dict)
    format: int = RECIPE_FORMAT

    # ---- validation -------------------------------------------------------------------------
    def validate(self, spec: ModelSpec | None = None) -> "SparsityRecipe":
        check_sparsity(self.target_sparsity)
        if not self.sites:
            raise SparsedgeError("recipe sparsifies no site")
        for site, st in self.sites.items():
            if site not in SITES:
                raise SparsedgeError(f"recipe names unknown site {site!r} (known: {', '.join(SITES)})")
            if len(st.thresholds) != self.model["n_layers"]:
                raise SparsedgeError(
                    f"recipe site {site} has {len(st.thresholds)} layers, model has {self.model['n_layers']}"
                )
        if spec is not None:
            want = model_fingerprint(spec)
            diff = {k: (self.model.get(k), v) for k, v in want.items() if self.model.get(k) != v}
            if diff:
                k, (got, exp) = next(iter(diff.items()))
                raise SparsedgeError(
                    f"recipe is for another model: {k} is {got} in the recipe but {exp} in the model"
                )
            for site, st in self.sites.items():
                width = site_width(spec, site)
                for i, t in enumerate(st.thresholds):
                    if isinstance(t, list) and len(t) != width:
                        raise SparsedgeError(
                            f"recipe site {site} layer {i} has {len(t)} thresholds for {width} channels"
                        )
        if self.chunks is not None:
            ffn = self.model["intermediate_size"]
            if self.chunks.size <= 0 or ffn % self.chunks.size:
                raise SparsedgeError(f"chunk size {self.chunks.size} does not divide the FFN width {ffn}")
            c = self.chunks
            if c.routing_window is not None or c.routing_keep is not None:
                if not (isinstance(c.routing_window, int) and c.routing_window >= 1):
                    raise SparsedgeError(f"routing window must be a positive integer, got {c.routing_window}")
                if not (isinstance(c.routing_keep, (int, float)) and 0 < c.routing_keep <= 1):
                    raise SparsedgeError(f"routing keep fraction must be in (0, 1], got {c.routing_keep}")
            if c.permutation is not None and len(c.permutation) != self.model["n_layers"]:
                raise SparsedgeError(f"chunk permutation has {len(c.permutation)} layers")
            for i, p in enumerate(self.chunks.permutation or []):
                if sorted(p) != list(range(ffn)):
                    raise SparsedgeError(f"chunk permutation of layer {i} is not a permutation")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityRecipe":
        try:
            fmt = d.get("format")
            if fmt != RECIPE_FORMAT:
                raise SparsedgeError(f"recipe format {fmt!r} is not supported (this sparsedge reads {RECIPE_FORMAT})")
            sites = {k: SiteThresholds(**v) for k, v in d["sites"].items()}
            chunks = Chunking(**d["chunks"]) if d.get("chunks") else None
            return cls(
                method=d["method"], target_sparsity=float(d["target_sparsity"]), model=d["model"],
                sites=sites, calibration=Calibration(**d["calibration"]), chunks=chunks,
                tensors=list(d.get("tensors") or []),
                results=d.get("results") or {}, format=fmt,
            ).validate()
        except (KeyError, TypeError) as e:
            raise SparsedgeError(f"malformed recipe: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparsityRecipe":
        p = Path(path)
        if not p.is_file():
            raise SparsedgeError(f"no such recipe file: {path}")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SparsedgeError(f"{path} is not a JSON recipe: {e}") from e
        if not isinstance(d, dict):
            raise SparsedgeError(f"{path} is not a JSON recipe object")
        return cls.from_dict(d)


def check_sparsity(s: float) -> float:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 < s < 1.0):
        raise SparsedgeError(f"sparsity must be strictly between 0 and 1, got {s}")
    return float(s)


def _jsonable(x: Any) -> Any:
    """float32-precision floats (shorter JSON, exact for the float32 runtimes), no NaN/inf."""
    if isinstance(x, float):
        if not math.isfinite(x):
            raise SparsedgeError("recipe holds a non-finite number")
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
