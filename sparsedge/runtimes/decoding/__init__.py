"""Decoding on any Runtime: plain generation now; speculative and draft-tree decoding build on it."""

from .generate import GenerationConfig, GenerationStats, generate, prefill
from .sampling import Sampler, SamplingConfig, probs

__all__ = ["GenerationConfig", "GenerationStats", "generate", "prefill", "Sampler", "SamplingConfig", "probs"]
