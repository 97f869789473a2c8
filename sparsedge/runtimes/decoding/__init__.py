"""Decoding on any Runtime: plain generation, and speculative / draft-tree decoding with drafters
behind a registry (drafters/), trees as data (tree.py) and lossless acceptance rules (accept.py)."""

from .drafters import Drafter, Target, make_drafter
from .generate import GenerationConfig, GenerationStats, generate, prefill
from .sampling import Sampler, SamplingConfig, probs
from .speculative import SpecConfig, SpecStats, measure_cost, speculative_generate
from .tree import CostCurve, Draft

__all__ = ["GenerationConfig", "GenerationStats", "generate", "prefill", "Sampler", "SamplingConfig", "probs",
           "SpecConfig", "SpecStats", "speculative_generate", "measure_cost", "CostCurve", "Draft", "Drafter",
           "Target", "make_drafter"]


def prompt_suite() -> list[dict]:
    """The repository's prompt suite for decoding benchmarks and tests: chat questions, code
    writing, code editing that repeats its input, summaries and rewrites of a given passage, free
    text. Each entry: id, kind, prompt, chat (default true: wrap in the chat template)."""
    import json
    from pathlib import Path

    items = json.loads((Path(__file__).parent / "prompts.json").read_text())
    return [{"chat": True, **it} for it in items]


__all__.append("prompt_suite")
