"""bench: end-side speedup measurement and reports (DESIGN.md §1).

    from sparsedge.bench import BenchConfig, bench
    report = bench("smollm2-135m", "out/", BenchConfig.quick(recipes=("teal:0.5:ffn",)))

One run measures, for every runtime installed (native, llama.cpp, ONNX Runtime, and ONNX Runtime
GenAI's own int4 build as a peer), dense and per recipe, plain greedy and each speculative
configuration: prefill and decode tokens/s, time to first token, peak memory (medians over
repeats, which run in rounds over all jobs; measure.py gives the protocol), perplexity and top-1 agreement with the dense model,
acceptance statistics, and whether speculative output equals greedy's token for token. It writes
OUT/report.json, OUT/report.md and PNG plots (report.py, plots.py).

Given a model (not an artifact folder) it exports what the runtimes need into the work folder
(GGUF for native / llama.cpp, ONNX for ONNX Runtime, one sparse artifact per recipe, GenAI's build);
a rerun reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparsedgeError, crash_summary, describe_exit
from .host import BandwidthProbe
from .measure import Decode, job_units, measure_job, merge_rounds
from .prepare import RECIPE_RUNTIMES, RecipeSpec, Variant, select_runtimes

REPORT_FORMAT = 1


@dataclass
class BenchConfig:
    runtimes: tuple[str, ...] | None = None  # None: every installed one of prepare.DEFAULT_RUNTIMES
    recipes: tuple[str, ...] = ()  # recipe.json paths or METHOD:S[:SCOPE] (calibrated on the fly)
    scope: str = "all"  # sites of METHOD:S recipes without a scope (see `sparsedge calibrate --help`)
    decodes: tuple[str, ...] = ("greedy", "spec:ngram", "tree:ngram,recycle")  # greedy is always run
    prompts: int = 0  # first N prompts of the suite (0: all)
    max_new_tokens: int = 128  # per prompt, no stop tokens: every prompt decodes exactly this many
    repeats: int = 3  # figures are medians over repeats
    warmup_tokens: int = 16  # per drafter warm-up; the runtime itself warms up on 2 full-length generations
    ppl_tokens: int = 4096  # held-out tokens for perplexity / top-1 agreement (0: skip)
    ppl_window: int = 512
    reference: bool = True  # the dense model on the torch reference: the perplexity everything is compared to
    threads: int | None = None  # None: every usable core
    gguf_quant: str = "q4_0"  # comma list (e.g. "q4_0,q8_0"): the first runs every variant and decoding, the rest dense greedy
    onnx_quant: str = "int4"
    budget: int = 16  # most draft tokens per verification
    warm: int = 0  # seed n-gram / recycle drafters with N calibration-corpus tokens
    calib_tokens: int = 16384  # for METHOD:S recipes
    own_file: bool = True  # llama.cpp also runs the model's own GGUF (a built-in's registry file), greedy: the peer
    isolate: bool = True  # one process per runtime × variant (honest peak memory)
    work_dir: str | None = None  # artifacts, recipes, logs (default OUT/artifacts)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.max_new_tokens < 2 or self.prompts < 0 or self.warmup_tokens < 1:
            raise SparsedgeError("repeats >= 1, max_new_tokens >= 2, prompts >= 0 and warmup_tokens >= 1 are needed")
        if self.ppl_tokens and (self.ppl_window < 2 or self.ppl_tokens < self.ppl_window):
            raise SparsedgeError(f"perplexity needs ppl_tokens >= ppl_window >= 2 "
                                 f"(got {self.ppl_tokens}, {self.ppl_window})")
        if self.threads is not None and self.threads < 1:
            raise SparsedgeError("threads must be positive")
        for d in self.decodes:
            Decode.parse(d)
        from ..quantize.gguf import check_quant

        if not self.gguf_quants:
            raise SparsedgeError("gguf_quant names at least one GGUF type, e.g. q4_0 or q4_0,q8_0")
        for q in self.gguf_quants:
            check_quant(q)

    @property
    def gguf_quants(self) -> tuple[str, ...]:
        """The GGUF types run by native and llama.cpp; the first one is the main one."""
        return tuple(dict.fromkeys(q.strip().lower() for q in self.gguf_quant.split(",") if q.strip()))

    @classmethod
    def quick(cls, **over: Any) -> "BenchConfig":
        """A few minutes on smollm2-135m (for `make demo`): 4 prompts, 96 tokens, 5 rounds,
        perplexity over 1024 tokens, recipes calibrated on 4096 tokens. (3 prompts x 64 tokens x 3
        rounds, about 1 s of decoding per configuration and round, moved up to 10% on a rerun.)"""
        base = dict(prompts=4, max_new_tokens=96, repeats=5, ppl_tokens=1024, ppl_window=256, calib_tokens=4096)
        return cls(**{**base, **over})

    @classmethod
    def for_model(cls, model: str, **over: Any) -> "BenchConfig":
        """The defaults of a built-in's bench preset (sources.Builtin.bench: e.g. the Qwen pair's
        draft model, its quants), then the options given."""
        from ..sources import BUILTINS

        preset = BUILTINS[model].bench if model in BUILTINS else {}
        return cls(**{**preset, **over})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Plan:
    variants: list[Variant] = field(default_factory=list)
    genai_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    own_file: Path | None = None  # the GGUF the model came as, which llama.cpp runs as the peer


def _prepare(loaded, runtimes: list[str], recipes: list[RecipeSpec], cfg: BenchConfig, work: Path,
             progress: bool) -> _Plan:
    from .prepare import export_variant, get_recipe, recipe_summary, source_folder

    plan = _Plan()
    proto = [r for r in runtimes if r != "genai"]
    if loaded.manifest is None:
        if proto:
            art, reused = export_variant(loaded, work / "dense", proto, cfg.gguf_quants, cfg.onnx_quant,
                                         progress=progress)
            plan.variants.append(Variant("dense", art, None, proto))
            plan.artifacts["dense"] = {"path": str(art), "reused": reused}
    else:
        have = {"gguf": loaded.manifest.get("gguf_quants"), "onnx": loaded.manifest.get("onnx_quants")}
        runnable = [r for r in proto if have["onnx" if r == "onnxruntime" else "gguf"]]
        for r in set(proto) - set(runnable):
            plan.notes.append(f"{r}: the artifact has no {'ONNX' if r == 'onnxruntime' else 'GGUF'} file, skipped")
        r = loaded.manifest.get("recipe")
        if r is None:
            plan.variants.append(Variant("dense", Path(loaded.path), None, runnable))
        else:  # the artifact's own recipe is a variant; its GGUF without the recipe is the dense one
            name = f"{r['method']}:{r['target_sparsity']:g}"
            dense_rts = [x for x in runnable if x in ("native", "llamacpp")]  # native opens it with recipe=False
            plan.variants.append(Variant("dense", Path(loaded.path), None, dense_rts))
            plan.variants.append(Variant(name, Path(loaded.path), r, [x for x in runnable if x in RECIPE_RUNTIMES]))
        plan.artifacts["dense"] = {"path": str(loaded.path), "reused": True}
    sparse_rts = [r for r in proto if r in RECIPE_RUNTIMES]
    if recipes and not sparse_rts:
        plan.notes.append(f"recipes need one of the runtimes {', '.join(RECIPE_RUNTIMES)}; none selected")
    for spec in recipes if sparse_rts else []:
        recipe = get_recipe(spec, loaded, work / "recipes", cfg.calib_tokens, progress)
        art, reused = export_variant(loaded, work / spec.slug, sparse_rts, cfg.gguf_quants[:1], cfg.onnx_quant,
                                     recipe, progress)
        plan.variants.append(Variant(spec.label, art, recipe_summary(recipe), sparse_rts))
        plan.artifacts[spec.label] = {"path": str(art), "reused": reused, "recipe": recipe_summary(recipe)}
    if cfg.own_file and "llamacpp" in runtimes and loaded.manifest is None:
        from ..sources import source_gguf

        plan.own_file = source_gguf(loaded)
        if plan.own_file is not None:
            plan.artifacts["file"] = {"path": str(plan.own_file), "reused": True}
    if "genai" in runtimes:
        from .genai import build_genai

        hf = source_folder(loaded)
        if hf is None:
            plan.notes.append("genai: the source model's HF folder is not available, skipped")
        else:
            out = work / f"genai-{cfg.onnx_quant}"
            reused = out.is_dir()
            plan.genai_dir = build_genai(hf, out, cfg.onnx_quant)
            plan.artifacts["genai"] = {"path": str(out), "reused": reused, "source": str(hf)}
    return plan


def _jobs(model: str, loaded, plan: _Plan, cfg: BenchConfig, prompts: list[list[int]]) -> list[dict]:
    threads = cfg.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ppl = {"window": cfg.ppl_window, "max_tokens": cfg.ppl_tokens} if cfg.ppl_tokens else None
    common = {"threads": threads, "isolated": cfg.isolate, "prompts": prompts, "max_new_tokens": cfg.max_new_tokens,
              "repeats": cfg.repeats,
              "warmup_tokens": cfg.warmup_tokens, "budget": cfg.budget, "warm": cfg.warm, "ppl": ppl}
    decodes = list(dict.fromkeys(["greedy", *[Decode.parse(d).label for d in cfg.decodes]]))
    jobs = []
    from .prepare import installed

    dense_source = loaded.manifest is None or not loaded.manifest.get("recipe")
    if ppl and cfg.reference and dense_source and installed("torch"):
        jobs.append({**common, "label": "reference", "model": model, "runtime": "torch", "variant": "reference",
                         "decodes": [], "repeats": 1})
    quants = {"native": cfg.gguf_quants, "llamacpp": cfg.gguf_quants, "onnxruntime": (cfg.onnx_quant,)}
    have = (loaded.manifest or {}).get("gguf_quants")
    for v in plan.variants:
        for r in v.runtimes:
            opts = {"recipe": False} if (r == "native" and v.name == "dense" and loaded.manifest
                                         and loaded.manifest.get("recipe")) else {}
            qs = quants.get(r, (None,))
            if have is not None and r in ("native", "llamacpp"):  # an artifact: the types it has
                qs = tuple(q for q in qs if q in have) or (None,)
            for i, q in enumerate(qs if v.name == "dense" else qs[:1]):
                # the first type runs every decoding (and the recipes); the others dense greedy,
                # for the same-type comparison with llama.cpp
                jobs.append({**common, "label": f"{r}/{v.name}" + (f"@{q}" if i else ""), "model": str(v.artifact),
                             "runtime": r, "variant": v.name, "quant": q, "open_opts": opts,
                             "decodes": decodes if i == 0 else ["greedy"]})
    own = plan.own_file
    if own is not None:  # the peer as a user runs it: llama.cpp on the file the model came as
        from ..sources import gguf_file_type

        jobs.append({**common, "label": "llamacpp/dense@file", "model": model, "runtime": "llamacpp",
                     "variant": "dense", "quant": None, "quant_label": f"file:{gguf_file_type(own)}",
                     "decodes": ["greedy"]})
    if plan.genai_dir is not None:
        jobs.append({**common, "label": "genai/dense", "model": str(plan.variants[0].artifact) if plan.variants
                     else model, "runtime": "genai", "variant": "dense", "genai_dir": str(plan.genai_dir),
                     "quant_label": cfg.onnx_quant, "decodes": ["greedy"]})
    return jobs


def _slug(label: str) -> str:
    return label.replace("/", "_").replace(":", "-").replace(",", "+")


def job_failure(rc: int, log_text: str) -> str:
    """One line on how a job process ended: the signal that killed it and the last native log
    lines (a crash in llama.cpp or our kernels), or the error line it printed."""
    if rc < 0:
        return crash_summary(rc, log_text)
    lines = [x for x in log_text.splitlines() if x.strip()]
    return lines[-1] if lines else describe_exit(rc)


def _run_job(job: dict, work: Path, isolate: bool, bar) -> dict:
    if not isolate:
        return measure_job(job, bar.update)
    for d in ("jobs", "logs"):
        (work / d).mkdir(parents=True, exist_ok=True)
    jp, rp = work / "jobs" / f"{_slug(job['label'])}.json", work / "jobs" / f"{_slug(job['label'])}.result.json"
    log = work / "logs" / f"{_slug(job['label'])}.log"
    jp.write_text(json.dumps(job))
    rp.unlink(missing_ok=True)
    env = dict(os.environ)  # the native engine's barrier wait: its own default unless the user set one
    with open(log, "w") as lf:
        p = subprocess.Popen([sys.executable, "-m", "sparsedge.bench.worker", str(jp), str(rp)],
                             stdout=subprocess.PIPE, stderr=lf, text=True, env=env)
        for line in p.stdout:
            if line.startswith("progress "):
                bar.update(int(line.split()[1]))
        rc = p.wait()
    if rc != 0 or not rp.is_file():
        return {"label": job["label"], "runtime": job["runtime"], "variant": job["variant"],
                "error": job_failure(rc, log.read_text(errors="replace")) + f" (log: {log})"}
    return json.loads(rp.read_text())


def bench(model: str, out_dir: str | Path, cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    """Measure a model (built-in name, HF folder, .gguf, hub id) or an artifact folder; write
    OUT/report.json, OUT/report.md and OUT/*.png; return the report (report.json's content)."""
    from tqdm import tqdm

    from ..runtimes.decoding import prompt_suite
    from ..sources import load
    from ..text import encode_prompt
    from .report import assemble, write

    cfg = cfg or BenchConfig()
    t0 = time.perf_counter()
    # everything that can be checked before any work is checked first
    runtimes, notes = select_runtimes(tuple(cfg.runtimes) if cfg.runtimes else None)
    recipes = [RecipeSpec.parse(r, cfg.scope) for r in cfg.recipes]
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SparsedgeError(f"{out} exists and is not a folder")
    work = Path(cfg.work_dir).expanduser() if cfg.work_dir else out / "artifacts"
    loaded = load(model, progress=progress)
    work.mkdir(parents=True, exist_ok=True)

    plan = _prepare(loaded, runtimes, recipes, cfg, work, progress)
    suite = prompt_suite()[: cfg.prompts or None]
    prompts = [encode_prompt(loaded.tokenizer, p["prompt"], chat=p["chat"]).tolist() for p in suite]
    jobs = _jobs(model, loaded, plan, cfg, prompts)
    # Repeats run in rounds: each round runs every job once (its own process, one repeat of each
    # configuration), so that load from elsewhere on a shared machine falls on every runtime alike
    # instead of on whichever job ran while it lasted; medians pool all rounds. Perplexity runs in
    # the first round only. Draft trees are sized from each runtime's cost curve t(k)/t(1), which
    # the first round measures; later rounds, and reruns with the same work folder, reuse it (kept
    # in WORK/cost_curves.json like the artifacts), so that a rerun measures the same trees.
    rounds = max(1, cfg.repeats)
    curves_file = work / "cost_curves.json"
    curves = json.loads(curves_file.read_text()) if curves_file.is_file() else {}
    per_round = [{**j, "repeats": 1} for j in jobs]
    later = [{**j, "ppl": None} for j in per_round]
    runs: list[list[dict]] = [[] for _ in jobs]
    # the host's memory bandwidth around every job process (host.BandwidthProbe): what tells a
    # rerun on a busier host from a slower build
    probe = BandwidthProbe()
    last = probe.measure()
    with tqdm(total=sum(job_units(j) for j in per_round) + (rounds - 1) * sum(job_units(j) for j in later),
              desc="bench", unit="step", file=sys.stderr, disable=not progress) as bar:
        for r in range(rounds):
            for i, job in enumerate(per_round if r == 0 else later):
                if r and (not job["decodes"] or "error" in runs[i][0]):
                    continue  # nothing to repeat (perplexity only), or it failed
                bar.set_postfix_str(f"{job['label']} (round {r + 1}/{rounds})")
                if job["label"] in curves:
                    job = {**job, "cost_curves": curves[job["label"]]}
                res = _run_job(job, work, cfg.isolate, bar)
                now = probe.measure()
                res["host_gbps"], last = (last + now) / 2, now
                runs[i].append(res)
                if r == 0 and "error" not in runs[i][0]:
                    curves[job["label"]] = {d["decode"]: d["cost_curve"] for d in runs[i][0]["decodes"]
                                            if d.get("cost_curve")}
        curves_file.write_text(json.dumps(curves, indent=1))
    results = [next((x for x in rr if "error" in x), None) or merge_rounds(rr) for rr in runs]
    report = assemble(model, cfg, results, plan, notes, [p["id"] for p in suite], [len(p) for p in prompts],
                      elapsed_s=time.perf_counter() - t0, host_probe=probe.summary())
    write(report, out)
    return report


__all__ = ["BenchConfig", "bench", "Decode", "job_failure"]
