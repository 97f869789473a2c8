"""What skipping inactive weights can gain on this machine's memory system.

    python benchmarks/skip_bandwidth.py [--mb 64] [--sparsity 0.5] [--json]

Activation sparsity turns into speed only if reading a random subset of a weight matrix's
channels costs less than reading all of it. Weights never fit in cache (SmolLM2-135M Q4_0 is
90 MB), and the channels a token skips are scattered (DESIGN.md §3: 32-neuron blocks are almost
never inactive as a whole), so what counts is how fast the memory system serves many short
reads, each a channel's contiguous slice, in ascending order with gaps. Two measurements, each
against the dense case in the same run:

1. memory alone (the native library's se_read_chunks probe: plain loads, no compute): a buffer of
   ``--mb`` MB cut into chunks; reading every chunk in order (one sequential stream) against
   reading a random ``1 - sparsity`` of them in ascending order, for chunk sizes from a Q4_0
   channel slice of one thread (144 bytes: 288 rows) to 16 KB;
2. the native kernels: 120 distinct 1536 x 576 Q4_0 matrices (out of every cache), one thread:
   the dense R8 kernel on a dense input against the channel-skipping COL kernel on an input with
   ``sparsity`` of its channels zero (random, or the first half of every 32-channel block).

A ratio below 1 in the ``skip / dense`` columns means skipping is slower than reading everything.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import numpy as np


def _best(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory(mb: int, sparsity: float, chunks=(144, 384, 768, 4096, 16384)) -> list[dict]:
    from sparsedge.runtimes.native import _lib

    lib = _lib.lib()
    rng = np.random.default_rng(0)
    buf = np.ones(mb << 20, np.uint8)
    rows = []
    for ch in chunks:
        n = buf.size // ch
        every = np.arange(n, dtype=np.int64) * ch
        some = every[rng.random(n) >= sparsity]  # ascending

        def read(off):
            return lambda: lib.se_read_chunks(buf.ctypes.data, off.ctypes.data, off.size, ch)

        t_all, t_some = _best(read(every)), _best(read(some))
        rows.append({"chunk_bytes": ch, "dense_GBps": round(n * ch / t_all / 1e9, 1),
                     "skip_GBps": round(some.size * ch / t_some / 1e9, 1),
                     "skip_over_dense_speed": round(t_all / t_some, 2)})
    return rows


def kernels(sparsity: float, n_mats: int = 120) -> dict:
    from sparsedge.runtimes.native import _lib
    from sparsedge.runtimes.native.loader import to_col, to_r8, weight_from_raw

    import gguf

    rng = np.random.default_rng(0)
    rows, cols = 1536, 576
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    base = weight_from_raw("Q4_0", gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), rows, cols)
    r8, col = to_r8(base), to_col(base)
    # distinct copies: the set (~60 MB) is out of every cache, as a model's weights are
    keep_alive = [type(m)(m.type, m.layout, m.rows, m.cols, m.q.copy(), m.d.copy()) for m in (r8, col)
                  for _ in range(n_mats)]
    mats_r8 = [m.mat() for m in keep_alive[:n_mats]]
    mats_col = [m.mat() for m in keep_alive[n_mats:]]
    lib = _lib.lib()
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x_rand = np.where(rng.random((1, cols)) < sparsity, 0, x).astype(np.float32)
    x_half = x.copy()
    x_half.reshape(-1, 32)[:, 16:] = 0
    y = np.empty((1, rows), np.float32)

    def run(mats, xin):
        xp, yp = xin.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p)
        return lambda: [lib.se_matmul(ctypes.byref(m), 1, xp, yp, None, 1) for m in mats]

    t = {"dense_r8": _best(run(mats_r8, x)), "col_random": _best(run(mats_col, x_rand)),
         "col_half_blocks": _best(run(mats_col, x_half)), "col_all_active": _best(run(mats_col, x))}
    us = {k: round(v / n_mats * 1e6, 1) for k, v in t.items()}
    return {"us_per_matrix": us, "sparsity": sparsity,
            "col_random_over_dense_speed": round(t["dense_r8"] / t["col_random"], 2),
            "col_half_blocks_over_dense_speed": round(t["dense_r8"] / t["col_half_blocks"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="buffer size for the memory test (default 64)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not 0 < a.sparsity < 1:
        ap.error("--sparsity must be in (0, 1)")
    out = {"memory": memory(a.mb, a.sparsity), "kernels": kernels(a.sparsity)}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"memory, random {1 - a.sparsity:.0%} of the chunks vs all of them:", file=sys.stderr)
    for r in out["memory"]:
        print(f"  chunk {r['chunk_bytes']:6d} B  dense {r['dense_GBps']:5.1f} GB/s  skip {r['skip_GBps']:5.1f} GB/s"
              f"  skip/dense speed {r['skip_over_dense_speed']:.2f}x", file=sys.stderr)
    k = out["kernels"]
    print(f"kernels, 1536x576 Q4_0 out of cache, 1 thread, sparsity {a.sparsity}: {k['us_per_matrix']} us; "
          f"COL random / R8 dense speed {k['col_random_over_dense_speed']:.2f}x, "
          f"COL half-blocks {k['col_half_blocks_over_dense_speed']:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
