"""Native kernels vs llama.cpp on one GGUF, one thread count, one run.

    python benchmarks/native_bench.py model.q4_0.gguf --threads 2 --recipe cats.json --recipe teal.json

Prints decode tok/s for greedy decoding (``--tokens`` new tokens, one forward per token) of:
native dense (the file's recipe ignored), native sparse per recipe given, and llama.cpp dense
(sparsedge.runtimes.llamacpp, when importable); the ratios native dense / llama.cpp and
native sparse / native dense; and t(k)/t(1), the cost of one forward of k tokens relative to one
token, for k = 1, 2, 4, 8, 16 (what sizes draft trees, DESIGN.md §3). For the native runtimes the
curve is also given in process CPU time (``cpu t(k)/t(1)``): run with OMP_WAIT_POLICY=PASSIVE their
threads sleep at barriers, so CPU time counts the work alone, while wall time on a CPU shared with
other jobs mostly measures the scheduler (the engine's default short spin, and llama.cpp's spinning
threads, count some waiting as CPU time). ``--ppl N`` adds perplexity
over N held-out tokens (sparsedge.data's evaluation text) for every runtime; ``--json`` prints one
JSON object.

    python benchmarks/native_bench.py ARTIFACT_OR_GGUF --memory [--tokens 128] [--threads 2]

``--memory`` instead measures peak resident memory (issue 5: peak RSS <= 1.5 x (GGUF + KV cache)).
For each GGUF (the file given, or every model.*.gguf of an artifact folder) a fresh Python process
opens a dense native session (``n_ctx`` 512) and greedily decodes ``--tokens`` tokens; it reports
the GGUF size, the KV cache's bytes, the peak RSS (VmHWM, and ru_maxrss), the RSS just after the
imports (interpreter + numpy + sparsedge), and the ratios peak / (GGUF + KV) for the whole process
and for the engine alone (peak minus the RSS after imports). With an artifact folder it also
measures what ``sparsedge run`` loads on top (the tokenizer through sources.load) and the RSS that
importing numpy / onnxruntime / tokenizers / transformers / torch costs on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

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


# The child process of --memory: prints one JSON object. RSS from /proc/self/status (Linux), else
# ru_maxrss only. argv: path threads tokens mode ("engine": open the GGUF; "cli": as `sparsedge run`
# does, sources.load(folder) (tokenizer) then open_runtime(loaded, "native", quant)).
_MEM_CHILD = r"""
import json, os, resource, sys
def status():
    d = {}
    try:
        for line in open('/proc/self/status'):
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'VmHWM'):
                d[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return d
path, threads, n_tok, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {'interpreter': status().get('VmRSS')}
import numpy
out['after_numpy'] = status().get('VmRSS')
import sparsedge
from sparsedge.runtimes.native import NativeRuntime
out['after_imports'] = status().get('VmRSS')
if mode == 'cli':
    from sparsedge.sources import load
    from sparsedge.runtimes import open_runtime
    folder, quant = os.path.dirname(path), os.path.basename(path).split('.')[-2]
    loaded = load(folder, progress=False)
    out['after_tokenizer'] = status().get('VmRSS')
    rt = open_runtime(loaded, 'native', quant=quant, threads=threads)
else:
    rt = NativeRuntime(path, threads=threads)
out['after_load'] = status().get('VmRSS')
out['load_peak'] = status().get('VmHWM')
tok = int(rt.forward(list(range(1, 21)))[-1].argmax())
for _ in range(n_tok - 1):
    tok = int(rt.forward([tok])[-1].argmax())
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out['ru_maxrss'] = ru * (1 if sys.platform == 'darwin' else 1024)
out['peak'] = status().get('VmHWM', out['ru_maxrss'])
out['end'] = status().get('VmRSS')
out['memory'] = rt.memory()
out['torch_imported'] = 'torch' in sys.modules
out['transformers_imported'] = 'transformers' in sys.modules
out['gguf_imported'] = 'gguf' in sys.modules
print(json.dumps(out))
"""

_IMPORT_CHILD = r"""
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
base = rss()
__import__(sys.argv[1])
print(rss() - base, base)
"""


def _child(code: str, *argv: str) -> str:
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"memory child failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def memory_report(target: Path, threads: int, tokens: int) -> dict:
    """Peak RSS of fresh processes running a native session on each GGUF of ``target``."""
    folder = target if target.is_dir() else None
    files = sorted(target.glob("model.*.gguf")) if folder else [target]
    if not files:
        raise SystemExit(f"no model.*.gguf in {target}")
    mb = 2**20
    rep: dict = {"threads": threads, "tokens": tokens, "target": 1.5, "files": {}}
    for f in files:
        m = json.loads(_child(_MEM_CHILD, str(f), str(threads), str(tokens), "engine"))
        gguf, kv = f.stat().st_size, m["memory"]["kv_cache"]
        budget = gguf + kv
        e = {
            "gguf_mb": round(gguf / mb, 1), "kv_cache_mb": round(kv / mb, 1),
            "weights_copied_mb": round(m["memory"]["weights_copied"] / mb, 1),
            "weights_mapped_mb": round(m["memory"]["weights_mapped"] / mb, 2),
            "interpreter_mb": round(m["interpreter"] / mb, 1),
            "after_imports_mb": round(m["after_imports"] / mb, 1),
            "after_load_mb": round(m["after_load"] / mb, 1), "load_peak_mb": round(m["load_peak"] / mb, 1),
            "peak_mb": round(m["peak"] / mb, 1), "ru_maxrss_mb": round(m["ru_maxrss"] / mb, 1),
            "ratio_process": round(m["peak"] / budget, 3),
            "ratio_engine": round((m["peak"] - m["after_imports"]) / budget, 3),
            "torch_imported": m["torch_imported"], "gguf_py_imported": m["gguf_imported"],
        }
        e["meets_target_process"] = e["ratio_process"] <= 1.5
        e["meets_target_engine"] = e["ratio_engine"] <= 1.5
        if folder is not None:
            c = json.loads(_child(_MEM_CHILD, str(f), str(threads), str(tokens), "cli"))
            e["as_sparsedge_run"] = {
                "tokenizer_load_mb": round((c["after_tokenizer"] - c["after_imports"]) / mb, 1),
                "peak_mb": round(c["peak"] / mb, 1), "ratio_process": round(c["peak"] / budget, 3),
                "torch_imported": c["torch_imported"], "transformers_imported": c["transformers_imported"],
            }
        rep["files"][f.name] = e
    imports = {}
    for mod in ("numpy", "sparsedge.runtimes.native", "onnxruntime", "tokenizers", "transformers", "torch"):
        try:
            delta, base = _child(_IMPORT_CHILD, mod).split()
            imports[mod] = round(int(delta) / mb, 1)
            rep["interpreter_mb"] = round(int(base) / mb, 1)
        except Exception:  # not installed here
            imports[mod] = None
    rep["import_rss_mb"] = imports
    return rep


def print_memory(rep: dict) -> None:
    print(f"peak RSS of a native session, {rep['tokens']}-token greedy decode, {rep['threads']} threads "
          f"(MiB; target peak <= {rep['target']} x (GGUF + KV cache))")
    for name, e in rep["files"].items():
        budget = e["gguf_mb"] + e["kv_cache_mb"]
        print(f"{name}: GGUF {e['gguf_mb']}  KV cache {e['kv_cache_mb']}  -> budget {rep['target']} x "
              f"{budget:.1f} = {rep['target'] * budget:.1f}")
        print(f"  weights in engine layout {e['weights_copied_mb']} (+{e['weights_mapped_mb']} mapped)   "
              f"RSS: interpreter {e['interpreter_mb']}, after imports {e['after_imports_mb']}, after load "
              f"{e['after_load_mb']} (load peak {e['load_peak_mb']})")
        print(f"  peak {e['peak_mb']} (ru_maxrss {e['ru_maxrss_mb']})   process: {e['ratio_process']:.2f}x "
              f"{'meets' if e['meets_target_process'] else 'MISSES'}   engine (peak - after imports "
              f"{e['peak_mb'] - e['after_imports_mb']:.1f}): {e['ratio_engine']:.2f}x "
              f"{'meets' if e['meets_target_engine'] else 'MISSES'}   torch imported: {e['torch_imported']}")
        if "as_sparsedge_run" in e:
            c = e["as_sparsedge_run"]
            print(f"  as `sparsedge run` (tokenizer via sources.load, +{c['tokenizer_load_mb']}): peak "
                  f"{c['peak_mb']} = {c['ratio_process']:.2f}x   torch imported: {c['torch_imported']}")
    imp = ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in rep["import_rss_mb"].items())
    print(f"RSS of importing, each alone over a bare interpreter ({rep.get('interpreter_mb')}): {imp}")


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
    ap.add_argument("--skip", default="always,never", help="how each recipe runs (comma list of the native "
                    "runtime's skip modes: always = skipping kernels, never = dense kernels on thresholded inputs, auto)")
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
    ap.add_argument("--memory", action="store_true",
                    help="measure peak RSS per GGUF (a file or an artifact folder) instead of speed")
    args = ap.parse_args(argv)
    if args.memory:
        rep = memory_report(args.gguf, args.threads, args.tokens)
        print(json.dumps(rep)) if args.json else print_memory(rep)
        return 0

    from sparsedge.runtimes.native import NativeRuntime, level

    ks = [int(k) for k in args.ks.split(",")]
    tok = tokenizer_for(args)
    prompt = list(tok(PROMPT, add_special_tokens=False)["input_ids"]) if tok else list(range(1, 21))

    runtimes: list[tuple[str, object]] = [("native dense", NativeRuntime(args.gguf, threads=args.threads, recipe=False))]
    from sparsedge.runtimes.native.loader import SKIP_MODES

    skips = [m.strip() for m in args.skip.split(",") if m.strip()]
    if not skips or set(skips) - set(SKIP_MODES):
        print(f"native_bench: --skip takes a comma list of {', '.join(SKIP_MODES)}, got {args.skip!r}", file=sys.stderr)
        return 2
    for r in args.recipe:
        for skip in skips:
            rt = NativeRuntime(args.gguf, threads=args.threads, recipe=None if r == "file" else r, stats=True,
                               skip=skip)
            runtimes.append((f"native {rt.recipe.method if rt.recipe else 'dense'} {Path(r).stem} skip={skip}", rt))
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
