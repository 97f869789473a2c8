"""Turning logits into tokens: greedy, temperature, top-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import SparsedgeError


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SparsedgeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SparsedgeError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution sampling draws from, float64 [vocab] (top-p renormalised)."""
    z = logits.astype(np.float64) / cfg.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cum, cfg.top_p - 1e-12)) + 1  # tolerance: mass exactly at top_p
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """One token from logits [vocab]."""
        if self.cfg.greedy:
            return int(np.argmax(logits))
        p = probs(logits, self.cfg)
        return int(self.rng.choice(p.shape[0], p=p))
