"""GGUF quant types: a registry keyed by name, each reporting its error.

    f32, f16, q8_0, q4_0   quantized here in Python with gguf-py (``gguf.quants.quantize``)
    q4_k_m                 quantized by llama.cpp itself (``llama_model_quantize`` from llama-cpp-python)
                           from a temporary F32 GGUF: K-quant mixes are llama.cpp's own recipe

Which tensors are quantized follows llama.cpp: 1-D tensors (norms) stay F32, and so does a tensor
whose rows (the last numpy axis, ggml's ne0) are not a multiple of the type's block size. The output
projection — ``output`` or, with tied embeddings, ``token_embd`` — is the most sensitive weight;
llama.cpp gives it Q6_K in 4-bit files, which gguf-py cannot produce, so q4_0 stores it as Q8_0.

Every quantizer reports its error per tensor (DESIGN.md §5.8): the max abs error relative to
max |w| and the RMS error relative to RMS(w), measured by dequantizing what is stored
(``gguf.quants.dequantize``), then summarised over the quantized tensors (max and mean).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import SparsedgeError


@dataclass(frozen=True)
class GGUFQuant:
    name: str
    file_type: int  # gguf.LlamaFileType: general.file_type
    weight_type: str  # GGMLQuantizationType name of 2-D weights (Python quants)
    output_type: str  # type of the output projection (output, or token_embd when tied)
    llamacpp_ftype: int | None = None  # set: llama.cpp quantizes (LLAMA_FTYPE_*), from an F32 file
    description: str = ""

    @property
    def via_llamacpp(self) -> bool:
        return self.llamacpp_ftype is not None


# LlamaFileType values (gguf.LlamaFileType == llama.cpp's LLAMA_FTYPE_*), spelled as numbers so
# that the registry is plain data: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_Q4_K_M 15.
QUANTS: dict[str, GGUFQuant] = {
    q.name: q
    for q in (
        GGUFQuant("f32", 0, "F32", "F32", description="no quantization"),
        GGUFQuant("f16", 1, "F16", "F16", description="half precision"),
        GGUFQuant("q8_0", 7, "Q8_0", "Q8_0", description="8-bit, blocks of 32 with an f16 scale"),
        GGUFQuant("q4_0", 2, "Q4_0", "Q8_0",
                  description="4-bit, blocks of 32 with an f16 scale; output projection Q8_0"),
        GGUFQuant("q4_k_m", 15, "Q4_K", "Q6_K", llamacpp_ftype=15,
                  description="llama.cpp's Q4_K_M mix (Q4_K, some Q6_K), quantized by llama.cpp"),
    )
}


def check_quant(name: str) -> GGUFQuant:
    """The registered quant type, or a SparsedgeError listing the known ones."""
    q = QUANTS.get(str(name).lower()) if isinstance(name, str) else None
    if q is None:
        raise SparsedgeError(f"unknown GGUF quant type {name!r} (known: {', '.join(QUANTS)})")
    return q


def _qtype(type_name: str):
    import gguf

    return gguf.GGMLQuantizationType[type_name]


def tensor_type(quant: GGUFQuant, shape: tuple[int, ...], is_output: bool) -> str:
    """The GGML type a tensor of this (numpy) shape gets under ``quant`` (Python quants)."""
    import gguf

    if len(shape) < 2:
        return "F32"
    name = quant.output_type if is_output else quant.weight_type
    block, _ = gguf.GGML_QUANT_SIZES[_qtype(name)]
    if shape[-1] % block:
        return "F32"
    return name


def tensor_error(ref: np.ndarray, deq: np.ndarray) -> dict[str, float]:
    """Max abs error relative to max |w| and RMS error relative to RMS(w), in float64."""
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    d = np.asarray(deq, dtype=np.float64).reshape(-1)
    if r.shape != d.shape:
        raise SparsedgeError(f"dequantized tensor has {d.size} values for {r.size}")
    err = d - r
    max_w = float(np.abs(r).max()) if r.size else 0.0
    rms_w = float(np.sqrt(np.mean(r * r))) if r.size else 0.0
    max_e = float(np.abs(err).max()) if r.size else 0.0
    rms_e = float(np.sqrt(np.mean(err * err))) if r.size else 0.0
    return {
        "rel_max_abs": max_e / max_w if max_w > 0 else max_e,
        "rel_rms": rms_e / rms_w if rms_w > 0 else rms_e,
    }


def quantize_tensor(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, dict[str, float]]:
    """Quantize an fp32 array to ``type_name``: (the data to store, its error against ``arr``)."""
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    qt = _qtype(type_name)
    data = gguf.quants.quantize(arr, qt)
    if qt == gguf.GGMLQuantizationType.F32:
        return data, {"rel_max_abs": 0.0, "rel_rms": 0.0}
    return data, tensor_error(arr, gguf.quants.dequantize(data, qt))


def summarise(tensors: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """Max and mean of the relative errors over the quantized (non-F32) tensors."""
    q = [t for t in tensors.values() if t["type"] != "F32"]
    types: dict[str, int] = {}
    for t in tensors.values():
        types[str(t["type"])] = types.get(str(t["type"]), 0) + 1
    out: dict[str, object] = {"quantized_tensors": len(q), "tensor_types": types}
    for key in ("rel_max_abs", "rel_rms"):
        vals = [float(t[key]) for t in q]
        out[f"max_{key}"] = max(vals) if vals else 0.0
        out[f"mean_{key}"] = sum(vals) / len(vals) if vals else 0.0
    worst = max(q, key=lambda t: float(t["rel_rms"]), default=None)
    out["worst_tensor"] = next((n for n, t in tensors.items() if t is worst), None)
    return out


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


def report_entry(type_name: str, err: Mapping[str, float]) -> dict[str, object]:
    return {"type": type_name, "rel_max_abs": _round(err["rel_max_abs"]), "rel_rms": _round(err["rel_rms"])}


def measure_file(path: str | Path, reference: Mapping[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """Per-tensor errors of a GGUF against fp32 reference arrays keyed by GGUF tensor name.

    Reads every tensor back with gguf-py and dequantizes it: used for files llama.cpp quantized,
    and by tests as an independent check of the Python path."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        if t.name not in reference:
            raise SparsedgeError(f"{path} holds a tensor {t.name!r} that was not exported")
        ref = reference[t.name]
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = report_entry(t.tensor_type.name, tensor_error(ref, deq.reshape(ref.shape)))
    missing = set(reference) - set(out)
    if missing:
        raise SparsedgeError(f"{path} lacks tensors {sorted(missing)[:3]}")
    return out


def llamacpp_quantize(src: str | Path, dst: str | Path, quant: GGUFQuant, threads: int | None = None) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's own quantizer (K-quant mixes)."""
    from ..runtimes.llamacpp import captured_log, load_library

    L = load_library()
    params = L.llama_model_quantize_default_params()
    params.ftype = int(quant.llamacpp_ftype)
    params.nthread = int(threads or 0)  # 0: llama.cpp uses every hardware thread
    with captured_log() as log:
        rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SparsedgeError(f"llama.cpp could not quantize to {quant.name}: {log.last_error() or f'code {rc}'}")
