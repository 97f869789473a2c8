"""Corpora and the perplexity protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsedge import PplProtocol, SparsedgeError, data, perplexity
from tiny import tiny_tokenizer


def test_spans_are_disjoint_and_fixed():
    cal, ev = data.calibration_text(), data.evaluation_text()
    from pydoc_data.topics import topics

    cal_topics = {k for k, t in topics.items() if t in cal}
    ev_topics = {k for k, t in topics.items() if t in ev}
    assert cal_topics and ev_topics and not cal_topics & ev_topics
    assert len(cal_topics) + len(ev_topics) == len(topics)
    assert data.calibration_text() == cal and data.evaluation_text() == ev


def test_user_text_file_errors(tmp_path):
    with pytest.raises(SparsedgeError, match="no such text file"):
        data.read_text_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SparsedgeError, match="empty"):
        data.read_text_file(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SparsedgeError, match="UTF-8"):
        data.read_text_file(tmp_path / "bin.txt")


def test_perplexity_matches_a_direct_computation(tiny):
    """Chunked, cached windows give the same number as full-window transformers passes."""
    hf, rt = tiny
    tok = tiny_tokenizer()
    text = data.evaluation_text()[:20000]
    proto = PplProtocol(window=64, max_tokens=256, chunk=24)
    r = perplexity(rt, text=text, tokenizer=tok, protocol=proto, progress=False)
    ids = data.tokenize(tok, text)[:256]
    nll = []
    for w in ids.reshape(4, 64):
        logits = hf(torch.from_numpy(w)[None]).logits[0, :-1].double()
        nll.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(w[1:])).item())
    assert r.eval_tokens == 4 * 63
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_perplexity_needs_one_window(tiny):
    _, rt = tiny
    with pytest.raises(SparsedgeError, match="fewer than one window"):
        perplexity(rt, text="short", tokenizer=tiny_tokenizer(), protocol=PplProtocol(64, 64), progress=False)
    with pytest.raises(SparsedgeError, match="protocol"):
        PplProtocol(window=512, max_tokens=100)
