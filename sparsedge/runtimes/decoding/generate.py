"""Plain autoregressive generation on any Runtime, streaming tokens as they come."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ...errors import SparsedgeError
from .sampling import Sampler, SamplingConfig

PREFILL_CHUNK = 256  # prompt tokens per forward: bounds the logits buffer [chunk, vocab]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SparsedgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.seed)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: bool = False  # hit a stop token (not the length limit)
    tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def prefill(runtime, prompt: np.ndarray) -> np.ndarray:
    """Forward the whole prompt; return the logits [vocab] of its last position."""
    logits = None
    for s in range(0, len(prompt), PREFILL_CHUNK):
        logits = runtime.forward(prompt[s : s + PREFILL_CHUNK])
    return logits[-1]


def generate(
    runtime, prompt_ids: Sequence[int], cfg: GenerationConfig, stats: GenerationStats | None = None
) -> Iterator[int]:
    """Yield new tokens one by one. The runtime's cache is reset first and holds the text after."""
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.size == 0:
        raise SparsedgeError("the prompt is empty")
    st = stats if stats is not None else GenerationStats()
    st.prompt_tokens = int(prompt.size)
    sample = Sampler(cfg.sampling)
    stop = set(cfg.stop_ids)
    runtime.reset()
    t0 = time.perf_counter()
    logits = prefill(runtime, prompt)
    tok = sample(logits)
    st.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    produced = 0  # this call's count (``st`` may be shared across calls and accumulate)
    while True:
        produced += 1
        st.new_tokens += 1
        st.tokens.append(tok)
        if tok in stop:
            st.stopped = True
        st.decode_s = time.perf_counter() - t1
        yield tok
        if st.stopped or produced >= cfg.max_new_tokens:
            return
        tok = sample(runtime.forward([tok])[0])
