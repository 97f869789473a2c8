"""ctypes binding of the C library (sparsedge_native.c): struct mirrors and function signatures.

One C call per forward (``se_forward`` runs every layer), so the binding's cost is paid once per
step. The library is the package's own extension, built by ``pip install`` (setup.py); it holds no
Python C API code, only a plain C ABI.
"""

from __future__ import annotations

import ctypes as C
import importlib.machinery
import os
from pathlib import Path

from ...errors import SparsedgeError

SITES = ("qkv_in", "q_in", "o_in", "ffn_in", "gate_act", "down_in")  # C enum order
TYPES = {"F32": 0, "Q8_0": 1, "Q4_0": 2}
ROW, COL, R8 = 0, 1, 2
LEVELS = {0: "scalar", 1: "avx2+fma", 2: "neon", 3: "avx2+fma+avx512vnni"}


class Mat(C.Structure):
    _fields_ = [("type", C.c_int32), ("layout", C.c_int32), ("rows", C.c_int32), ("cols", C.c_int32),
                ("q", C.c_void_p), ("d", C.c_void_p)]


class Layer(C.Structure):
    _fields_ = [(n, Mat) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (n, C.c_void_p) for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm",
                                  "q_bias", "k_bias", "v_bias")  # biases: NULL when absent
    ] + [("th", C.c_void_p * 6), ("th_n", C.c_int32 * 6), ("theta", C.c_float), ("window", C.c_int32)]


class Model(C.Structure):
    _fields_ = [(n, C.c_int32) for n in ("n_layers", "hidden", "ffn", "n_heads", "n_kv", "head_dim", "vocab",
                                          "act", "rope_neox", "qk_norm", "sandwich")] + [
        (n, C.c_float) for n in ("eps", "scale", "embed_scale", "rope_factor", "softcap")
    ] + [("embed", Mat), ("lm_head", Mat), ("out_norm", C.c_void_p), ("layers", C.POINTER(Layer))]


class Cache(C.Structure):
    _fields_ = [("kc", C.c_void_p), ("vc", C.c_void_p), ("pos", C.c_void_p), ("cap", C.c_int32), ("n", C.c_int32)]


class Stats(C.Structure):
    _fields_ = [("seen", C.c_int64 * 6), ("zeroed", C.c_int64 * 6)]


_LIB = None
# how long a thread spins at a barrier before sleeping, in libgomp's units (see lib())
SPINCOUNT = "300"


def library_path() -> Path:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_sparsedge_native{suffix}"
        if p.is_file():
            return p
    raise SparsedgeError(
        "the native runtime's C library is not built; install sparsedge with pip "
        "(an editable checkout: pip install -e . --no-build-isolation)"
    )


def lib() -> C.CDLL:
    global _LIB
    if _LIB is None:
        path = str(library_path())
        # A decoder step crosses about 180 barriers (6 per layer); how a thread waits at them
        # decides the speed. The forward's own barriers adapt (se_barrier in the C source: a spin
        # window that grows or shrinks with what the waits find, no spin on a contended core,
        # OMP_WAIT_POLICY honoured). libgomp's wait, read once when it loads, is left for the
        # fork / join around each forward, where its long default spin would burn the slice a
        # descheduled peer needs (2 threads on a shared CPU: 3 tok/s vs 40 passive) and passive
        # pays a wake-up per forward: a short spin unless the user chose (OMP_WAIT_POLICY or
        # GOMP_SPINCOUNT).
        chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
        if not chosen:
            os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        try:
            L = C.CDLL(path)
        finally:
            if not chosen:
                del os.environ["GOMP_SPINCOUNT"]
        vp, i32, f32 = C.c_void_p, C.c_int, C.c_float
        L.se_set_level.argtypes, L.se_set_level.restype = [i32], i32
        L.se_level.argtypes, L.se_level.restype = [], i32
        L.se_max_threads.argtypes, L.se_max_threads.restype = [], i32
        L.se_forward.argtypes = [C.POINTER(Model), C.POINTER(Cache), i32, vp, vp, vp, vp, i32, C.POINTER(Stats)]
        L.se_forward.restype = i32
        L.se_quant_q8.argtypes, L.se_quant_q8.restype = [vp, i32, vp, vp, vp, vp], None
        L.se_prefers_r8.argtypes, L.se_prefers_r8.restype = [], i32
        L.se_profile.argtypes, L.se_profile.restype = [i32, vp], None
        L.se_wait_mode.argtypes, L.se_wait_mode.restype = [i32], i32
        L.se_matmul.argtypes, L.se_matmul.restype = [C.POINTER(Mat), i32, vp, vp, vp, i32], i32
        L.se_rmsnorm.argtypes, L.se_rmsnorm.restype = [vp, vp, vp, i32, i32, f32], None
        L.se_rope.argtypes, L.se_rope.restype = [vp, i32, i32, i32, vp, f32, f32, i32], None
        L.se_act.argtypes, L.se_act.restype = [vp, i32, i32], None
        L.se_dequant_row.argtypes, L.se_dequant_row.restype = [C.POINTER(Mat), i32, vp], None
        L.se_read_chunks.argtypes, L.se_read_chunks.restype = [vp, vp, C.c_int64, C.c_int64], C.c_uint64
        L.se_attend.argtypes, L.se_attend.restype = [vp, vp, vp, vp, i32, i32, f32, vp, vp], i32
        _LIB = L
    return _LIB


def set_level(level: int | None) -> str:
    """Kernel path: None = best the CPU supports (SPARSEDGE_NATIVE_SCALAR=1 forces scalar), 0 = scalar,
    1 = AVX2+FMA alone, 3 = AVX2+FMA with the AVX512-VNNI k-token products (bit-identical to 1)."""
    return LEVELS[lib().se_set_level(-1 if level is None else int(level))]


def wait_mode(mode: str | None = None) -> str:
    """How a forward's threads wait at its barriers: "adaptive" (sparsedge's: spin a window that
    adapts, sleep on a futex, no spin on a contended core) or "openmp" (libgomp's barrier, as set by
    GOMP_SPINCOUNT / OMP_WAIT_POLICY). None only reads; returns the mode before the call."""
    modes = ("adaptive", "openmp")
    if mode is not None and mode not in modes:
        raise SparsedgeError(f"unknown wait mode {mode!r} (known: {', '.join(modes)})")
    return modes[lib().se_wait_mode(-1 if mode is None else modes.index(mode))]


def level() -> str:
    return LEVELS[lib().se_level()]


def prefers_r8() -> bool:
    """Whether this CPU has SIMD kernels for the R8 layout (8 interleaved rows; AVX2 + FMA)."""
    return bool(lib().se_prefers_r8())


PHASES = ("embed", "norm", "qkv", "rope", "attention", "o", "gate_up", "down", "lm_head")


def profile(on: bool | None = None) -> dict[str, float]:
    """CPU seconds per phase of the forward (thread 0's own share) summed since the last reset.
    on=True/False resets the sums and switches timing on/off; None only reads."""
    import numpy as np

    out = np.zeros(len(PHASES), np.float64)
    lib().se_profile(-1 if on is None else int(on), out.ctypes.data)
    return dict(zip(PHASES, out.tolist()))
