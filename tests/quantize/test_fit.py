"""fit_blocks, the int4 kind's block quantizer, against plain round-to-nearest on the same blocks."""

import numpy as np

from sparsedge.quantize.onnx import fit_blocks


def _rtn_asym(w: np.ndarray) -> np.ndarray:
    """Squared error per block of min/max asymmetric round-to-nearest with a float zero point."""
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    a = np.where(hi > lo, hi - lo, 1.0) / 15
    q = np.clip(np.rint((w - lo) / a), 0, 15)
    return ((a * q + lo - w) ** 2).sum(1)


def _check(w, q, scale, zero, err):
    assert q.dtype == np.int32 and q.min() >= 0 and q.max() <= 15
    deq = (q - zero[:, None]) * scale[:, None]
    np.testing.assert_allclose(((deq - w) ** 2).sum(1), err, rtol=1e-6, atol=1e-12)


def test_recovers_an_asymmetric_4bit_grid_exactly():
    # Q4_1-style blocks: w = d q + m with q in 0..15; some blocks use fewer levels (max q < 15),
    # where min/max rounding is off the grid and only the fitted level count lands on it
    rng = np.random.default_rng(0)
    d = rng.uniform(1e-3, 5e-2, (400, 1))
    m = rng.uniform(-0.5, 0.0, (400, 1))
    top = rng.choice([15, 15, 14, 13, 12], (400, 1))
    q = np.minimum(rng.integers(0, 16, (400, 32)), top)
    q[:, 0], q[:, 1] = 0, top[:, 0]  # each block spans 0..top
    w = (d * q + m).astype(np.float32)
    got = fit_blocks(w)
    _check(w.astype(np.float64), *got)
    rel = np.sqrt(got[3].sum() / (w.astype(np.float64) ** 2).sum())
    assert rel < 1e-6
    assert (_rtn_asym(w.astype(np.float64)) > 1e-8).sum() > 50  # RTN is off the grid on those blocks


def test_never_worse_than_round_to_nearest():
    rng = np.random.default_rng(1)
    w = np.concatenate([rng.standard_normal((300, 32)), rng.standard_t(3, (300, 32))])
    w[5] = 0.25  # a constant block
    q, scale, zero, err = fit_blocks(w)
    _check(w, q, scale, zero, err)
    base = _rtn_asym(w)
    assert np.all(err <= base + 1e-12)
    assert err.sum() < 0.9 * base.sum()  # the refit gains on gaussian blocks too
    assert err[5] < 1e-20
