"""ONNX Runtime GenAI as a peer: its own int4 build of the source HF folder, its own decoding loop.

    build_genai(hf_folder, out)      python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu
    rt = GenAIRuntime(out, threads=2)
    stats, tokens = rt.generate(prompt_ids, GenerationConfig(max_new_tokens=64))   # GenAI's greedy loop
    rt.forward(tokens) -> logits [k, vocab]                                         # for perplexity

Timing uses GenAI's own loop (``generate_next_token``), as a GenAI user would run it; ``forward``
(append_tokens + the ``logits`` output, every position) exists so that perplexity follows the same
protocol as the other runtimes. It does not verify drafts (no tree mask, no ``keep``): speculative
configurations are not run on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SparsedgeError

CONFIG = "genai_config.json"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def build_genai(hf_folder: str | Path, out: str | Path, precision: str = "int4", log: Path | None = None) -> Path:
    """Run GenAI's model builder (CPU) on an HF folder; reuse ``out`` if a finished build is there."""
    out = Path(out)
    if (out / CONFIG).is_file() and (out / "model.onnx").is_file():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + "-cache"))]
    with open(log or out.with_suffix(".log"), "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not (out / CONFIG).is_file():
        raise SparsedgeError(f"the ONNX Runtime GenAI model builder failed on {hf_folder} (log: {f.name})")
    return out


def _configure(folder: Path, threads: int | None) -> dict:
    """The thread count; otherwise GenAI's own session settings, as a GenAI user runs it (its
    intra-op threads spin between ops). Returns the GenAI config.

    Why not without spinning, as sparsedge's own ONNX Runtime sessions run (runtimes/onnxrt.py):
    measured here in 4 processes taking turns (96 tokens, 8 turns each), GenAI without spinning
    decodes at 126-128 tok/s against 156-159 with it, and in `sparsedge bench` its rounds spread
    over 113-158 tok/s, enough to move its median 12% between a run and its rerun."""
    p = folder / CONFIG
    cfg = json.loads(p.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = int(threads or 0)
    so.pop("config_entries", None)
    so.pop("session.intra_op.allow_spinning", None)  # a setting of an earlier sparsedge
    p.write_text(json.dumps(cfg, indent=4))
    return cfg


class GenAIRuntime:
    name = "genai"
    exact_trees = False

    def __init__(self, folder: str | Path, threads: int | None = None, max_length: int = 4096):
        import onnxruntime_genai as og

        self.path = Path(folder)
        cfg = _configure(self.path, threads)
        self._og = og
        self.model = og.Model(str(self.path))
        self.max_length = min(max_length, int(cfg["model"].get("context_length", max_length)))
        self._vocab = None
        self.reset()

    def _generator(self, max_length: int, min_length: int = 0):
        p = self._og.GeneratorParams(self.model)
        # min_length = max_length: no early stop at EOS, so every prompt decodes exactly n tokens
        p.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
        return self._og.Generator(self.model, p)

    # ---------------------------------------------------------------- a minimal Runtime (perplexity)
    @property
    def n_past(self) -> int:
        return self._n

    @property
    def vocab_size(self) -> int:
        return self._vocab or 0

    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        if positions is not None or tree_mask is not None:
            raise SparsedgeError("the genai peer runs plain sequences only")
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        self._gen.append_tokens(toks)
        self._n += len(toks)
        logits = np.asarray(self._gen.get_output("logits"), dtype=np.float32)[0]  # [k, vocab]
        self._vocab = logits.shape[-1]
        return logits[-len(toks):]

    def keep(self, indices: Sequence[int]) -> None:
        raise SparsedgeError("the genai peer does not verify drafts")

    def truncate(self, n: int) -> None:
        self._gen.rewind_to(n)
        self._n = n

    def reset(self) -> None:
        self._gen = self._generator(self.max_length)
        self._n = 0

    # ---------------------------------------------------------------- GenAI's own greedy loop
    def generate(self, prompt_ids: Sequence[int], cfg) -> tuple:
        """(GenerationStats, new tokens): greedy, exactly cfg.max_new_tokens tokens."""
        from ..runtimes.decoding import GenerationStats

        ids = np.asarray(prompt_ids, dtype=np.int32)
        total = len(ids) + cfg.max_new_tokens
        st = GenerationStats(prompt_tokens=len(ids))
        self._gen = None  # free the perplexity generator's cache first
        g = self._generator(total, total)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        g.generate_next_token()
        toks = [int(g.get_next_tokens()[0])]
        st.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while len(toks) < cfg.max_new_tokens:
            g.generate_next_token()
            toks.append(int(g.get_next_tokens()[0]))
        st.decode_s = time.perf_counter() - t1
        st.new_tokens, st.tokens = len(toks), toks
        del g
        self.reset()
        return st, toks
