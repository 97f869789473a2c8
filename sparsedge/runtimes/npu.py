"""The NPU runtime: static-shape ONNX decoder graphs (sparsedge.export.onnx.StaticShape) on an NPU
execution provider (Qualcomm's QNN HTP), or on ONNX Runtime's CPU provider as its reference.

An NPU compiles a graph once for fixed shapes, so an artifact carries one graph per number of new
tokens, all over the same fixed cache of C slots: a 1-token graph for decoding and a k-token graph
(k = 8 by default) for verifying a draft tree. ``forward`` picks the smallest graph that holds the
call's tokens (padding the rest: a pad sees and writes nothing) and splits longer calls (prefill,
big trees) into chunks.

The KV cache lives here, in numpy, slot-major as [C, n_kv * hd] per layer and kind (float32 for
float graphs, the 16-bit integers of their encoding for QDQ ones): a graph writes its new entries
into the next free slots itself, attends over the C slots (hidden ones masked by the additive
bias) and returns the new entries, which the runtime writes into the same slots. ``keep`` compacts
slots. Rotary tables are computed here, in float (the graph takes them as inputs; see StaticShape
for why).

Why the CPU fallback is disabled on the NPU: ONNX Runtime silently runs every node the NPU cannot
take on the CPU, and a graph that ran on the CPU must not pass for an NPU result. With
``session.disable_cpu_ep_fallback`` a graph that does not fit the NPU fails to load instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..arch import ModelSpec
from ..errors import SparsedgeError
from .base import additive_bias, check_forward_args, check_keep_indices

QNN = "QNNExecutionProvider"
PROVIDERS = ("qnn", "cpu")
# HTP options. The graphs are mixed precision (A16W8 matmuls; norms, residual adds and column
# scales in float, see sparsedge.quantize.onnx), and HTP runs float ops in fp16 only when told so,
# which QNN accepts only with a SoC named: 43 is the Snapdragon 8 Gen 2 (HTP v73), the oldest
# generation with fp16 on the HTP. burst: the fastest clocks on a phone (the emulator ignores it).
QNN_OPTIONS = {"backend_type": "htp", "enable_htp_fp16_precision": "1", "soc_model": "43", "htp_arch": "73",
               "htp_performance_mode": "burst"}
QNN_INSTALL = "pip install onnxruntime-qnn"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint16)": "uint16", "tensor(int16)": "int16",
              "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def _qnn_plugin() -> bool:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


def qnn_available() -> bool:
    """Whether the QNN execution provider can be used here (the onnxruntime-qnn plugin library, or
    an ONNX Runtime build with QNN inside)."""
    import onnxruntime as ort

    return _qnn_plugin() or QNN in ort.get_available_providers()


def _qnn_devices(ort):
    """The QNN plugin's EP devices, registering its library once per process."""
    import onnxruntime_qnn

    if not any(d.ep_name == QNN for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(QNN, onnxruntime_qnn.get_library_path())
        except Exception as e:  # a library of another ONNX Runtime ABI, a missing backend, ...
            raise SparsedgeError(f"cannot load the QNN execution provider library: {str(e).splitlines()[0]}") from e
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN]


def npu_session(path: Path, provider: str = "qnn", threads: int | None = None,
                provider_options: Mapping[str, str] | None = None):
    """An InferenceSession for one static graph: on the QNN HTP backend with the CPU fallback
    disabled, or on the CPU provider."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SparsedgeError(f"unknown NPU provider {provider!r} (known: {', '.join(PROVIDERS)})")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    options = None
    if provider == "qnn":
        if not qnn_available():
            raise SparsedgeError(f"the QNN execution provider is not installed: {QNN_INSTALL}")
        opts = {**QNN_OPTIONS, **(provider_options or {})}
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if _qnn_plugin():
            so.add_provider_for_devices(_qnn_devices(ort), opts)
            providers = None
        else:  # an ONNX Runtime build with QNN inside (once the plugin is registered, ONNX
            # Runtime lists it among the available providers too, but by name it is not used)
            providers, options = [QNN], [opts]
    try:
        if providers is None:
            return ort.InferenceSession(str(path), sess_options=so)
        return ort.InferenceSession(str(path), sess_options=so, providers=providers, provider_options=options)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "on the QNN HTP backend (CPU fallback disabled)" if provider == "qnn" else "on the CPU"
        raise SparsedgeError(f"{path.name} does not run {where}: {msg}") from e


class _Graph:
    """One static graph: its session and fixed shapes."""

    def __init__(self, path: Path, provider: str, threads, provider_options):
        self.path = path
        self.session = npu_session(path, provider, threads, provider_options)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "sparsedge.static" not in meta or "sparsedge.spec" not in meta:
            raise SparsedgeError(f"{path} is not a static sparsedge decoder graph (no sparsedge.static metadata)")
        st = json.loads(meta["sparsedge.static"])
        self.tokens, self.context = int(st["tokens"]), int(st["context"])
        self.spec = ModelSpec.from_dict(json.loads(meta["sparsedge.spec"]))
        self.mask_value = np.float32(float(meta.get("sparsedge.mask_value", -1e4)))
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}
        # the cache's element type: float32 for a float graph, the integers of the encoding for a
        # quantized one (sparsedge.quantize.onnx._kv_as_integers)
        kv = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        if kv not in _ORT_TYPES:
            raise SparsedgeError(f"{path}: a KV cache of type {kv} is not supported")
        self.kv_dtype = np.dtype(_ORT_TYPES[kv])
        if "kv_slot_source" not in self.inputs:  # earlier graphs attended over C + k columns
            raise SparsedgeError(f"{path} is a static graph of an older layout (no kv_slot_source input): "
                                 "export the artifact again")
        self.providers = self.session.get_providers()


class NpuRuntime:
    """Runtime protocol over static-shape decoder graphs, batch size 1.

    graphs: paths of the static graphs of one model (different token counts, same context), or a
    folder holding them (``*.onnx`` with sparsedge.static metadata). provider: "qnn" (QNN HTP, CPU
    fallback disabled) or "cpu" (ONNX Runtime's CPU provider: the reference for the same graph).

    exact: run every call through one graph (the largest), so that a token's logits never depend
    on how many tokens its call carried. One graph's rows are bit-identical whether a token comes
    alone, in a chain or in a tree, and after keep(), on the CPU provider and on QNN HTP (the graph
    writes new entries into their cache slots and the cache crosses the graph's boundary as
    integers: sparsedge.export.onnx._attention_static), but two graphs' are not: the 1-token and
    8-token graphs differ by up to 0.08 logits on HTP (other tilings of the fp16 ops), enough to
    flip a near-tie, and speculative output would then differ from plain greedy. None (default):
    probe at load and use every graph only if their rows agree bit for bit. False: the smallest
    graph per call (fastest plain decoding; speculative decoding then verifies chains only and may
    differ from plain greedy at near-ties).
    """

    name = "npu"

    def __init__(self, graphs: Sequence[str | Path] | str | Path, provider: str = "qnn",
                 threads: int | None = None, provider_options: Mapping[str, str] | None = None,
                 exact: bool | None = None):
        if isinstance(graphs, (str, Path)):
            folder = Path(graphs).expanduser()
            if not folder.is_dir():
                raise SparsedgeError(f"no such folder of static graphs: {graphs}")
            paths = sorted(folder.glob("*.onnx"))
            if not paths:
                raise SparsedgeError(f"{folder} holds no .onnx graphs")
        else:
            paths = [Path(p).expanduser() for p in graphs]
        for p in paths:
            if not p.is_file():
                raise SparsedgeError(f"no such ONNX model file: {p}")
        loaded = [_Graph(p, provider, threads, provider_options) for p in paths]
        self.graphs = sorted(loaded, key=lambda g: g.tokens)  # smallest first
        g0 = self.graphs[0]
        for g in self.graphs[1:]:
            if g.context != g0.context or g.spec != g0.spec or g.kv_dtype != g0.kv_dtype:
                raise SparsedgeError(f"{g.path.name} and {g0.path.name} are not graphs of the same model and context")
        if len({g.tokens for g in self.graphs}) != len(self.graphs):
            raise SparsedgeError("two static graphs take the same number of tokens")
        self.spec: ModelSpec = g0.spec
        self.context = g0.context
        self.provider = provider
        self.mask_value = g0.mask_value
        self._sliding = any(self.spec.window(i) is not None for i in range(self.spec.n_layers))
        self._use = self.graphs
        self.reset()
        agree = len(self.graphs) == 1
        if exact is None:
            exact = not agree and self._graphs_differ()
            agree = not exact
        if exact:
            self._use = self.graphs[-1:]
        # tree rows equal sequential decoding's when one graph computes both (see exact)
        self.exact_trees = len(self._use) == 1 or agree

    def _graphs_differ(self) -> bool:
        """Do the graphs give a token other logits? Two tokens through each graph, compared bit for bit."""
        toks = [min(1, self.vocab_size - 1), min(2, self.vocab_size - 1)]
        outs = []
        for g in self.graphs:
            self._use = [g]
            outs.append(np.concatenate([self.forward(toks[:1]), self.forward(toks[1:])]))
            self.reset()
        self._use = self.graphs
        return any(not np.array_equal(outs[0], o) for o in outs[1:])

    # ---- state -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self._n

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def reset(self) -> None:
        s = self.spec
        # [2 * n_layers] arrays [C, n_kv * hd]: key then value of each layer
        dt = self.graphs[0].kv_dtype
        self._kv = [np.zeros((self.context, s.n_kv_heads * s.head_dim), dt) for _ in range(2 * s.n_layers)]
        self._pos = np.zeros(self.context, np.int64)  # position of each slot
        self._n = 0
        self._last: tuple[int, int] | None = None

    # ---- graph inputs ------------------------------------------------------------------------
    def _bias(self, allowed: np.ndarray) -> np.ndarray:
        """bool [T, C] -> additive float32 [1, 1, T, C]."""
        return additive_bias(allowed, self.mask_value)

    def _chunk_feed(self, g: _Graph, toks, pos, vis_new) -> dict[str, np.ndarray]:
        """Inputs of one call of graph g for n <= g.tokens new tokens. toks/pos [n]; vis_new bool
        [n, n_past + n]: which cache slots (0..n_past-1) and which of these tokens (slots n_past..)
        each one sees."""
        from ..export.onnx import rope_tables

        T, C, n, start = g.tokens, self.context, toks.shape[0], self._n
        ids = np.zeros(T, np.int64)
        ids[:n] = toks
        p = np.full(T, pos[-1], np.int64)
        p[:n] = pos
        # the graph writes new row t into slot start + t and attends over the C slots; a pad writes
        # nothing and sees nothing (an all-hidden row: a uniform softmax, finite, and dropped)
        vis = np.zeros((T, C), dtype=bool)
        vis[:n, : start + n] = vis_new
        source = np.arange(C, dtype=np.int64)  # slot c: column c of [past (C); new (T)] ...
        source[start : start + n] = C + np.arange(n)  # ... or the new row written there
        feed = {"input_ids": ids[None], "attention_bias": self._bias(vis), "kv_slot_source": source}
        if self._sliding:  # key visible if q_pos - k_pos < window, as torch_model does
            win = self.spec.sliding_window
            kpos = self._pos.copy()
            kpos[start : start + n] = pos
            feed["sliding_attention_bias"] = self._bias(vis & ((p[:, None] - kpos[None, :]) < win))
        for j, (cos, sin) in enumerate(rope_tables(self.spec, p)):
            feed[f"rope_cos.{j}"], feed[f"rope_sin.{j}"] = cos, sin
        for i in range(self.spec.n_layers):
            feed[f"past_key_values.{i}.key"] = self._kv[2 * i]
            feed[f"past_key_values.{i}.value"] = self._kv[2 * i + 1]
        return feed

    def _pick(self, k: int) -> _Graph:
        """The smallest graph in use that holds k tokens, else the largest (the call is chunked)."""
        return next((g for g in self._use if g.tokens >= k), self._use[-1])

    def _chunk(self, start: int, toks, pos, mask, done: int):
        """(graph, n, feed) for the next chunk of a forward that began at slot ``start`` and has
        run ``done`` of its tokens: the smallest graph that holds the rest (else the largest). Its
        tokens see every entry before the forward, then the new ones by the tree mask."""
        g = self._pick(toks.shape[0] - done)
        n = min(toks.shape[0] - done, g.tokens)
        vis = np.ones((n, self._n + n), dtype=bool)
        vis[:, start : self._n + n] = mask[done : done + n, : done + n]
        return g, n, self._chunk_feed(g, toks[done : done + n], pos[done : done + n], vis)

    def inputs(self, tokens, positions=None, tree_mask=None) -> dict[str, np.ndarray]:
        """The inputs ``forward`` would feed its first graph call, without running it (calibration
        readers use it). Arrays are copies."""
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, self._n, self.vocab_size)
        _, _, feed = self._chunk(self._n, toks, pos, mask, 0)
        return {k: np.array(v, copy=True) for k, v in feed.items()}

    # ---- protocol ----------------------------------------------------------------------------
    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        start = self._n
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, start, self.vocab_size)
        k = toks.shape[0]
        if start + k > self.context:
            raise SparsedgeError(
                f"the static graphs hold {self.context} cache entries; {start} + {k} new tokens do not fit"
            )
        out = []
        done = 0
        while done < k:
            g, n, feed = self._chunk(start, toks, pos, mask, done)
            res = g.session.run(g.outputs, feed)
            for j in range(2 * self.spec.n_layers):  # present.* [T, n_kv * hd] -> slots
                self._kv[j][self._n : self._n + n] = res[1 + j][:n]
            self._pos[self._n : self._n + n] = pos[done : done + n]
            self._n += n
            out.append(res[0][0, :n])
            done += n
        self._last = (start, k)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def keep(self, indices: Sequence[int]) -> None:
        if self._last is None:
            raise SparsedgeError("keep() must follow a forward()")
        start, k = self._last
        idx = check_keep_indices(indices, k)
        src = start + idx
        for a in self._kv:
            a[start : start + idx.size] = a[src]  # fancy index on the right: a copy first
        self._pos[start : start + idx.size] = self._pos[src]
        self._n = start + idx.size
        self._last = (start, idx.size)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._n:
            raise SparsedgeError(f"cannot truncate to {n}: cache holds {self._n}")
        self._n = n  # slots past n are masked out, and overwritten by the next forward
        self._last = None

    @property
    def cost_ks(self) -> tuple[int, ...]:
        """Token counts whose forward cost differs (decoding.speculative.measure_cost): each graph's
        size, and 2 (the first count a 1-token graph does not hold); t(k) is flat in between."""
        return tuple(sorted({1, 2} | {g.tokens for g in self._use}))

    @property
    def providers(self) -> list[str]:
        """Execution providers of the sessions (QNN first when on the NPU)."""
        return self.graphs[0].providers
