"""Plain generation and sampling on the Runtime protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedge import GenerationConfig, SparsedgeError, generate
from sparsedge.runtimes.decoding import GenerationStats, SamplingConfig, probs


def test_greedy_equals_transformers_generate(tiny):
    hf, rt = tiny
    prompt = [5, 17, 33, 2, 9]
    ours = list(generate(rt, prompt, GenerationConfig(max_new_tokens=20)))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_stop_token_ends_generation(tiny):
    _, rt = tiny
    prompt = [5, 17, 33]
    free = list(generate(rt, prompt, GenerationConfig(max_new_tokens=10)))
    st = GenerationStats()
    stopped = list(generate(rt, prompt, GenerationConfig(max_new_tokens=10, stop_ids=(free[3],)), st))
    assert stopped == free[: free.index(free[3]) + 1] and st.stopped


def test_sampling_is_seeded(tiny):
    _, rt = tiny
    cfg = GenerationConfig(max_new_tokens=15, temperature=1.0, seed=123)
    a = list(generate(rt, [3, 4, 5], cfg))
    b = list(generate(rt, [3, 4, 5], cfg))
    c = list(generate(rt, [3, 4, 5], GenerationConfig(max_new_tokens=15, temperature=1.0, seed=7)))
    assert a == b and a != c


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], atol=1e-12)
    p = probs(logits, SamplingConfig(temperature=1.0, top_p=0.81))
    np.testing.assert_allclose(p, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-12)


def test_sampler_follows_the_distribution():
    """Empirical frequencies match softmax(logits / T): chi-square, df = 3, false alarm 1e-3."""
    from sparsedge.runtimes.decoding import Sampler

    logits = np.array([2.0, 1.0, 0.5, -1.0])
    cfg = SamplingConfig(temperature=0.7, seed=11)
    sample, n = Sampler(cfg), 20000
    counts = np.bincount([sample(logits) for _ in range(n)], minlength=4)
    expected = n * probs(logits, cfg)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, expected)  # chi-square 0.999 quantile at 3 degrees of freedom


def test_bad_configs():
    with pytest.raises(SparsedgeError):
        SamplingConfig(temperature=-1)
    with pytest.raises(SparsedgeError):
        SamplingConfig(temperature=1, top_p=0)
    with pytest.raises(SparsedgeError):
        GenerationConfig(max_new_tokens=0)
