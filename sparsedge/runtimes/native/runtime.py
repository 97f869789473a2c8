"""NativeRuntime: the Runtime protocol (DESIGN.md §2) over the C kernels, one C call per forward.

    rt = NativeRuntime("model.q4_0.gguf", threads=2)            # the file's recipe, if it has one
    rt = NativeRuntime("model.q4_0.gguf", recipe=False)          # dense
    rt = NativeRuntime("model.q4_0.gguf", skip="always")         # recipe's work skipped (loader.SKIP_MODES)
    logits = rt.forward(tokens, positions, tree_mask)            # [k, vocab] float32

The KV cache lives in numpy arrays owned here ([layers, kv_heads, capacity, head_dim], float32,
grown by doubling); ``keep`` compacts it in numpy, the C step only appends.
"""

from __future__ import annotations

import ctypes as C
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import SparsedgeError
from ..base import check_forward_args, check_keep_indices
from . import _lib
from .loader import NativeModel


class NativeRuntime:
    name = "native"

    def __init__(self, gguf_path: str | Path, threads: int | None = None, recipe: Any = None,
                 n_ctx: int = 512, stats: bool = False, r8: bool | None = None, skip: str = "auto"):
        self.lib = _lib.lib()
        self.model = NativeModel.load(gguf_path, recipe=recipe, r8=r8, skip=skip)
        self.spec = self.model.spec
        self.threads = int(threads) if threads else max(1, os.cpu_count() or 1)
        if self.threads < 1:
            raise SparsedgeError("threads must be positive")
        self._stats = _lib.Stats() if stats else None
        self._cache = _lib.Cache()
        self._alloc(max(16, int(n_ctx)))
        self._n = 0
        self._last: tuple[int, int] | None = None

    # ---------------------------------------------------------------- info
    @property
    def n_past(self) -> int:
        return self._n

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def recipe(self):
        return self.model.recipe

    @property
    def kernels(self) -> str:
        return _lib.level()

    def memory(self) -> dict[str, int]:
        m = dict(self.model.memory)
        m["kv_cache"] = self.kc.nbytes + self.vc.nbytes
        return m

    def achieved_sparsity(self) -> dict[str, float]:
        """Zeroed fraction per recipe site since construction (needs stats=True)."""
        if self._stats is None:
            raise SparsedgeError("construct the runtime with stats=True to count skipped work")
        s = self._stats
        return {site: s.zeroed[i] / s.seen[i] for i, site in enumerate(_lib.SITES) if s.seen[i]}

    # ---------------------------------------------------------------- cache
    def _alloc(self, cap: int) -> None:
        s = self.spec
        shape = (s.n_layers, s.n_kv_heads, cap, s.head_dim)
        kc, vc, pos = np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(cap, np.int32)
        if hasattr(self, "kc"):
            used = self._n
            kc[:, :, :used], vc[:, :, :used], pos[:used] = self.kc[:, :, :used], self.vc[:, :, :used], self.pos[:used]
        self.kc, self.vc, self.pos, self.cap = kc, vc, pos, cap
        self._cache.kc, self._cache.vc, self._cache.pos = kc.ctypes.data, vc.ctypes.data, pos.ctypes.data
        self._cache.cap = cap

    # ---------------------------------------------------------------- protocol
    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, self._n, self.vocab_size)
        k = toks.shape[0]
        if pos.min() < 0 or pos.max() >= 2**31:
            raise SparsedgeError("positions must lie in 0 .. 2^31-1")
        if self._n + k > self.cap:
            self._alloc(max(self._n + k, 2 * self.cap))
        t32 = np.ascontiguousarray(toks, dtype=np.int32)
        p32 = np.ascontiguousarray(pos, dtype=np.int32)
        m8 = np.ascontiguousarray(mask, dtype=np.uint8)
        out = np.empty((k, self.vocab_size), dtype=np.float32)
        self._cache.n = self._n
        rc = self.lib.se_forward(C.byref(self.model.c_model), C.byref(self._cache), k, t32.ctypes.data,
                                 p32.ctypes.data, m8.ctypes.data, out.ctypes.data, self.threads,
                                 None if self._stats is None else C.byref(self._stats))
        if rc:
            raise SparsedgeError(f"native forward failed (code {rc}: {'out of memory' if rc == 1 else 'cache'})")
        self._last = (self._n, k)
        self._n += k
        return out

    def keep(self, indices: Sequence[int]) -> None:
        if self._last is None:
            raise SparsedgeError("keep() must follow a forward()")
        start, k = self._last
        idx = check_keep_indices(indices, k)
        src = start + idx
        dst = slice(start, start + idx.size)
        self.kc[:, :, dst] = self.kc[:, :, src]
        self.vc[:, :, dst] = self.vc[:, :, src]
        self.pos[dst] = self.pos[src]
        self._n = start + idx.size
        self._last = (start, idx.size)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._n:
            raise SparsedgeError(f"cannot truncate to {n}: cache holds {self._n}")
        self._n = n
        self._last = None

    def reset(self) -> None:
        self.truncate(0)
