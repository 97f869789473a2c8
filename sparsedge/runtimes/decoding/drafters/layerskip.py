"""Self-speculation by skipping layers (LayerSkip / SWIFT): the target's own weights, some
decoder layers left out, draft one token at a time.

Which layers to skip is searched on calibration text (``search``): greedily add the layer whose
removal keeps the draft's top-1 agreement with the full model highest (teacher-forced, every
position), as SWIFT selects layers by how often drafts are accepted; stop at ``max_ratio`` of the
layers or when agreement would fall below ``min_agreement``. The result is saved as
``layerskip.json`` in the artifact folder (or given as a path) and reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ....errors import SparsedgeError
from . import Target, register
from .model import RuntimeDrafter, torch_view

FILE = "layerskip.json"


@dataclass
class SkipPlan:
    skip: list[int]
    agreement: float  # teacher-forced top-1 agreement with the full model on the search text
    tokens: int
    n_layers: int

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path, n_layers: int) -> "SkipPlan":
        try:
            plan = cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise SparsedgeError(f"cannot read the layer-skip plan {path}: {e}") from e
        if plan.n_layers != n_layers or any(not 0 <= i < n_layers for i in plan.skip):
            raise SparsedgeError(f"{path} is a plan for a {plan.n_layers}-layer model, not {n_layers}")
        return plan


def _argmax(rt, ids: np.ndarray, window: int) -> np.ndarray:
    out = []
    for s in range(0, len(ids), window):
        rt.reset()
        out.append(rt.forward(ids[s : s + window]).argmax(-1))
    rt.reset()
    return np.concatenate(out)


def search(target: Target, ids, max_ratio: float = 0.5, min_agreement: float = 0.6,
           window: int = 256, progress: bool = True) -> SkipPlan:
    """Greedy SWIFT-style search of the skipped set on ``ids`` (token ids of calibration text)."""
    ids = np.asarray(ids, dtype=np.int64)
    rt = torch_view(target)
    L = rt.spec.n_layers
    ref = _argmax(rt, ids, window)
    skip: list[int] = []
    best_agree = 1.0
    # the first and last layers carry the embedding / unembedding transforms: never candidates
    pool = list(range(1, L - 1))
    bar = tqdm(total=int(max_ratio * L), desc="layerskip search", unit="layer", disable=not progress)
    while len(skip) < int(max_ratio * L) and pool:
        scores = {}
        for layer in pool:
            rt.model.skip = frozenset(skip + [layer])
            scores[layer] = float((_argmax(rt, ids, window) == ref).mean())
        layer = max(scores, key=scores.get)
        if scores[layer] < min_agreement:
            break
        skip.append(layer)
        pool.remove(layer)
        best_agree = scores[layer]
        bar.update(1)
    bar.close()
    rt.model.skip = frozenset()
    return SkipPlan(sorted(skip), round(best_agree, 4), int(len(ids)), L)


def open_skip_view(target: Target, plan: SkipPlan):
    import inspect

    from .model import target_gguf

    gguf = target_gguf(target)
    if gguf is not None:
        from ...native import NativeRuntime

        if "skip_layers" in inspect.signature(NativeRuntime.__init__).parameters:
            return NativeRuntime(gguf, threads=target.opts.get("threads"), recipe=False, skip_layers=plan.skip)
    return torch_view(target, skip_layers=plan.skip)


def plan_for(target: Target, arg: str | None, progress: bool = True) -> SkipPlan:
    """The plan given (a path), the artifact's layerskip.json, or a fresh search saved there."""
    m = target.model
    spec = getattr(target.runtime, "spec", None) or getattr(m, "spec", None)
    if spec is None:
        raise SparsedgeError("the layerskip drafter needs the target's model (its layer count)")
    L = spec.n_layers
    folder = Path(m.path) if getattr(m, "manifest", None) is not None else None
    if arg:
        return SkipPlan.load(arg, L)
    if folder is not None and (folder / FILE).is_file():
        return SkipPlan.load(folder / FILE, L)
    from .... import data

    tok = getattr(m, "tokenizer", None)
    if tok is None:
        raise SparsedgeError("the layerskip search needs the model's tokenizer; give a plan: layerskip:PLAN.json")
    ids = data.tokenize(tok, data.calibration_text()[:8000])[:1024]  # ~1k tokens: enough to rank layers
    plan = search(target, ids, progress=progress)
    if folder is not None:
        try:
            plan.save(folder / FILE)
        except OSError:
            pass  # a read-only artifact: the search is redone next time
    return plan


@register("layerskip")
def _make(target: Target, arg: str | None) -> RuntimeDrafter:
    plan = plan_for(target, arg)
    return RuntimeDrafter(open_skip_view(target, plan), "layerskip")
