"""Native kernels vs llama.cpp on one GGUF, one thread count, one run.

    python benchmarks/native_bench.py model.q4_0.gguf --threads 2 --recipe cats.json --recipe teal.json

Prints decode tok/s for greedy decoding (``--tokens`` new tokens, one forward per token) of:
native dense (the file's recipe ignored), native sparse per recipe given, and llama.cpp dense
(sparsedge.runtimes.llamacpp, when importable); the ratios native dense / llama.cpp and
native sparse / native dense; and t(k)/t(1), the cost of one forward of k tokens relative to one
token, for k = 1, 2, 4, 8, 16 (what sizes draft trees, DESIGN.md §3). For the native runtimes the
curve is also given in process CPU time (``cpu t(k)/t(1)``): their threads sleep at barriers
(OMP_WAIT_POLICY=PASSIVE), so CPU time counts the work alone, while wall time on a CPU shared with
other jobs mostly measures the scheduler (llama.cpp's threads spin, so its CPU time would count
waiting and is not reported). ``--ppl N`` adds perplexity
over N held-out tokens (sparsedge.data's evaluation text) for every runtime; ``--json`` prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# OpenMP threads wait passively at barriers unless the user chose otherwise: on a CPU shared with
# other jobs, spinning collapses 2-thread decoding (set before anything loads libgomp).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPT = "The Python language reference describes the syntax and core semantics of the language. It is"


def decode_tps(rt, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy decoding of n tokens after the prompt; tok/s over the n single-token forwards."""
    rt.reset()
    tok = int(rt.forward(prompt_ids)[-1].argmax())
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        tok = int(rt.forward([tok])[-1].argmax())
        out.append(tok)
    dt = time.perf_counter() - t0
    rt.reset()
    return (n - 1) / dt, out


def cost_curve(rt, prompt_ids: list[int], ks: list[int], reps: int) -> tuple[dict[int, float], dict[int, float]]:
    """Fastest of ``reps`` (robust to other jobs on the CPU) wall seconds and process CPU seconds of
    one forward of k (chained) tokens after the prompt, per k."""
    rt.reset()
    rt.forward(prompt_ids)
    n = rt.n_past
    wall = {k: float("inf") for k in ks}
    cpu = dict(wall)
    for _ in range(reps):  # every k once per round: a burst of other work hits all of them alike
        for k in ks:
            t0, c0 = time.perf_counter(), time.process_time()
            rt.forward(list(range(100, 100 + k)))
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
            rt.truncate(n)
    rt.reset()
    return wall, cpu


def tokenizer_for(args):
    if args.no_tokenizer:
        return None
    try:
        from sparsedge import load

        return load(args.model, progress=False).tokenizer
    except Exception as e:  # the benchmark still runs on fixed token ids
        print(f"(no tokenizer: {e}; using fixed token ids)", file=sys.stderr)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--recipe", action="append", default=[], help="recipe.json (repeatable); 'file' = the GGUF's own")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds per runtime, interleaved; the best counts")
    ap.add_argument("--ppl", type=int, default=0, help="also measure perplexity over this many held-out tokens")
    ap.add_argument("--model", default="smollm2-135m", help="where the tokenizer comes from")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from sparsedge.runtimes.native import NativeRuntime, level

    ks = [int(k) for k in args.ks.split(",")]
    tok = tokenizer_for(args)
    prompt = list(tok(PROMPT, add_special_tokens=False)["input_ids"]) if tok else list(range(1, 21))

    runtimes: list[tuple[str, object]] = [("native dense", NativeRuntime(args.gguf, threads=args.threads, recipe=False))]
    for r in args.recipe:
        rt = NativeRuntime(args.gguf, threads=args.threads, recipe=None if r == "file" else r, stats=True)
        label = f"native {rt.recipe.method if rt.recipe else 'dense'} {Path(r).stem}"
        runtimes.append((label, rt))
    if not args.no_llamacpp:
        try:
            from sparsedge.runtimes.llamacpp import LlamaCppRuntime

            runtimes.append(("llama.cpp dense", LlamaCppRuntime(args.gguf, threads=args.threads, n_ctx=1024)))
        except Exception as e:  # not installed, or the library cannot load this file
            print(f"(llama.cpp skipped: {e})", file=sys.stderr)

    report = {"gguf": str(args.gguf), "threads": args.threads, "tokens": args.tokens, "kernels": level(),
              "runtimes": {}}
    for _, rt in runtimes:  # warm up (page in the weights)
        rt.forward(prompt)
        rt.reset()
    # decode rounds interleaved across runtimes, so that a burst of other work hits all of them
    best: dict[str, float] = {}
    outs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for label, rt in runtimes:
            tps, outs[label] = decode_tps(rt, prompt, args.tokens)
            best[label] = max(best.get(label, 0.0), tps)
    for label, rt in runtimes:
        tps = best[label]
        curve, cpu = cost_curve(rt, prompt, ks, args.reps)
        entry = {"decode_tok_s": round(tps, 2), "t_k_over_t_1": {k: round(curve[k] / curve[ks[0]], 2) for k in ks},
                 "t_k_ms": {k: round(1e3 * curve[k], 2) for k in ks}}
        if label.startswith("native"):
            entry["cpu_t_k_over_t_1"] = {k: round(cpu[k] / cpu[ks[0]], 2) for k in ks}
            entry["cpu_t_k_ms"] = {k: round(1e3 * cpu[k], 2) for k in ks}
        if hasattr(rt, "memory"):
            entry["memory_mb"] = round(rt.memory()["total"] / 2**20, 1)
        if getattr(rt, "recipe", None) is not None:
            entry["achieved_sparsity"] = {s: round(v, 3) for s, v in rt.achieved_sparsity().items()}
        if args.ppl and tok is not None:
            from sparsedge.data import PplProtocol, perplexity

            res = perplexity(rt, tokenizer=tok, protocol=PplProtocol(window=256, max_tokens=args.ppl, chunk=256),
                             progress=False)
            entry["ppl"] = round(res.ppl, 4)
        entry["first_tokens"] = outs[label][:8]
        report["runtimes"][label] = entry
        if not args.json:
            extra = f"  ppl {entry['ppl']}" if "ppl" in entry else ""
            cpu_s = ("   cpu t(k)/t(1) " + " ".join(f"k={k}:{entry['cpu_t_k_over_t_1'][k]}" for k in ks)
                     if "cpu_t_k_over_t_1" in entry else "")
            print(f"{label:28s} {tps:7.2f} tok/s   t(k)/t(1) "
                  + " ".join(f"k={k}:{entry['t_k_over_t_1'][k]}" for k in ks) + cpu_s + extra, flush=True)

    r = report["runtimes"]
    base = r["native dense"]["decode_tok_s"]
    ratios = {}
    if "llama.cpp dense" in r:
        ratios["native dense / llama.cpp"] = round(base / r["llama.cpp dense"]["decode_tok_s"], 3)
    for label in r:
        if label.startswith("native ") and label != "native dense":
            ratios[f"{label} / native dense"] = round(r[label]["decode_tok_s"] / base, 3)
    report["ratios"] = ratios
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in ratios.items():
            print(f"{k:45s} {v:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
