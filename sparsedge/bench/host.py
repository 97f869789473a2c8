"""What a report records about where it ran: the CPU, its features, the load, library versions,
and the memory bandwidth the host left to the jobs while they ran (BandwidthProbe)."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np

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
    # which kernels the llama.cpp peer runs here: its build's system-info line (the features its
    # CPU backend was compiled for; a portable build lists the AVX2 baseline even on an AVX-512 CPU)
    if "llamacpp" in h.runtimes:
        try:
            from ..runtimes.llamacpp import system_info

            out["llamacpp_system_info"] = system_info()
        except Exception as e:  # a broken install: say so rather than fail the report
            out["llamacpp_system_info"] = f"unavailable ({e})"
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


PROBE_METHOD = ("memory copy bandwidth of the bench process (numpy, one thread, a {mib} MiB array into "
                "another: larger than the CPU's last-level cache share), {ms} ms before and after every job "
                "process; a job's figure is the mean of its two")


class BandwidthProbe:
    """The host's memory bandwidth as our jobs see it, measured between jobs.

    Decoding a small model on a CPU streams its weights from memory every token, so tokens/s
    follows the memory bandwidth left over by everything else on the host. On a shared VM that
    share moves with other tenants' load: on this project's 2-vCPU VM, native decode speed and
    this probe, sampled in turn for 150 s, correlated at 0.59, and both fell by ~25% for minutes at
    a time. The report records the probe so that two runs can be told apart by the host's state.
    """

    def __init__(self, mib: int = 64, seconds: float = 0.2):
        self.mib, self.seconds = mib, seconds
        self.samples: list[float] = []
        self._stat0 = read_cpu_stat()  # for the CPU steal share over the probe's life (summary)

    @property
    def method(self) -> str:
        return PROBE_METHOD.format(mib=self.mib, ms=round(1e3 * self.seconds))

    def measure(self) -> float:
        """GB/s (read + write) over ``seconds`` of repeated copies; appended to ``samples``."""
        # allocated per probe, not held: with isolate=False the jobs' memory figures are this
        # process's, and 2 x 64 MiB held across them would count in every one
        src = np.ones(self.mib * 2**20 // 4, np.float32)  # [mib MiB / 4] float32
        dst = np.empty_like(src)
        np.copyto(dst, src)  # touch both arrays' pages before timing
        t0 = time.perf_counter()
        n = 0
        while (dt := time.perf_counter() - t0) < self.seconds:
            np.copyto(dst, src)
            n += 1
        gbps = 2 * n * src.nbytes / dt / 1e9
        self.samples.append(gbps)
        return gbps

    def summary(self) -> dict:
        s = self.samples
        return {"method": self.method, "probes": len(s),
                "gbps_median": float(np.median(s)) if s else None,
                "gbps_min": min(s, default=None), "gbps_max": max(s, default=None),
                "cpu_steal": steal_fraction(self._stat0, read_cpu_stat())}


def read_cpu_stat() -> list[int] | None:
    """The aggregate CPU time counters of /proc/stat (user nice system idle iowait irq softirq
    steal ...), in clock ticks; None where there is no /proc."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        return [int(x) for x in first[1:]] if first[0] == "cpu" else None
    except (OSError, IndexError, ValueError):
        return None


def steal_fraction(a: list[int] | None, b: list[int] | None) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two read_cpu_stat()."""
    if not a or not b or len(a) < 8 or len(b) < 8:
        return None
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8])
    return d[7] / total if total > 0 else None
