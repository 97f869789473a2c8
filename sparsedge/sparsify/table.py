"""The sparsity table of the README: every method at 25/50/70% on a model, measured in one run.

    python -m sparsedge.sparsify.table --model smollm2-135m --out docs/sparsity-smollm2-135m.md

One dense calibration pass (16,384 tokens of the calibration span) gives the statistics of every
method and level; each recipe's thresholds are then set by its own sparse-aware pass over the same
tokens (sparsify/calibrate.py). Each recipe is measured on the held-out span (8,192 tokens, the
perplexity protocol of sparsedge.data): perplexity dense and sparse, achieved sparsity, top-1
agreement with the dense model, and chunk-level sparsity (32-neuron chunks) at k = 1 and 8 in the
original neuron order and after co-activation clustering. Chunk routing rows compare clustered and
unclustered chunks at the same chunk budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import data
from ..runtimes import open_runtime
from ..sources import load
from . import (CalibConfig, add_chunking, calibration_stats, dense_reference, evaluate,
               recipe_from_stats)
from .methods import get, names, scope_sites

LEVELS = (0.25, 0.5, 0.7)
SCOPES = ("ffn", "all")
CHUNK = 32
# routing: (threshold method, scope, threshold target, window, keep fraction)
ROUTING = (("teal", "ffn", 0.25, 1, 0.5), ("teal", "ffn", 0.25, 8, 0.5))


def run(model: str, calib_tokens: int, eval_tokens: int, progress: bool = True,
        partial: Path | None = None) -> dict:
    """All rows; with ``partial``, rows already measured there (same settings) are reused and each
    new row is appended as soon as it is measured, so a long run can be resumed."""
    loaded = load(model)
    rt = open_runtime(loaded, "torch")
    t0 = time.perf_counter()
    stats = calibration_stats(rt, loaded.tokenizer, config=CalibConfig(tokens=calib_tokens), progress=progress)
    proto = data.PplProtocol(max_tokens=eval_tokens)
    dense = dense_reference(rt, loaded.tokenizer, proto, progress=progress)
    configs = []
    for m in names():
        seen = []
        for scope in SCOPES:
            sites = scope_sites(get(m), scope)
            if sites in seen:
                continue
            seen.append(sites)
            configs += [(m, scope, lvl) for lvl in LEVELS]
    settings = {"model": model, "calib": calib_tokens, "eval": eval_tokens, "hash": dense.corpus_hash,
                "sparse_aware": stats.config.sparse_aware}
    done: dict[str, dict] = {}
    if partial is not None and partial.is_file():
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            if rec.pop("settings") == settings:
                done[rec.pop("key")] = rec

    def measured(key: str, make) -> dict:
        if key not in done:
            r, extra = make()
            done[key] = {**extra, **evaluate(rt, loaded.tokenizer, r, proto, dense=dense, progress=False).to_dict()}
            if partial is not None:
                with open(partial, "a") as f:
                    f.write(json.dumps({"settings": settings, "key": key, **done[key]}) + "\n")
        return done[key]

    def thresholds(m, scope, lvl):  # -> recipe, seconds of its sparse-aware pass
        r = recipe_from_stats(m, lvl, stats, rt, scope)
        return r, round(r.calibration.seconds - stats.seconds, 1)

    def threshold_row(m, scope, lvl):
        r, s = thresholds(m, scope, lvl)
        add_chunking(r, stats, CHUNK, cluster=True)
        return r, {"method": m, "scope": scope, "sites": list(r.sites), "target": lvl, "sparse_aware_s": s}

    def routing_row(m, scope, lvl, window, keep, cluster):
        r, s = thresholds(m, scope, lvl)
        add_chunking(r, stats, CHUNK, cluster=cluster, routing_window=window, routing_keep=keep)
        return r, {"method": m, "scope": scope, "target": lvl, "window": window, "keep": keep,
                   "clustered": cluster, "sparse_aware_s": s}

    rows = [measured(f"{m}/{scope}/{lvl}", lambda: threshold_row(m, scope, lvl))
            for m, scope, lvl in tqdm(configs, desc="recipes", disable=not progress)]
    routing = [measured(f"route/{m}/{scope}/{lvl}/{w}/{keep}/{c}",
                        lambda: routing_row(m, scope, lvl, w, keep, c))
               for m, scope, lvl, w, keep in ROUTING for c in (False, True)]
    aware = [r["sparse_aware_s"] for r in rows + routing if "sparse_aware_s" in r]
    return {"model": model, "calibration_tokens": stats.tokens, "calibration_s": round(stats.seconds, 1),
            "sparse_aware": stats.config.sparse_aware,
            "sparse_aware_s": round(sum(aware) / len(aware), 1) if aware else None,
            "eval_tokens": dense.eval_tokens, "ppl_dense": dense.ppl, "corpus_hash": dense.corpus_hash,
            "chunk_size": CHUNK, "rows": rows, "routing": routing,
            "total_s": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    if res.get("sparse_aware"):
        how = (f"a dense pass for all rows in {res['calibration_s']} s, then a sparse-aware pass per "
               f"recipe, {res['sparse_aware_s']} s on average")
    else:
        how = f"one dense pass for all rows in {res['calibration_s']} s"
    out = [
        f"Model `{res['model']}`; calibration: {res['calibration_tokens']} tokens, {how}; "
        f"held-out: {res['eval_tokens']} "
        f"tokens, dense perplexity {res['ppl_dense']:.3f}. CLS: {res['chunk_size']}-neuron chunks of "
        "the FFN neuron activity (orig = original order, clus = after co-activation clustering).",
        "",
        "| method | sites | target | ppl | Δppl | achieved | top-1 | CLS k=1 orig | CLS k=8 orig | CLS k=1 clus | CLS k=8 clus |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        o = r.get("cls_original") or r["cls"]
        out.append(
            f"| {r['method']} | {'+'.join(r['sites'])} | {r['target']:.0%} | {r['ppl']:.3f} | "
            f"{r['ppl'] / r['ppl_dense'] - 1:+.1%} | {r['achieved_sparsity']:.3f} | "
            f"{r['top1_agreement']:.3f} | {o['1']:.4f} | {o['8']:.4f} | {r['cls']['1']:.4f} | {r['cls']['8']:.4f} |"
        )
    out += ["", "Chunk routing (top chunks per window by summed |down_in|, on top of the threshold):", "",
            "| recipe | window | chunks kept | order | ppl | Δppl | CLS at window |",
            "|---|---|---|---|---|---|---|"]
    for r in res["routing"]:
        out.append(
            f"| {r['method']} {r['scope']} {r['target']:.0%} | {r['window']} | {r['keep']:.0%} | "
            f"{'clustered' if r['clustered'] else 'original'} | {r['ppl']:.3f} | "
            f"{r['ppl'] / r['ppl_dense'] - 1:+.1%} | {r['cls'][str(r['window'])]:.3f} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsedge.sparsify.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", help="write the markdown table here (and the JSON beside it)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    res = run(a.model, a.calib_tokens, a.eval_tokens,
              partial=out.with_suffix(".partial.jsonl") if out is not None else None)
    md = markdown(res)
    if out is not None:
        out.write_text(md)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
