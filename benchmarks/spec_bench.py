"""Speculative decoding, one run: every runtime × drafter on the prompt suite, against plain greedy.

    python benchmarks/spec_bench.py ART --runtimes native,llamacpp,onnxruntime \
        --drafters ngram,recycle,ngram+recycle,sparse:r70.json --tokens 128 --threads 2 --out docs/spec

For each runtime: plain greedy decode tok/s over the suite (``--tokens`` new tokens per prompt);
for each drafter: tok/s, steps, tokens per step (mean_accepted), acceptance rate, draft / verify
time, whether every output equals plain greedy's on that runtime (it must), the ratio to plain
greedy on the same runtime and to llama.cpp's plain greedy. ``+`` joins drafters (ngram+recycle is
the CLI's ngram,recycle). Recycle's matrix and the n-gram cache stay warm across the prompts of a
run, as they would in a server; ``--warm N`` first seeds them from N tokens of the calibration
corpus (not the prompts). Prints a markdown table; ``--out DIR`` writes spec.json and spec.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--runtimes", default="native,llamacpp,onnxruntime",
                    help="comma list of NAME or NAME:QUANT (a file of the artifact, e.g. onnxruntime:fp32)")
    ap.add_argument("--drafters", default="ngram,recycle,ngram+recycle")
    ap.add_argument("--modes", default="tree", help="spec and/or tree")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=0, help="first N prompts of the suite (0: all)")
    ap.add_argument("--warm", type=int, default=0, help="seed recycle / n-gram from N corpus tokens")
    ap.add_argument("--quant", default=None, help="GGUF / ONNX file of the artifact (default: fastest)")
    ap.add_argument("--flat-cost", action="store_true",
                    help="price a verification of any size as one token: trees grow to the budget, and "
                         "tokens/step is what the drafters could give if verification were free (their "
                         "ceiling; tok/s is then not a speed worth quoting)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import numpy as np

    from sparsedge import load, open_runtime
    from sparsedge.bench.measure import run_suite, warm_drafter, warm_ids
    from sparsedge.runtimes.decoding import (CostCurve, GenerationConfig, GenerationStats, SpecConfig, SpecStats, Target,
                                             generate, make_drafter, prompt_suite, speculative_generate)
    from sparsedge.text import encode_prompt, stop_ids

    loaded = load(a.artifact, progress=False)
    suite = prompt_suite()[: a.prompts or None]
    prompts = [encode_prompt(loaded.tokenizer, p["prompt"], chat=p["chat"]).tolist() for p in suite]
    stop = stop_ids(loaded.tokenizer, loaded.spec)
    # no stop tokens: every prompt decodes exactly --tokens tokens, so runs compare like for like
    cfg = GenerationConfig(max_new_tokens=a.tokens)
    seed_ids = warm_ids(loaded.tokenizer, a.warm)
    rows, plain_tps = [], {}
    for entry in [r.strip() for r in a.runtimes.split(",") if r.strip()]:
        # NAME or NAME:QUANT (e.g. onnxruntime:fp32); --quant applies to the GGUF runtimes
        rname, _, q = entry.partition(":")
        q = q or (a.quant if a.quant and rname in ("llamacpp", "native") else None)
        opts = {"threads": a.threads}
        try:
            rt = open_runtime(loaded, rname, **opts, **({"quant": q} if q else {}))
        except Exception as e:  # a runtime that is not installed is reported, not fatal
            print(f"# {rname}: unavailable ({e})", file=sys.stderr)
            continue
        tgt = Target(rt, loaded, rname, {**opts, **({"quant": q} if q else {})})

        def plain(p):
            st = GenerationStats()
            return st, list(generate(rt, p, cfg, st))

        list(generate(rt, prompts[0], GenerationConfig(max_new_tokens=8)))  # warm-up
        base = run_suite(prompts, plain)
        ref, dec, n_tok = base.outputs, base.decode_s, base.decoded
        plain_tps[entry] = n_tok / dec
        rows.append({"runtime": entry, "drafter": "-", "mode": "greedy", "tok_s": round(n_tok / dec, 2),
                     "identical": True})
        print(f"{entry:12s} plain greedy {n_tok / dec:8.2f} tok/s", file=sys.stderr)
        for dname in [d.strip() for d in a.drafters.split(",") if d.strip()]:
            dr = make_drafter(dname.replace("+", ","), tgt)
            if seed_ids:
                warm_drafter(dr, rt, seed_ids)
            for mode in [m.strip() for m in a.modes.split(",")]:
                sc = SpecConfig(mode=mode, budget=a.budget,
                                cost=CostCurve([1, 32], [1.0, 1.0]) if a.flat_cost else None)

                def spec(p):
                    st = SpecStats()
                    return st, list(speculative_generate(rt, p, cfg, dr, sc, st))

                run = run_suite(prompts, spec)
                same = run.outputs == ref
                tps = n_tok / run.decode_s
                f = run.figures()
                row = {"runtime": entry, "drafter": dname, "mode": mode, "tok_s": round(tps, 2),
                       "identical": same, "steps": run.steps,
                       **{k: round(f.get(k, 0.0), 3) for k in ("mean_accepted", "acceptance_rate", "nodes_per_step",
                                                               "draft_s", "verify_s")},
                       "vs_plain": round(tps / plain_tps[entry], 3)}
                rows.append(row)
                print(f"{entry:12s} {dname:24s} {mode:5s} {tps:8.2f} tok/s  x{row['vs_plain']:.2f}  "
                      f"{row['mean_accepted']:.2f} tok/step  identical={same}", file=sys.stderr)
            dr.close()
        getattr(rt, "close", lambda: None)()
        del rt
    base = next((v for k, v in plain_tps.items() if k.partition(":")[0] == "llamacpp"), None)
    for r in rows:
        r["vs_llamacpp"] = round(r["tok_s"] / base, 3) if base else None
    lines = ["| runtime | drafter | mode | tok/s | × plain (same runtime) | × llama.cpp plain | tokens/step | "
             "acceptance | nodes/step | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['drafter']} | {r['mode']} | {r['tok_s']:.1f} | "
                     f"{r.get('vs_plain', 1.0):.2f} | {r['vs_llamacpp'] or float('nan'):.2f} | "
                     f"{r.get('mean_accepted', 1.0):.2f} | {r.get('acceptance_rate', float('nan')):.2f} | "
                     f"{r.get('nodes_per_step', 0):.1f} | {'yes' if r['identical'] else 'NO'} |")
    md = "\n".join(lines)
    settings = {"artifact": a.artifact, "tokens": a.tokens, "threads": a.threads, "prompts": len(prompts),
                "budget": a.budget, "warm": a.warm, "quant": a.quant, "flat_cost": a.flat_cost,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
        (out / "spec.md").write_text(f"settings: {json.dumps(settings)}\n\n{md}\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
