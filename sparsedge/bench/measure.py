"""Measuring one runtime × variant (dense or a recipe) on the prompt suite: every decoding
configuration, repeated, with peak memory per configuration, then perplexity.

Runs in a fresh process per runtime × variant (worker.py) so that the memory figures are those of
that runtime alone; ``measure_job`` is the whole job, ``run_suite`` / ``warm_drafter`` are the
pieces benchmarks/spec_bench.py shares.

Timing protocol (what makes the figures reproduce on a shared machine):
- a warm-up generation pages the weights in and, for speculative decodes, measures the runtime's
  cost curve t(k)/t(1) once (cached per runtime), outside every timed run;
- every repeat runs all decoding configurations in turn on each prompt (interleaved prompt by
  prompt), so a burst of other work hits all of them alike; the report gives medians over repeats
  taken prompt by prompt (``summarize``), and each repeat's min / max; a configuration's peak
  memory is the highest RSS while it ran, which includes the drafters of the repeat's other
  configurations (alive for the whole repeat: a few MB);
- no stop tokens: every prompt decodes exactly ``max_new_tokens``, so runs compare like for like;
- a speculative configuration gets a fresh drafter per repeat (warm across the prompts of one
  repeat, as in a server): a drafter kept across repeats would find the previous repeat's outputs
  in its n-gram cache and accept far more than on new text.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import SparsedgeError

MODES = ("greedy", "spec", "tree")
COST_KS = tuple(range(1, 17))  # the target's t(k)/t(1) in the report: every k one verification carries

# How peak memory is measured (recorded in every report).
MEMORY_METHOD = (
    "peak resident set size (VmHWM of /proc/self/status) of a fresh process that loads only this "
    "runtime and variant; the peak is reset (write 5 to /proc/self/clear_refs) before each "
    "configuration's runs, so each figure is the highest RSS while that configuration ran, with "
    "the weights resident; load = the peak while opening the runtime and warming up"
)
MEMORY_METHOD_FALLBACK = "lifetime peak RSS of the process (ru_maxrss): the peak cannot be reset here"
MEMORY_METHOD_INPROCESS = ("peak RSS (VmHWM, reset before each configuration) of the bench process itself "
                           "(isolate=False): memory of runtimes measured before is included")


# ------------------------------------------------------------------------------ memory


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0). False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak RSS in MiB since the last ``reset_peak`` (or since it started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ------------------------------------------------------------------------------ decoding configurations


@dataclass(frozen=True)
class Decode:
    """One decoding configuration: ``greedy``, ``spec:DRAFTER`` (a drafted chain per step) or
    ``tree:DRAFTER[,DRAFTER...]`` (a draft tree per step; drafters as in ``sparsedge run``)."""

    mode: str
    drafter: str | None = None

    @classmethod
    def parse(cls, s: str) -> "Decode":
        mode, _, drafter = s.strip().partition(":")
        if mode not in MODES:
            raise SparsedgeError(f"unknown decoding {s!r}: expected greedy, spec:DRAFTER or tree:DRAFTER "
                                 "(e.g. spec:ngram, tree:ngram,recycle)")
        if mode == "greedy" and drafter:
            raise SparsedgeError(f"greedy decoding takes no drafter (got {s!r})")
        if mode != "greedy" and not drafter:
            raise SparsedgeError(f"{mode} decoding needs a drafter, e.g. {mode}:ngram (got {s!r})")
        if drafter:
            from ..runtimes.decoding.drafters import names

            known = names()
            for part in drafter.split(","):
                if part.partition(":")[0].strip() not in known:
                    raise SparsedgeError(f"unknown drafter {part!r} in {s!r} (known: {', '.join(known)})")
        return cls(mode, drafter or None)

    @property
    def label(self) -> str:
        return self.mode if self.drafter is None else f"{self.mode}:{self.drafter}"


# ------------------------------------------------------------------------------ one pass over the suite


@dataclass
class SuiteRun:
    """One pass over the prompts with one decoding function; times summed over prompts."""

    outputs: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_s: float = 0.0  # prompt forwards + first token, summed (each prompt's time to first token)
    decoded: int = 0  # tokens after each prompt's first (the ones decode_s times)
    decode_s: float = 0.0
    steps: int = 0  # speculative only: verification forwards, draft nodes verified / accepted
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_forwards: int = 0  # forwards of a drafter that runs a model (the draft model's own steps)
    # per prompt, in prompt order: what summarize() takes medians of, prompt by prompt
    each_prefill_s: list[float] = field(default_factory=list)
    each_decode_s: list[float] = field(default_factory=list)
    each_decoded: list[int] = field(default_factory=list)
    each_prompt_tokens: list[int] = field(default_factory=list)

    def add(self, st, toks: Sequence[int]) -> None:
        """One prompt's generation (stats: GenerationStats / SpecStats, and its tokens)."""
        self.outputs.append(list(toks))
        self.prompt_tokens += st.prompt_tokens
        self.prefill_s += st.prefill_s
        self.decoded += max(st.new_tokens - 1, 0)
        self.decode_s += st.decode_s
        for k in ("steps", "drafted", "accepted", "draft_s", "verify_s", "draft_forwards"):
            setattr(self, k, getattr(self, k) + getattr(st, k, 0))
        self.each_prefill_s.append(st.prefill_s)
        self.each_decode_s.append(st.decode_s)
        self.each_decoded.append(max(st.new_tokens - 1, 0))
        self.each_prompt_tokens.append(st.prompt_tokens)

    def figures(self) -> dict:
        n = max(len(self.outputs), 1)
        out = {"prefill_tok_s": self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0,
               "decode_tok_s": self.decoded / self.decode_s if self.decode_s else 0.0,
               "ttft_ms": 1e3 * self.prefill_s / n}
        if self.steps:
            out.update(steps=self.steps, drafted=self.drafted, accepted=self.accepted,
                       mean_accepted=(self.accepted + self.steps) / self.steps,
                       acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
                       nodes_per_step=self.drafted / self.steps, draft_s=self.draft_s, verify_s=self.verify_s,
                       draft_forwards=self.draft_forwards,
                       # where a step's time goes: drafting (the draft model's forwards included)
                       # against the target's verification forward
                       draft_share=self.draft_s / (self.draft_s + self.verify_s) if self.draft_s + self.verify_s else 0.0,
                       draft_ms_step=1e3 * self.draft_s / self.steps, verify_ms_step=1e3 * self.verify_s / self.steps)
        out.update(each_prefill_s=self.each_prefill_s, each_decode_s=self.each_decode_s,
                   each_decoded=self.each_decoded, each_prompt_tokens=self.each_prompt_tokens)
        return out


def run_suite(prompts: Sequence[Sequence[int]], gen: Callable) -> SuiteRun:
    """``gen(prompt) -> (stats, tokens)`` over every prompt (stats: GenerationStats / SpecStats)."""
    run = SuiteRun()
    for p in prompts:
        run.add(*gen(p))
    return run


def warm_drafter(drafter, runtime, ids: Sequence[int]) -> None:
    """Seed a drafter's warm state from corpus tokens (not the prompts): recycle's matrix from one
    teacher-forced pass of the target, the n-gram cache from the text itself."""
    from ..runtimes.decoding.drafters import Combined
    from ..runtimes.decoding.drafters.ngram import NgramDrafter
    from ..runtimes.decoding.drafters.recycle import RecycleDrafter

    for d in (drafter.drafters if isinstance(drafter, Combined) else [drafter]):
        if isinstance(d, RecycleDrafter):
            d.seed(runtime, ids)
        elif isinstance(d, NgramDrafter):
            d.add_corpus(ids)


def warm_ids(tokenizer, n: int) -> list[int] | None:
    """The first n tokens of the calibration corpus (disjoint from the evaluation text)."""
    from .. import data

    return data.tokenize(tokenizer, data.calibration_text()[: n * 8])[:n].tolist() if n else None


def merge_rounds(rounds: list[dict]) -> dict:
    """One job's result from several rounds (each a measure_job result): repeats pooled, medians
    and min-max over all of them, peaks the highest, lossless only if every round was."""
    first = dict(rounds[0])
    first["decodes"] = []
    for j, d in enumerate(rounds[0]["decodes"]):
        entries = [r["decodes"][j] for r in rounds]
        reps = [x for e in entries for x in e["repeats"]]
        first["decodes"].append({**d, "repeats": reps, **summarize(reps),
                                 "peak_rss_mb": max(e["peak_rss_mb"] for e in entries),
                                 "identical": all(e["identical"] for e in entries),
                                 "identical_prompts": min(e["identical_prompts"] for e in entries)})
    first["load_peak_rss_mb"] = max(r["load_peak_rss_mb"] for r in rounds)
    first["host_gbps"] = [r["host_gbps"] for r in rounds if r.get("host_gbps") is not None]  # one per round
    first["rounds"] = len(rounds)
    return first


def summarize(reps: list[dict]) -> dict:
    """Median of each figure over repeats, and the min / max of decode tok/s (per repeat).

    Speeds and TTFT are medians prompt by prompt: decode tok/s = all prompts' decoded tokens over
    the sum of each prompt's median decode time (likewise prefill). Other work on a shared
    machine comes in bursts; one shorter than a pass over the suite slows one prompt of one
    repeat, which a per-prompt median drops, where it moved that whole repeat's figure. A slower
    period of the whole host, minutes long, still moves every figure of a run (measured on a
    shared 2-vCPU VM: llama.cpp -7.7%, ONNX Runtime -11% between two runs)."""
    keys = [k for k in reps[0] if isinstance(reps[0][k], (int, float))]
    med = {k: float(np.median([r[k] for r in reps])) for k in keys}
    tps = [r["decode_tok_s"] for r in reps]
    med["decode_tok_s_min"], med["decode_tok_s_max"] = min(tps), max(tps)
    if all(r.get("each_decode_s") for r in reps):
        dec = np.median([r["each_decode_s"] for r in reps], axis=0)  # [prompts]
        pre = np.median([r["each_prefill_s"] for r in reps], axis=0)
        n_dec, n_pre = sum(reps[0]["each_decoded"]), sum(reps[0]["each_prompt_tokens"])
        med["decode_tok_s"] = n_dec / float(dec.sum()) if dec.sum() else 0.0
        med["prefill_tok_s"] = n_pre / float(pre.sum()) if pre.sum() else 0.0
        med["ttft_ms"] = 1e3 * float(pre.mean())
    return med


# ------------------------------------------------------------------------------ the job


def _ppl(rt, tokenizer, ppl: dict) -> dict:
    from ..data import PplProtocol, perplexity

    r = perplexity(rt, tokenizer=tokenizer, protocol=PplProtocol(window=ppl["window"], max_tokens=ppl["max_tokens"]),
                   progress=False)
    return {"ppl": r.ppl, "eval_tokens": r.eval_tokens, "corpus": r.corpus, "corpus_hash": r.corpus_hash,
            "protocol": r.protocol, "argmax": r.argmax.tolist()}


def _open(job: dict, loaded):
    """(runtime, Target opts) for a job; GenAI peers get their own adapter."""
    if job["runtime"] == "genai":
        from .genai import GenAIRuntime

        return GenAIRuntime(job["genai_dir"], threads=job["threads"]), {}
    from ..runtimes import open_runtime

    opts = {"threads": job["threads"], **({"quant": job["quant"]} if job.get("quant") else {})}
    return open_runtime(loaded, job["runtime"], **opts, **job.get("open_opts", {})), opts


def measure_job(job: dict, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Measure one runtime × variant. ``job``: model (artifact folder or model argument), runtime,
    quant, threads, prompts (token ids), max_new_tokens, repeats, warmup_tokens, decodes (labels),
    budget, warm (corpus tokens seeding drafters), ppl ({window, max_tokens} or None).
    Returns per decode: per-repeat figures, medians, acceptance, lossless check, peak memory."""
    from ..runtimes.decoding import (CostCurve, GenerationConfig, GenerationStats, SpecConfig, SpecStats, Target,
                                     generate, make_drafter, speculative_generate)

    from ..sources import load

    loaded = load(job["model"], progress=False)
    # the process before any weights: interpreter, libraries, tokenizer (runtime memory = peak - base)
    can_reset = reset_peak()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    rt, opts = _open(job, loaded)
    load_s = time.perf_counter() - t0
    prompts = job["prompts"]
    cfg = GenerationConfig(max_new_tokens=job["max_new_tokens"])
    decodes = [Decode.parse(d) for d in job["decodes"]]
    target = Target(rt, loaded, job["runtime"], opts)
    seed_ids = warm_ids(loaded.tokenizer, job.get("warm", 0))
    # a cost curve measured by an earlier round of this job (bench reruns each job per round): trees
    # are then sized alike in every round, not from each round's own load-dependent measurement
    fixed = {d: CostCurve([int(k) for k in c], list(c.values()))
             for d in decodes if d.drafter and (c := job.get("cost_curves", {}).get(d.label))}
    spec_cfg = {d: SpecConfig(mode=d.mode, budget=job["budget"], cost=fixed.get(d)) for d in decodes if d.drafter}

    def drafter_for(d: Decode):
        dr = make_drafter(d.drafter, target)
        if seed_ids:
            warm_drafter(dr, rt, seed_ids)
        return dr

    def gen_fn(d: Decode, dr):
        if d.drafter is None:
            if hasattr(rt, "generate"):  # a peer with its own decoding loop (GenAI)
                return lambda p: rt.generate(p, cfg)

            def plain(p):
                st = GenerationStats()
                return st, list(generate(rt, p, cfg, st))
            return plain

        def spec(p):
            st = SpecStats()
            toks = list(speculative_generate(rt, p, cfg, dr, spec_cfg[d], st))
            mode[d], curve[d] = st.mode, st.cost
            return st, toks
        return spec

    # warm-up: page the weights in, let the runtime's buffers grow to a measured generation's
    # length (ONNX Runtime and GenAI allocate as the cache grows: a first prompt measured after a
    # short warm-up came out slow in every round), measure the cost curve of speculative decoding
    warm_cfg = GenerationConfig(max_new_tokens=job["warmup_tokens"])
    full_cfg = GenerationConfig(max_new_tokens=max(job["warmup_tokens"], job["max_new_tokens"]))
    for _ in range(2):
        if hasattr(rt, "generate"):
            rt.generate(prompts[0], full_cfg)
        else:
            list(generate(rt, prompts[0], full_cfg))
    # the target's cost curve t(k)/t(1), k = 1..16, on the first prompt's cache (what a reader
    # needs to see where a speculative step's time goes; speculative decodes without a fixed
    # curve size their trees from this same measurement, cached per runtime)
    target_cost = None
    if not hasattr(rt, "generate"):
        from ..runtimes.decoding.generate import prefill
        from ..runtimes.decoding.speculative import measure_cost

        rt.reset()
        prefill(rt, np.asarray(prompts[0], dtype=np.int64))
        tc, t1 = measure_cost(rt, prompts[0], ks=COST_KS)
        target_cost = {"t1_ms": 1e3 * t1, "curve": tc.as_dict()}
    mode: dict[Decode, str] = {}
    curve: dict[Decode, dict] = {}
    for d in decodes:
        if d.drafter:
            dr = drafter_for(d)
            list(speculative_generate(rt, prompts[0], warm_cfg, dr, spec_cfg[d]))
            dr.close()
    load_peak = peak_rss_mb()
    progress(1)

    reps: dict[Decode, list[dict]] = {d: [] for d in decodes}
    outs: dict[Decode, list[list[list[int]]]] = {d: [] for d in decodes}
    peaks: dict[Decode, float] = {d: 0.0 for d in decodes}
    for _ in range(job["repeats"]):
        # prompt by prompt, every configuration in turn: a burst of other work then falls on
        # all configurations of this prompt alike, and summarize() takes medians per prompt
        drafters = {d: drafter_for(d) for d in decodes if d.drafter}
        gens = {d: gen_fn(d, drafters.get(d)) for d in decodes}
        runs = {d: SuiteRun() for d in decodes}
        for p in prompts:
            for d in decodes:
                reset_peak()
                runs[d].add(*gens[d](p))
                peaks[d] = max(peaks[d], peak_rss_mb())
        for d in decodes:
            if d in drafters:
                drafters[d].close()
            reps[d].append(runs[d].figures())
            outs[d].append(runs[d].outputs)
            progress(1)

    greedy = next((d for d in decodes if d.drafter is None), None)
    ref = outs[greedy][0] if greedy else None
    results = []
    for d in decodes:
        same = [a == b for a, b in zip(outs[d][0], ref)] if ref is not None else []
        entry = {"decode": d.label, "mode": mode.get(d, d.mode), "drafter": d.drafter,
                 "repeats": reps[d], **summarize(reps[d]), "peak_rss_mb": peaks[d],
                 # lossless: every repeat's output of every prompt equals greedy's first run
                 "identical": ref is not None and all(o == ref for o in outs[d]),
                 "identical_prompts": sum(same), "prompts": len(prompts),
                 "first_tokens": outs[d][0][0][:16]}
        if d.drafter:
            entry["cost_curve"] = curve.get(d)  # t(k)/t(1) the trees were sized from
        results.append(entry)

    ppl = None
    if job.get("ppl"):
        reset_peak()
        ppl = _ppl(rt, loaded.tokenizer, job["ppl"])
        ppl["peak_rss_mb"] = peak_rss_mb()
        progress(1)
    getattr(rt, "close", lambda: None)()
    return {"label": job["label"], "runtime": job["runtime"], "variant": job["variant"],
            "quant": job.get("quant_label") or job.get("quant"), "target_cost": target_cost,
            "runtime_file": str(getattr(rt, "path", "") or job.get("genai_dir", "")),
            "exact_trees": getattr(rt, "exact_trees", True), "threads": job["threads"], "load_s": load_s,
            "load_peak_rss_mb": load_peak, "base_rss_mb": base,
            "memory_method": (MEMORY_METHOD_FALLBACK if not can_reset else
                              MEMORY_METHOD if job.get("isolated", True) else MEMORY_METHOD_INPROCESS),
            "decodes": results, "ppl": ppl, "pid": os.getpid()}


def job_units(job: dict) -> int:
    """Progress steps a job reports: warm-up, one per decode per repeat, perplexity."""
    return 1 + len(job["decodes"]) * job["repeats"] + (1 if job.get("ppl") else 0)
