"""What a report records about where it ran: the CPU, its features, the load, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("sparsedge", "numpy", "onnxruntime", "onnxruntime-genai", "llama-cpp-python", "torch",
            "transformers", "gguf", "matplotlib")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model"):
                return val.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """CPU model, cores, features, ONNX Runtime providers and installed runtimes (targets' host
    detection), load average."""
    from ..targets import detect_host

    h = detect_host()
    out = {"cpu": _cpu_model(), "machine": h.machine, "system": h.system, "logical_cores": os.cpu_count(),
           "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "features": h.cpu_features or [], "providers": h.providers, "runtimes": h.runtimes,
           "os": platform.platform(), "python": platform.python_version()}
    # how the native engine's threads wait at barriers (sparsedge.runtimes.native._lib): it
    # changes native decode speed by 2x on idle cores
    from ..runtimes.native._lib import SPINCOUNT

    out["omp_wait"] = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ} or {
        "GOMP_SPINCOUNT": SPINCOUNT}
    try:
        from ..runtimes.native._lib import wait_mode

        out["omp_wait"]["forward_barriers"] = wait_mode()
    except Exception:  # the C library is not built here
        pass
    try:
        out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return out


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out
