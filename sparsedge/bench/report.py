"""The bench report: per-job results -> one table of configurations with derived figures
(speedups, perplexity cost, top-1 agreement), written as report.json, report.md and PNG plots.

A configuration is runtime × variant (dense or a recipe) × decoding. Derived figures:
- speedup: decode tok/s over the same runtime's dense greedy; vs_llamacpp: over llama.cpp's;
- ppl_vs_dense: perplexity over the same runtime's dense perplexity (the cost of a recipe);
- top1_vs_dense: fraction of evaluation positions whose argmax equals the same runtime's dense
  model's (as `sparsedge eval --recipe`); top1_vs_reference: equals the fp32 torch reference's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

FILES = {"json": "report.json", "md": "report.md", "tokens": "tokens_per_s.png",
         "speedup": "speedup_vs_ppl.png", "acceptance": "acceptance.png"}
_DECODE_KEYS = ("decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "prefill_tok_s", "ttft_ms", "peak_rss_mb",
                "identical", "identical_prompts", "prompts", "mean_accepted", "acceptance_rate", "nodes_per_step",
                "steps", "cost_curve", "draft_s", "verify_s", "draft_forwards", "draft_share", "draft_ms_step",
                "verify_ms_step")


def _agree(a, b) -> float | None:
    if a is None or b is None or len(a) != len(b):
        return None
    return float((np.asarray(a) == np.asarray(b)).mean())


def assemble(model: str, cfg, results: list[dict], plan, notes: list[str], prompt_ids: list[str],
             prompt_lengths: list[int], elapsed_s: float, host_probe: dict | None = None) -> dict:
    from .. import __version__
    from .host import host, versions

    ok = [r for r in results if "error" not in r]
    errors = [{"job": r["label"], "error": r["error"]} for r in results if "error" in r]
    ref = next((r for r in ok if r["runtime"] == "torch" and r["variant"] == "reference"), None)
    ref_ppl = ref["ppl"] if ref else None
    # a job is runtime × variant × quant (the GGUF / ONNX type it ran, or file:TYPE for the
    # model's own GGUF); a variant compares to the dense model of the same runtime and type
    jobs = {(r["runtime"], r["variant"], r.get("quant")): r for r in ok if r is not ref}
    dense_argmax = {(rt, q): (j["ppl"] or {}).get("argmax") for (rt, v, q), j in jobs.items() if v == "dense"}
    dense_ppl = {(rt, q): (j["ppl"] or {}).get("ppl") for (rt, v, q), j in jobs.items() if v == "dense"}

    runs, configs = [], []
    for (rt, var, quant), j in jobs.items():
        q = j["ppl"] or {}
        gbps = j.get("host_gbps") or []  # the host's memory bandwidth around each round's process
        host_gbps = float(np.median(gbps)) if gbps else None
        dppl = dense_ppl.get((rt, quant))
        quality = {"ppl": q.get("ppl"),
                   "ppl_vs_dense": q["ppl"] / dppl if q.get("ppl") and dppl else None,
                   "ppl_vs_reference": q["ppl"] / ref_ppl["ppl"] if q.get("ppl") and ref_ppl else None,
                   "top1_vs_dense": _agree(q.get("argmax"), dense_argmax.get((rt, quant))),
                   "top1_vs_reference": _agree(q.get("argmax"), ref_ppl and ref_ppl["argmax"])}
        runs.append({"runtime": rt, "variant": var, "quant": quant, "file": j["runtime_file"], "load_s": j["load_s"],
                     "load_peak_rss_mb": j["load_peak_rss_mb"], "base_rss_mb": j["base_rss_mb"], "exact_trees": j["exact_trees"],
                     "eval_tokens": q.get("eval_tokens"), "ppl_peak_rss_mb": q.get("peak_rss_mb"),
                     "target_cost": j.get("target_cost"),
                     "host_gbps": host_gbps, "host_gbps_rounds": gbps, **quality})
        t1 = (j.get("target_cost") or {}).get("t1_ms")
        for d in j["decodes"]:
            fw = d.get("draft_forwards")
            configs.append({"runtime": rt, "variant": var, "quant": quant, "decode": d["decode"], "mode": d["mode"],
                            "drafter": d["drafter"], **{k: d.get(k) for k in _DECODE_KEYS}, **quality,
                            # one draft forward in units of the target's t(1): what the verifier
                            # prices a sequentially drafted token at (with t(k)/t(1))
                            "draft_forward_vs_t1": (1e3 * d["draft_s"] / fw / t1) if fw and t1 else None,
                            "repeats": [r["decode_tok_s"] for r in d["repeats"]], "host_gbps": host_gbps})
    base = {(c["runtime"], c["variant"], c["quant"]): c["decode_tok_s"] for c in configs if c["decode"] == "greedy"}
    main_q = cfg.gguf_quants[0]
    own = next((k for k in base if k[0] == "llamacpp" and str(k[2]).startswith("file:")), None)
    for c in configs:
        dense = base.get((c["runtime"], "dense", c["quant"]))
        # llama.cpp on the same type when it ran it, else on the main GGUF type
        llama = base.get(("llamacpp", "dense", c["quant"])) or base.get(("llamacpp", "dense", main_q))
        c["speedup"] = c["decode_tok_s"] / dense if dense else None
        c["vs_llamacpp"] = c["decode_tok_s"] / llama if llama else None
        c["vs_llamacpp_file"] = c["decode_tok_s"] / base[own] if own else None
    memory = sorted({j["memory_method"] for j in ok})
    return {
        "format": 1, "sparsedge_version": __version__, "model": model,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "elapsed_s": round(elapsed_s, 1),
        "host": host(), "host_probe": host_probe, "versions": versions(),
        "settings": {**cfg.to_dict(), "prompt_ids": prompt_ids, "prompt_tokens": prompt_lengths,
                     "threads_used": next((j.get("threads") for j in ok), cfg.threads)},
        "memory_method": memory[0] if len(memory) == 1 else memory,
        "artifacts": plan.artifacts,
        "reference": None if ref_ppl is None else {k: v for k, v in ref_ppl.items() if k != "argmax"},
        "runs": runs, "configs": configs, "notes": notes + plan.notes, "errors": errors,
        "files": dict(FILES),
    }


def write(report: dict, out: Path) -> None:
    from .plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    plot_all(report, out)
    (out / FILES["json"]).write_text(json.dumps(report, indent=1))
    (out / FILES["md"]).write_text(markdown(report))


def _host_state(p: dict | None) -> list[str]:
    """The markdown lines on the host's state during the run (host.BandwidthProbe), if measured."""
    if not p or not p.get("probes"):
        return []
    steal = p.get("cpu_steal")
    return [f"Host state during the run: memory bandwidth {p['gbps_median']:.1f} GB/s (median of {p['probes']} "
            f"probes between jobs, {p['gbps_min']:.1f}-{p['gbps_max']:.1f})"
            + ("" if steal is None else f", CPU steal {100 * steal:.1f}%")
            + ". Other work on the host lowers both this and every speed figure: compare runs whose "
              "bandwidth agrees.", ""]


def _f(x, fmt: str = "{:.1f}", none: str = "n/a") -> str:
    return none if x is None else fmt.format(x)


def _llamacpp_line(h: dict) -> str:
    """The host line's note on the llama.cpp peer's kernels (its system-info line)."""
    info = h.get("llamacpp_system_info")
    if not info:
        return ""
    from ..runtimes.llamacpp import compiled_features

    feats = compiled_features(info)
    return f" llama.cpp kernels: {', '.join(feats) if feats else info} (its system info)."


def markdown(r: dict) -> str:
    s, h = r["settings"], r["host"]
    lines = [f"# sparsedge bench: {r['model']}", "",
             f"{r['created']}, {r['elapsed_s']:.0f} s. Host: {h['cpu']} ({h['machine']}), "
             f"{h['usable_cores']} usable cores, "
             f"features {', '.join(h['features']) or 'none'}, native kernels {h['runtimes'].get('native', 'n/a')}, "
             f"load average at the end {', '.join(map(str, h.get('load_avg', [])))}."
             + _llamacpp_line(h),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".", "",
             *_host_state(r.get("host_probe")),
             f"Settings: {len(s['prompt_ids'])} prompts of the suite ({', '.join(s['prompt_ids'])}; "
             f"{min(s['prompt_tokens'], default=0)}-{max(s['prompt_tokens'], default=0)} prompt tokens), "
             f"{s['max_new_tokens']} new tokens each (no stop tokens), {s['repeats']} repeats (medians per prompt over "
             f"repeats; min-max of the repeats' figures in brackets), warm-up 2 generations of {max(s['warmup_tokens'], s['max_new_tokens'])} tokens (drafters {s['warmup_tokens']}), threads {s['threads_used']}, GGUF {s['gguf_quant']}, "
             f"ONNX {s['onnx_quant']}, draft budget {s['budget']}, drafters warmed on {s['warm']} corpus tokens; "
             f"perplexity over {s['ppl_tokens']} held-out tokens in windows of {s['ppl_window']}.", ""]
    ref = r.get("reference")
    if ref:
        lines += [f"Reference: the dense model on the torch runtime (fp32), perplexity {ref['ppl']:.4f} over "
                  f"{ref['eval_tokens']} tokens of {ref['corpus']} (hash {ref['corpus_hash']}).", ""]
    own = any(c.get("vs_llamacpp_file") is not None for c in r["configs"])  # llama.cpp ran the model's own file
    lines += ["## Speed", "",
              "Decode tok/s: tokens after the first over the time after the first; prefill tok/s: prompt tokens "
              "over the time to the first token (TTFT, per prompt). Type: the GGUF / ONNX type run (file:TYPE: "
              "the model's own GGUF as it came). Speedup: over the same runtime's dense greedy on that type; "
              "× llama.cpp: over llama.cpp's dense greedy on the same type (else on the first GGUF type)"
              + ("; × llama.cpp file: over llama.cpp greedy on the model's own file" if own else "")
              + ". Identical: every speculative output equals greedy's on that runtime, token for token (lossless).",
              "",
              "| runtime | variant | type | decoding | decode tok/s | speedup | × llama.cpp | "
              + ("× llama.cpp file | " if own else "") + "prefill tok/s | TTFT ms | peak MB | tokens/step | "
              "acceptance | identical |",
              "|---|---|---|---|---|---|---|" + ("---|" if own else "") + "---|---|---|---|---|---|"]
    for c in r["configs"]:
        same = "-" if not c["drafter"] else "yes" if c["identical"] else f"NO ({c['identical_prompts']}/{c['prompts']})"
        mode = c["decode"] + (" (chains)" if c["drafter"] and c["mode"] != c["decode"].split(":")[0] else "")
        lines.append(
            f"| {c['runtime']} | {c['variant']} | {c.get('quant') or '-'} | {mode} | {c['decode_tok_s']:.1f} "
            f"[{c['decode_tok_s_min']:.1f}-{c['decode_tok_s_max']:.1f}] | {_f(c['speedup'], '{:.2f}')} | "
            f"{_f(c['vs_llamacpp'], '{:.2f}')} | " + (f"{_f(c.get('vs_llamacpp_file'), '{:.2f}')} | " if own else "")
            + f"{c['prefill_tok_s']:.0f} | {c['ttft_ms']:.1f} | {c['peak_rss_mb']:.0f} | "
            f"{_f(c['mean_accepted'], '{:.2f}', '1.00')} | {_f(c['acceptance_rate'], '{:.2f}', '-')} | "
            f"{same} |")
    lines += ["", "## Quality", "",
              "Perplexity: the protocol of `sparsedge eval` on the held-out pydoc span. Top-1 vs dense: the fraction "
              "of positions whose argmax equals the same runtime's dense model's; vs reference: the fp32 torch "
              "model's. n/a: not measured on that runtime.", "",
              "| runtime | variant | type | ppl | ppl / dense | ppl / reference | top-1 vs dense | top-1 vs reference | "
              "load s | load peak MB | base MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in r["runs"]:
        lines.append(f"| {u['runtime']} | {u['variant']} | {u.get('quant') or '-'} | {_f(u['ppl'], '{:.3f}')} | {_f(u['ppl_vs_dense'], '{:.3f}')} | "
                     f"{_f(u['ppl_vs_reference'], '{:.3f}')} | {_f(u['top1_vs_dense'], '{:.3f}')} | "
                     f"{_f(u['top1_vs_reference'], '{:.3f}')} | {u['load_s']:.2f} | {u['load_peak_rss_mb']:.0f} | "
                     f"{u['base_rss_mb']:.0f} |")
    spec = [c for c in r["configs"] if c["drafter"]]
    if spec:
        lines += ["", "## Speculative decoding", "",
                  "Tokens/step: tokens produced per verification forward (accepted drafts + the target's own); "
                  "acceptance: accepted / verified draft nodes. Where a step's time goes: draft ms (proposing, "
                  "the draft model's forwards included, and learning from the verification) and verify ms (the "
                  "target's forward, acceptance, cache keep) per step, and the draft's share of the two; draft "
                  "fwd / t(1): one draft-model forward in units of the target's one-token forward, which with the "
                  "target's t(k)/t(1) prices every node the verifier takes. Runtimes whose tree rows are not "
                  "bit-exact verify chains.", "",
                  "| runtime | variant | type | decoding | mode | steps | nodes/step | tokens/step | acceptance | "
                  "draft ms/step | verify ms/step | draft share | draft fwd / t(1) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in spec:
            lines.append(f"| {c['runtime']} | {c['variant']} | {c.get('quant') or '-'} | {c['decode']} | {c['mode']} | "
                         f"{c['steps']:.0f} | {c['nodes_per_step']:.2f} | {c['mean_accepted']:.2f} | "
                         f"{c['acceptance_rate']:.2f} | {_f(c.get('draft_ms_step'))} | {_f(c.get('verify_ms_step'))} | "
                         f"{_f(c.get('draft_share'), '{:.0%}')} | {_f(c.get('draft_forward_vs_t1'), '{:.2f}', '-')} |")
    costs = [u for u in r["runs"] if u.get("target_cost")]
    if costs:
        ks = sorted({int(k) for u in costs for k in u["target_cost"]["curve"]})
        lines += ["", "## Target cost curves", "",
                  "t(k)/t(1): one forward of k tokens on top of the first prompt's cache, over one token's "
                  "(medians of 3); t(1) in ms. A verification of k-1 draft nodes costs t(k): the trees and "
                  "chains are sized from this curve.", "",
                  "| runtime | variant | type | t(1) ms | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|---|---|" + "---|" * len(ks)]
        for u in costs:
            cv = {int(k): v for k, v in u["target_cost"]["curve"].items()}
            lines.append(f"| {u['runtime']} | {u['variant']} | {u.get('quant') or '-'} | {u['target_cost']['t1_ms']:.1f} | "
                         + " | ".join(_f(cv.get(k), '{:.2f}') for k in ks) + " |")
    lines += ["", "## Plots", "", f"![decode tokens/s per configuration]({FILES['tokens']})", "",
              f"![speedup vs perplexity cost, one point per recipe]({FILES['speedup']})", "",
              f"![acceptance per drafter]({FILES['acceptance']})", "", "## Method", "",
              f"Peak memory: {r['memory_method']}. Base MB: the process's RSS before it opened the runtime "
              "(interpreter, libraries, tokenizer); the runtime's own share is the peak minus that.", ""]
    if r["artifacts"]:
        lines += ["Artifacts: " + "; ".join(f"{k}: `{v['path']}`" + (" (reused)" if v.get("reused") else "")
                                           for k, v in r["artifacts"].items()) + ".", ""]
    for n in r["notes"]:
        lines.append(f"- note: {n}")
    for e in r["errors"]:
        lines.append(f"- ERROR in {e['job']}: {e['error']}")
    return "\n".join(lines).rstrip() + "\n"
