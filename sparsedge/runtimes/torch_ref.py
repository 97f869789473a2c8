"""The torch reference runtime: the numerical oracle every other runtime is tested against."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..arch import ModelSpec
from ..errors import SparsedgeError
from .base import check_forward_args, check_keep_indices
from .torch_model import Decoder, KVCache, check_shapes


class TorchRuntime:
    """Runtime protocol over sparsedge's torch Decoder, fp32 by default, batch size 1."""

    name = "torch"

    def __init__(
        self,
        spec: ModelSpec,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        skip_layers: Sequence[int] = (),
    ):
        if threads:
            torch.set_num_threads(int(threads))
        w = {k: v.to(dtype) for k, v in weights.items()}
        check_shapes(spec, w)
        self.spec = spec
        self.model = Decoder(spec, w)
        bad = [i for i in skip_layers if not 0 <= int(i) < spec.n_layers]
        if bad:
            raise SparsedgeError(f"cannot skip layers {bad}: the model has {spec.n_layers}")
        # layers left out of every forward (a layer-skipping draft model over the same weights);
        # their KV entries are never written nor read
        self.model.skip = frozenset(int(i) for i in skip_layers)
        self.cache = KVCache(spec, dtype)
        self._last: tuple[int, int] | None = None  # (start, k) of the last-appended entries

    @classmethod
    def from_loaded(cls, loaded, **opts) -> "TorchRuntime":
        return cls(loaded.spec, loaded.state_dict(), **opts)

    @property
    def n_past(self) -> int:
        return self.cache.n

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def forward(self, tokens, positions=None, tree_mask=None) -> np.ndarray:
        toks, pos, mask = check_forward_args(tokens, positions, tree_mask, self.n_past, self.vocab_size)
        start = self.cache.n
        logits = self.model(
            torch.from_numpy(toks), torch.from_numpy(pos), torch.from_numpy(mask), self.cache
        )
        self._last = (start, toks.shape[0])
        return logits.numpy()

    def keep(self, indices: Sequence[int]) -> None:
        if self._last is None:
            raise SparsedgeError("keep() must follow a forward()")
        start, k = self._last
        idx = check_keep_indices(indices, k)
        self.cache.compact(start, torch.from_numpy(idx))
        self.cache.n = start + idx.size
        self._last = (start, idx.size)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.cache.n:
            raise SparsedgeError(f"cannot truncate to {n}: cache holds {self.cache.n}")
        self.cache.n = n
        self._last = None

    def reset(self) -> None:
        self.truncate(0)
