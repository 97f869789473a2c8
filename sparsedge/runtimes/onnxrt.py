"""The ONNX Runtime runtime: a graph written by sparsedge.export.onnx, run with an explicit KV cache.

The cache lives between calls as ONNX Runtime values (``present`` of one call is ``past`` of the
next, never copied through numpy) plus the position of every entry, from which ``forward`` builds
the additive attention biases [1, 1, k, n_past + k]: the tree mask over the new tokens (every
earlier entry visible) and, for sliding-window layers, q_pos - k_pos < window, exactly as
sparsedge.runtimes.torch_model does. Batch size 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..arch import ModelSpec
from ..errors import SparsedgeError
from .base import additive_bias, check_forward_args, check_keep_indices


def _session(path: Path, providers: Sequence[str], threads: int | None, provider_options=None,
             spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    # ONNX Runtime's worker threads spin between the ~1000 small ops of a decode step by default;
    # on a machine with other work (measured here, 2 cores, load 6) that costs 35-40% of int4
    # decode speed (34 vs 55 tok/s), so they sleep unless asked to spin.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise SparsedgeError(
            f"execution provider {missing[0]} is not available (available: {', '.join(ort.get_available_providers())})"
        )
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers),
                                    provider_options=provider_options)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparsedgeError(f"{path} is not an ONNX model ONNX Runtime can load: {msg}") from e


class OnnxRuntime:
    """Runtime protocol over an ONNX decoder graph (sparsedge.export.onnx layout), batch size 1.

    spec: the model spec (default: the one the exporter stored in the graph's metadata).
    providers / provider_options: ONNX Runtime execution providers, CPU by default.
    threads: intra-op threads (default: ONNX Runtime's choice). spinning: let idle worker threads
    spin (lower latency on an otherwise idle machine; see _session for why it is off by default).
    batch_invariant: run every 1-token forward as a 2-token one (the token twice, the copy seeing
    only itself, then dropped), so that plain decoding uses the same kernels as k-token
    verification. Needed where a graph's kernels differ by batch size: MatMulNBits at accuracy
    level 4 computes M = 1 with another kernel than M > 1 (0.6 logits apart on SmolLM2 int4), which
    would make speculative output differ from plain greedy. None (default): probe at load and pad
    only if the 1-token and 2-token results differ.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        spec: ModelSpec | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        provider_options=None,
        spinning: bool = False,
        batch_invariant: bool | None = None,
    ):
        import onnxruntime as ort

        path = Path(onnx_path).expanduser()
        if not path.is_file():
            raise SparsedgeError(f"no such ONNX model file: {onnx_path}")
        self.path = path
        self.session = _session(path, providers, threads, provider_options, spinning)
        meta = self.session.get_modelmeta().custom_metadata_map
        if spec is None:
            if "sparsedge.spec" not in meta:
                raise SparsedgeError(f"{path} carries no sparsedge model spec; pass spec=")
            spec = ModelSpec.from_dict(json.loads(meta["sparsedge.spec"]))
        self.spec = spec
        self.mask_value = np.float32(float(meta.get("sparsedge.mask_value", -1e4)))
        self._check_signature()
        self._ort = ort
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._sliding = "sliding_attention_bias" in self._inputs
        self._pad = False
        self.reset()
        self._pad = self._kernels_differ_by_batch() if batch_invariant is None else bool(batch_invariant)
        # Tree verification is exact (each node's logits equal a sequential run's) when the kernels
        # are batch-invariant. With int8-activation kernels it is not: a tree node's attention sums
        # its visible entries in other SIMD lanes than a chain does (1e-5 apart), and requantizing
        # those activations to int8 flips roundings that grow to ~0.3 logits over 30 layers. Chains
        # stay exact (their rows are a prefix), so decoding verifies chains on such a graph.
        self.exact_trees = not self._pad

    def _kernels_differ_by_batch(self) -> bool:
        """Does the last of two tokens get other logits from one 2-token forward than from two
        1-token forwards? (fp32 graphs: ~1e-5 apart; int4 at accuracy level 4: ~0.5.)"""
        toks = [min(1, self.vocab_size - 1), min(2, self.vocab_size - 1)]
        two = self.forward(toks)[1]
        self.reset()
        self.forward(toks[:1])
        one = self.forward(toks[1:])[0]
        self.reset()
        return bool(np.abs(two - one).max() > 1e-3 * max(1.0, float(np.abs(two).max())))
    def _check_signature(self) -> None:
        s = self.spec
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        want = ["input_ids", "position_ids", "attention_bias"]
        want += [f"past_key_values.{i}.{kv}" for i in range(s.n_layers) for kv in ("key", "value")]
        missing = [n for n in want if n not in self._inputs]
        if missing:
            raise SparsedgeError(
                f"{self.path} is not a sparsedge decoder graph for this model (no input {missing[0]!r})"
            )
        kv = self._inputs["past_key_values.0.key"].shape
        if kv[1] != s.n_kv_heads or kv[3] != s.head_dim:
            raise SparsedgeError(
                f"{self.path} has KV inputs {kv}, the model spec wants {s.n_kv_heads} heads of {s.head_dim}"
            )
        if any(s.window(i) is not None for i in range(s.n_layers)) and "sliding_attention_bias" not in self._inputs:
            raise SparsedgeError(f"{self.path} has no sliding_attention_bias input but the model has sliding layers")

    # ---- state -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return int(self._pos.shape[0])

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def _ortvalue(self, a: np.ndarray):
        # an OrtValue wraps the array's memory (no copy): the arrays handed here are fresh and the
        # OrtValue is what keeps them alive
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))

    def reset(self) -> None:
        s = self.spec
        empty = np.zeros((1, s.n_kv_heads, 0, s.head_dim), dtype=np.float32)
        self._kv = [self._ortvalue(empty) for _ in range(2 * s.n_layers)]
        self._pos = np.zeros(0, dtype=np.int64)
        self._last: tuple[int, int] | None = None

    def _set_kv(self, arrays: list[np.ndarray], pos: np.ndarray) -> None:
        self._kv = [self._ortvalue(a) for a in arrays]
        self._pos = pos

    # ---- protocol ----------------------------------------------------------------------------
    def _bias(self, allowed: np.ndarray) -> np.ndarray:
        """bool [k, total] -> additive float32 [1, 1, k, total]."""
        return additive_bias(allowed, self.mask_value)

    def _feed(self, tokens, positions, tree_mask) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The non-cache graph inputs of a forward, and the positions of all entries after it."""
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, self.n_past, self.vocab_size)
        start, k = self.n_past, toks.shape[0]
        all_pos = np.concatenate([self._pos, pos])
        vis = np.ones((k, start + k), dtype=bool)  # [k, n_past + k]: every earlier entry, then the tree
        vis[:, start:] = mask
        feed = {"input_ids": toks[None], "position_ids": pos[None], "attention_bias": self._bias(vis)}
        if self._sliding:  # key visible if q_pos - k_pos < window, as torch_model does
            win = self.spec.sliding_window
            feed["sliding_attention_bias"] = self._bias(vis & ((pos[:, None] - all_pos[None, :]) < win))
        return feed, all_pos

    def _past_names(self):
        for i in range(self.spec.n_layers):
            yield 2 * i, f"past_key_values.{i}.key"
            yield 2 * i + 1, f"past_key_values.{i}.value"

    def inputs(self, tokens, positions=None, tree_mask=None) -> dict[str, np.ndarray]:
        """The numpy inputs ``forward`` would feed the graph, without running it (for calibration
        readers, and for checking another runtime against this one). Arrays are copies."""
        feed, _ = self._feed(tokens, positions, tree_mask)
        for j, name in self._past_names():
            feed[name] = np.array(self._kv[j].numpy(), copy=True)
        return feed

    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        if self._pad and np.asarray(tokens).size == 1:
            pos = self.n_past if positions is None else int(np.asarray(positions).reshape(-1)[0])
            logits = self._forward(np.repeat(np.asarray(tokens, dtype=np.int64).reshape(-1), 2), [pos, pos],
                                   np.eye(2, dtype=bool))[:1]
            start = self._last[0]
            self._set_kv([v.numpy()[:, :, : start + 1] for v in self._kv], self._pos[: start + 1])
            self._last = (start, 1)
            return logits
        return self._forward(tokens, positions, tree_mask)

    def _forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        start = self.n_past
        arrays, all_pos = self._feed(tokens, positions, tree_mask)
        feed = {name: self._ortvalue(a) for name, a in arrays.items()}
        for j, name in self._past_names():
            feed[name] = self._kv[j]
        out = self.session.run_with_ort_values(self._outputs, feed)
        self._kv = list(out[1:])  # present -> next past, kept inside ONNX Runtime
        self._pos = all_pos
        self._last = (start, all_pos.shape[0] - start)
        return np.array(out[0].numpy()[0], dtype=np.float32, copy=True)

    def keep(self, indices: Sequence[int]) -> None:
        if self._last is None:
            raise SparsedgeError("keep() must follow a forward()")
        start, k = self._last
        idx = check_keep_indices(indices, k)
        sel = np.concatenate([np.arange(start), start + idx])
        self._set_kv([v.numpy()[:, :, sel] for v in self._kv], self._pos[sel])  # fancy index: copies
        self._last = (start, idx.size)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise SparsedgeError(f"cannot truncate to {n}: cache holds {self.n_past}")
        if n < self.n_past:
            self._set_kv([np.array(v.numpy()[:, :, :n], copy=True) for v in self._kv], self._pos[:n])
        self._last = None
