"""The llama.cpp runtime: a GGUF run through llama-cpp-python's low-level C API (Runtime protocol).

The committed text lives in KV sequence 0. A draft tree is verified in ONE ``llama_decode``: every
root-to-leaf path gets its own sequence id, the committed prefix is shared into those sequences
(``seq_cp``: in a unified KV cache that only adds the id to the prefix cells), and each tree token
carries the ids of every path through it. llama.cpp lets a token see the cells of its sequence at
positions <= its own, so with positions ``n_past + depth`` a token sees the prefix, its ancestors
and itself: exactly the tree mask. ``keep`` then keeps one path (the accepted chain) as sequence 0;
its cells already sit at positions n_past.. n_past+m-1, so nothing moves.

    rt = LlamaCppRuntime("model.q4_0.gguf", n_ctx=4096, threads=2)
    logits = rt.forward(prompt_ids)                                   # [k, vocab] float32
    logits = rt.forward(tree_tokens, n_past + depths, tree_mask(parents))
    rt.keep(accepted_chain)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import SparsedgeError, crash_summary
from ..sources import is_gguf
from .base import check_forward_args, check_keep_indices

_LIB = None
_LOG: deque[tuple[int, str]] = deque(maxlen=400)
_LOG_CALLBACK = None  # the ctypes callback must outlive every native call that may log
_TEE_FD: int | None = None  # a file descriptor that also gets every native log line (tee_log)
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache


def _on_log(level: int, text: bytes, _user) -> None:
    s = text.decode("utf-8", errors="replace") if text else ""
    if level == _GGML_LOG_CONT and _LOG:
        lv, prev = _LOG[-1]
        _LOG[-1] = (lv, prev + s)
    else:
        _LOG.append((level, s))
    if _TEE_FD is not None and s:
        try:  # unbuffered: the lines before a native crash are the ones worth having
            os.write(_TEE_FD, s.encode("utf-8", errors="replace"))
        except OSError:
            pass


def tee_log(fd: int | None) -> None:
    """Also write every llama.cpp log line to ``fd`` as it comes (None: stop). A process that may
    die inside llama.cpp (a bench job, the probe) tees to stderr, so its log file ends with the
    native lines written before the crash instead of nothing."""
    global _TEE_FD
    _TEE_FD = fd


def log_crashes_to_stderr() -> str:
    """For a process that may die inside llama.cpp (a bench job, the probe's child): its stderr
    gets llama.cpp's system-info line first, then every native log line as it comes (tee_log), so
    the log of a crash says which kernels ran and what llama.cpp did last. Returns that first line."""
    load_library()
    line = f"llama.cpp system info: {system_info()}"
    os.write(2, (line + "\n").encode())
    tee_log(2)
    return line


def system_info() -> str:
    """llama.cpp's system-info line: the CPU features its kernels were compiled for and the
    backends in this build, e.g. "CPU : SSE3 = 1 | ... | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 |
    LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |" (what llama.cpp runs here; features it does not list
    are not in the build)."""
    raw = load_library().llama_print_system_info()
    return " ".join((raw.decode("utf-8", errors="replace") if raw else "").split())


def compiled_features(info: str) -> list[str]:
    """The names a system-info line marks "= 1" (e.g. ["SSE3", "AVX2", ..., "OPENMP", "REPACK"])."""
    out: list[str] = []
    for part in info.replace(":", "|").split("|"):
        name, eq, val = part.partition("=")
        if eq and val.strip() == "1" and name.strip() not in out:
            out.append(name.strip())
    return out


def load_library():
    """The llama_cpp module, initialised once, its native log captured (not printed)."""
    global _LIB, _LOG_CALLBACK
    if _LIB is None:
        try:
            import llama_cpp
        except ImportError as e:
            raise SparsedgeError(
                f"the llamacpp runtime needs llama-cpp-python: pip install 'sparsedge[llamacpp]' ({e})"
            ) from e
        _LOG_CALLBACK = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        _LIB = llama_cpp
    return _LIB


class NativeLog:
    """The llama.cpp log lines written since ``start``."""

    def __init__(self) -> None:
        _LOG.clear()

    def lines(self) -> list[tuple[int, str]]:
        return list(_LOG)

    def last_error(self, n: int = 3) -> str:
        errs = [t.strip() for lv, t in _LOG if lv == _GGML_LOG_ERROR and t.strip()]
        if not errs:
            errs = [t.strip() for _, t in _LOG if t.strip()]
        return " | ".join(errs[-n:])


@contextlib.contextmanager
def captured_log() -> Iterator[NativeLog]:
    yield NativeLog()


def tree_parents(mask: np.ndarray) -> np.ndarray:
    """Parents [k] (-1 for roots) of the tree a mask describes (row i: ancestors of i and i), or a
    SparsedgeError if the mask is not a tree (each row must be its parent's row plus itself)."""
    k = mask.shape[0]
    depth = mask.sum(axis=1) - 1
    parents = np.full(k, -1, dtype=np.int64)
    for i in range(k):
        anc = np.flatnonzero(mask[i])
        anc = anc[anc != i]
        if anc.size == 0:
            continue
        p = anc[depth[anc] == depth[i] - 1]
        ok = p.size == 1
        if ok:
            want = mask[p[0]].copy()
            want[i] = True
            ok = bool((want == mask[i]).all())
        if not ok:
            raise SparsedgeError(f"tree_mask row {i} does not describe a tree (ancestors of a node and itself)")
        parents[i] = p[0]
    return parents


def _depths(parents: np.ndarray) -> np.ndarray:
    depth = np.zeros(len(parents), dtype=np.int64)
    for i in range(len(parents)):
        d, p = 0, parents[i]
        while p >= 0:
            d, p = d + 1, parents[p]
        depth[i] = d
    return depth


@dataclass
class _Last:
    """The entries the last forward appended: where they start and how they map to sequences."""

    start: int
    parents: np.ndarray  # [k]
    seqs: list[list[int]]  # per token, the sequence ids of the paths through it
    n_seqs: int  # sequences in use (1: everything is in sequence 0)


class LlamaCppRuntime:
    """Runtime protocol over a GGUF file in llama.cpp (CPU). One text, KV cache in sequence 0."""

    name = "llamacpp"

    def __init__(
        self,
        gguf_path: str | Path,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_batch: int = 512,
        max_branches: int = 32,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        probe: bool = False,
    ):
        """probe=True first runs a multi-token forward of the file in a child process (check_runs,
        remembered once it passed), so that a llama.cpp that crashes on this host ends in a
        SparsedgeError naming the signal instead of killing this process."""
        self._model = self._ctx = self._batch = None
        path = Path(gguf_path).expanduser()
        if not path.is_file():
            raise SparsedgeError(f"no such GGUF file: {path}")
        if not is_gguf(path):
            raise SparsedgeError(f"{path} is not a GGUF file (bad magic)")
        if kv_type not in KV_TYPES:
            raise SparsedgeError(f"unknown KV cache type {kv_type!r} (known: {', '.join(KV_TYPES)})")
        if n_ctx < 1 or n_batch < 1 or max_branches < 1:
            raise SparsedgeError("n_ctx, n_batch and max_branches must be positive")
        if probe:
            check_runs(path, threads)
        L = self._L = load_library()
        self.path = path
        self.n_ctx = int(n_ctx)
        # Tree rows are exact, but keep() of a branch leaves freed cells between the kept ones, and
        # later tokens then sum their attention over the cache in another order than a sequential
        # run (~1e-6 apart); requantizing activations to Q8 for quantized weights amplifies that
        # to ~0.6 logits on SmolLM2 Q4_0. Kept chains stay contiguous and exact, so speculative
        # decoding verifies chains on this runtime (measured: tests/runtimes/test_speculative.py).
        self.exact_trees = False
        self.n_batch = int(n_batch)
        self.max_branches = min(int(max_branches), self.n_batch)  # a tree's leaves are in one batch
        self.threads = int(threads) if threads else max(1, os.cpu_count() or 1)

        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        with captured_log() as log:
            self._model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise SparsedgeError(f"llama.cpp cannot load {path.name}: {log.last_error() or 'unknown error'}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = int(L.llama_vocab_n_tokens(self._vocab))

        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.max_branches
        cp.n_outputs_max = cp.n_outputs_max_per_seq = self.n_batch  # logits for every token
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = True  # one cache whose cells may belong to several sequences (the tree)
        cp.swa_full = True  # keep whole sliding-window caches so that truncate can always roll back
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = -1 if flash_attn is None else int(bool(flash_attn))
        cp.no_perf = True
        with captured_log() as log:
            self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise SparsedgeError(f"llama.cpp cannot create a context for {path.name}: {log.last_error()}")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, self.max_branches)
        self._n = 0
        self._last: _Last | None = None

    # ------------------------------------------------------------------ protocol

    @property
    def n_past(self) -> int:
        return self._n

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (e.g. "sparsedge.recipe"), or None."""
        self._alive()
        buf = ctypes.create_string_buffer(1 << 20)
        n = self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> np.ndarray:
        """Token ids [n] of ``text`` by llama.cpp's own tokenizer (the GGUF's vocabulary)."""
        self._alive()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (self._L.llama_token * cap)()
        n = self._L.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            raise SparsedgeError(f"llama.cpp could not tokenize the text ({n})")
        return np.array(buf[:n], dtype=np.int64)

    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        self._alive()
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, self._n, self._n_vocab)
        if self._last is not None and self._last.n_seqs > 1:
            raise SparsedgeError("after a branching tree forward, keep() the accepted path (or truncate) first")
        k, start = toks.shape[0], self._n
        if start + k > self.n_ctx:
            raise SparsedgeError(
                f"context overflow: {start} cached + {k} new tokens exceed the context of {self.n_ctx} "
                "(open the runtime with a larger n_ctx)"
            )
        parents = np.arange(-1, k - 1) if tree_mask is None else tree_parents(mask)
        depth = np.arange(k) if tree_mask is None else _depths(parents)
        if not np.array_equal(pos, start + depth):
            raise SparsedgeError("llama.cpp needs the positions of new tokens to be n_past + depth in the tree")
        has_child = np.zeros(k, dtype=bool)
        has_child[parents[parents >= 0]] = True
        leaves = np.flatnonzero(~has_child)
        out = np.empty((k, self._n_vocab), dtype=np.float32)
        if leaves.size == 1:  # a chain: plain causal decoding in sequence 0, in n_batch chunks
            for s in range(0, k, self.n_batch):
                e = min(k, s + self.n_batch)
                out[s:e] = self._decode(toks[s:e], pos[s:e], [[0]] * (e - s))
            self._last = _Last(start, parents, [[0]] * k, 1)
        else:
            if k > self.n_batch:
                raise SparsedgeError(f"a tree of {k} tokens exceeds n_batch={self.n_batch}")
            if leaves.size > self.max_branches:
                raise SparsedgeError(f"a tree with {leaves.size} leaves exceeds max_branches={self.max_branches}")
            seqs: list[list[int]] = [[] for _ in range(k)]
            for s, leaf in enumerate(leaves):  # sequence s = the path root -> leaf s
                i = int(leaf)
                while i >= 0:
                    seqs[i].append(s)
                    i = int(parents[i])
            L = self._L
            for s in range(1, leaves.size):  # the prefix is visible to every path
                L.llama_memory_seq_rm(self._mem, s, -1, -1)
                L.llama_memory_seq_cp(self._mem, 0, s, -1, -1)
            try:
                out[:] = self._decode(toks, pos, seqs)
            except BaseException:
                for s in range(1, leaves.size):
                    L.llama_memory_seq_rm(self._mem, s, -1, -1)
                raise
            self._last = _Last(start, parents, seqs, int(leaves.size))
        self._n = start + k
        return out

    def keep(self, indices: Sequence[int]) -> None:
        """Keep the accepted path: ``indices`` must be a chain from a root of the last forward's tree
        (each the parent of the next), which is how decoding accepts a draft path."""
        self._alive()
        last = self._last
        if last is None:
            raise SparsedgeError("keep() must follow a forward()")
        idx = check_keep_indices(indices, len(last.parents))
        prev = -1
        for i in idx.tolist():
            if last.parents[i] != prev:
                raise SparsedgeError(
                    "the llamacpp runtime keeps a chain from the tree's root (each kept entry the parent "
                    f"of the next); got {idx.tolist()}"
                )
            prev = i
        m, L = idx.size, self._L
        end = last.start + m
        if last.n_seqs == 1:
            self._rm(0, end, -1)
        else:
            s = last.seqs[idx[-1]][0] if m else 0  # a path through the last kept entry
            self._rm(s, end, -1)  # drop that path's entries below the kept chain
            L.llama_memory_seq_keep(self._mem, s)  # drop every other path (prefix cells are in s too)
            if s != 0:
                L.llama_memory_seq_cp(self._mem, s, 0, -1, -1)
                L.llama_memory_seq_rm(self._mem, s, -1, -1)
        self._n = end
        self._last = _Last(last.start, np.arange(-1, m - 1), [[0]] * m, 1)

    def truncate(self, n: int) -> None:
        self._alive()
        if not 0 <= n <= self._n:
            raise SparsedgeError(f"cannot truncate to {n}: cache holds {self._n}")
        last = self._last
        if last is not None and last.n_seqs > 1:
            if n > last.start:  # into the tree: only a chain from a root is a text to keep
                self.keep(range(n - last.start))
                self._last = None
                return
            self._rm(-1, n, -1)
            for s in range(1, last.n_seqs):
                self._L.llama_memory_seq_rm(self._mem, s, -1, -1)
        else:
            self._rm(0, n, -1)
        self._n = n
        self._last = None

    def reset(self) -> None:
        self._alive()
        self._L.llama_memory_clear(self._mem, False)
        self._n = 0
        self._last = None

    # ------------------------------------------------------------------ native plumbing

    def _alive(self) -> None:
        if self._ctx is None:
            raise SparsedgeError("this llama.cpp runtime is closed")

    def _rm(self, seq: int, p0: int, p1: int) -> None:
        if not self._L.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise SparsedgeError(f"llama.cpp cannot remove KV entries {p0}..{p1} of sequence {seq}")

    def _decode(self, toks: np.ndarray, pos: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        b, L, k = self._batch, self._L, len(toks)
        b.n_tokens = k
        for i in range(k):
            b.token[i] = int(toks[i])
            b.pos[i] = int(pos[i])
            b.n_seq_id[i] = len(seqs[i])
            sid = b.seq_id[i]
            for j, s in enumerate(seqs[i]):
                sid[j] = s
            b.logits[i] = 1
        with captured_log() as log:
            rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            why = {1: "no room in the KV cache (context overflow)", 2: "aborted"}.get(rc, "error")
            raise SparsedgeError(f"llama_decode failed ({rc}: {why}): {log.last_error()}")
        ptr = L.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(k, self._n_vocab)).copy()

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        L = getattr(self, "_L", None)
        if L is None:
            return
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# ----------------------------------------------------------------------------- crash probe
#
# A fault inside llama.cpp kills the whole Python process with no exception to catch (stock
# llama-cpp-python built with -march=native on an Intel AMX host segfaults on every batch of two or
# more tokens: llama.cpp issue 20824). So before a CLI command runs a GGUF in-process, a child
# process runs a multi-token forward of it; if the child dies, the command stops with a sentence
# that names the signal and the last native log lines instead of dying silently. A success is
# remembered per (llama.cpp library files, GGUF file, CPU, threads), so the probe costs one child
# process per model and host.

PROBE_TOKENS = 4  # one batch of several tokens (the AMX crash needs >= 2), then one single token
HINT = ("llama-cpp-python built for another CPU, or with ggml's AMX kernels (-march=native on an "
        "Intel Sapphire/Granite Rapids host, llama.cpp issue 20824); rebuild it with the project's "
        "flags: `make llamacpp` in a sparsedge checkout (README, 'llama.cpp build')")


@dataclass
class ProbeResult:
    ok: bool
    returncode: int
    detail: str  # on failure: how the child ended and its last log lines; on success: system info
    cached: bool = False


def _library_files() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise SparsedgeError("the llamacpp runtime needs llama-cpp-python: pip install 'sparsedge[llamacpp]'")
    lib = Path(spec.origin).parent / "lib"
    return sorted(p for p in lib.glob("*") if p.is_file()) if lib.is_dir() else [Path(spec.origin)]


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))  # the first CPU's lines (all CPUs of a host agree)


def _probe_key(path: Path, threads: int) -> str:
    h = hashlib.sha256()
    for f in [*_library_files(), path]:
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(f"{threads}\n{sys.executable}\n{_cpu_identity()}".encode())
    return h.hexdigest()[:24]


def _probe_command(path: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "sparsedge.runtimes.llamacpp", "--probe", str(path), str(threads)]


def probe(gguf_path: str | Path, threads: int | None = None, timeout_s: float = 600.0,
          use_cache: bool = True) -> ProbeResult:
    """Run a PROBE_TOKENS-token forward and a 1-token step of ``gguf_path`` in a child process and
    report whether it survived (a crashing llama.cpp kills the child, not the caller)."""
    from ..sources import home

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise SparsedgeError(f"no such GGUF file: {path}")
    threads = int(threads) if threads else max(1, os.cpu_count() or 1)
    marker = home() / "probes" / "llamacpp" / f"{_probe_key(path, threads)}.json"
    if use_cache and marker.is_file():
        try:
            return ProbeResult(**{**json.loads(marker.read_text()), "cached": True})
        except (ValueError, TypeError):
            marker.unlink(missing_ok=True)
    try:
        r = subprocess.run(_probe_command(path, threads), capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # a hang, not a crash: 124 as timeout(1) reports it, no AMX hint
        return ProbeResult(False, 124, f"did not finish within {timeout_s:.0f} s")
    if r.returncode == 0:
        res = ProbeResult(True, 0, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ok": True, "returncode": 0, "detail": res.detail}))
        os.replace(tmp, marker)
        return res
    return ProbeResult(False, r.returncode, crash_summary(r.returncode, r.stderr))


def check_runs(gguf_path: str | Path, threads: int | None = None) -> None:
    """A SparsedgeError if llama.cpp cannot run a multi-token forward of this GGUF on this host
    without crashing (see probe); nothing, and nothing more to pay, once it could."""
    res = probe(gguf_path, threads)
    if not res.ok:
        name = Path(gguf_path).name
        hint = f" Likely cause: {HINT}." if res.returncode < 0 else ""
        raise SparsedgeError(f"llama.cpp crashed in a test run: a {PROBE_TOKENS}-token forward of {name} "
                             f"{res.detail}.{hint}")


def _probe_child(path: str, threads: int) -> int:
    """The child side of probe(): native log to stderr as it comes, faulthandler for the Python
    side, system info first (so a crash report shows which kernels were in the build)."""
    import faulthandler

    faulthandler.enable()
    info = log_crashes_to_stderr()
    with LlamaCppRuntime(path, n_ctx=64, threads=threads, n_batch=16, max_branches=1) as rt:
        toks = np.arange(1, PROBE_TOKENS + 1) % rt.vocab_size
        out = rt.forward(toks)
        out = np.concatenate([out, rt.forward(toks[:1])])
    if not np.isfinite(out).all():
        print("llama.cpp returned non-finite logits", file=sys.stderr)
        return 3
    print(info)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        sys.exit(_probe_child(sys.argv[2], int(sys.argv[3])))
    print("usage: python -m sparsedge.runtimes.llamacpp --probe FILE.gguf THREADS", file=sys.stderr)
    sys.exit(2)
