"""Host detection: which profiles run on this machine, and what is missing for the others.

What is detected, each kept simple and cheap (no model is loaded, no EP library is registered):
- the CPU: normalised platform.machine(), and the flags our kernels care about, from /proc/cpuinfo
  on Linux and sysctl on macOS (unknown elsewhere, which then does not count against a profile);
- ONNX Runtime execution providers: onnxruntime.get_available_providers(), plus plugin EP libraries
  (onnxruntime-qnn, onnxruntime-ep-openvino) that are installed. A plugin counts once its package
  imports and its library file exists; it is not registered here, because registration is
  process-wide and belongs to the runtime that opens a session;
- sparsedge runtimes: the ones this build registers (runtimes.RUNTIMES) whose module imports; the
  native engine only if its C library is built, with the SIMD path it picked.

``detect_host(importable=...)`` takes the module test as input so that tests can describe another
host (a missing llama.cpp, a missing plugin) without touching the real one.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import SparsedgeError
from .profiles import Requirement, TargetProfile

MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "i686": "x86", "i386": "x86",
            "aarch64": "arm64", "arm64": "arm64", "armv8l": "arm64"}
# CPU flags worth reporting (the kernels of llama.cpp / native / ONNX Runtime dispatch on these)
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "neon", "asimddp", "i8mm", "sve")
# plugin EP libraries: EP name -> the Python package that carries the library (get_library_path())
PLUGIN_EPS = {"QNNExecutionProvider": "onnxruntime_qnn", "OpenVINOExecutionProvider": "onnxruntime_ep_openvino"}
# what each runtime of runtimes.RUNTIMES imports (native: see _native_path)
RUNTIME_MODULES = {"torch": "torch", "llamacpp": "llama_cpp", "onnxruntime": "onnxruntime",
                   "native": "sparsedge.runtimes.native", "npu": "sparsedge.runtimes.npu"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


@dataclass
class Host:
    system: str  # "linux", "darwin", "windows", ...
    machine: str  # normalised: "x86_64", "arm64", or platform.machine() as is
    cpu_features: list[str] | None  # of FEATURES; None = could not be read on this OS
    providers: list[str]  # ONNX Runtime EPs usable here, plugin EPs included
    plugin_eps: dict[str, str]  # plugin EP name -> its library file
    runtimes: dict[str, str]  # installed sparsedge runtime -> a detail (native: its SIMD path)
    build_runtimes: list[str]  # runtimes this build of sparsedge knows (runtimes.RUNTIMES)
    build_formats: list[str]  # export formats this build knows (export.artifact.FORMATS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_features(system: str, machine: str) -> list[str] | None:
    flags: set[str] | None = None
    if system == "linux":
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86 / arm
                flags = set(value.split())
                break
    elif system == "darwin":
        keys = ["machdep.cpu.features", "machdep.cpu.leaf7_features"] if machine == "x86_64" else []
        flags = set()
        for k in keys:
            try:
                out = subprocess.run(["sysctl", "-n", k], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            flags |= {f.lower().replace(".", "_") for f in out.split()}
    if machine == "arm64":  # NEON (Advanced SIMD) is part of every ARMv8-A CPU; Linux calls it asimd
        flags = (flags or set()) | {"neon"}
    if flags is None:
        return None
    if "fma3" in flags:
        flags.add("fma")
    return [f for f in FEATURES if f in flags]


def _providers(importable: Callable[[str], bool]) -> tuple[list[str], dict[str, str]]:
    providers: list[str] = []
    plugins: dict[str, str] = {}
    if importable("onnxruntime"):
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        # plugin EPs some other code of this process registered already
        for d in getattr(ort, "get_ep_devices", lambda: [])():
            if d.ep_name not in providers:
                providers.append(d.ep_name)
        for ep, module in PLUGIN_EPS.items():
            if not importable(module):
                continue
            try:
                lib = Path(importlib.import_module(module).get_library_path())
            except Exception:  # a broken install: the package imports but has no library
                continue
            if lib.is_file():
                plugins[ep] = str(lib)
                if ep not in providers:
                    providers.append(ep)
    return providers, plugins


def _native_path(importable: Callable[[str], bool]) -> str | None:
    """The native engine's SIMD path ("avx2+fma+avx512vnni", "avx2+fma", "neon", "scalar"), or None when it
    is not built."""
    if not importable(RUNTIME_MODULES["native"]):
        return None
    from ..errors import SparsedgeError

    try:
        from ..runtimes.native import level

        return level()
    except (SparsedgeError, OSError):  # the C library is not built, or does not load
        return None


def detect_host(importable: Callable[[str], bool] | None = None) -> Host:
    """This machine; ``importable(module) -> bool`` (default: importlib's find_spec) decides which
    runtime modules and plugin EP packages count as installed."""
    from ..export.artifact import FORMATS
    from ..runtimes import RUNTIMES

    importable = importable or _importable  # looked up per call, so a test can replace _importable

    system = sys.platform if sys.platform != "win32" else "windows"
    system = "linux" if system.startswith("linux") else system
    raw = platform.machine()
    machine = MACHINES.get(raw.lower(), raw)
    providers, plugins = _providers(importable)
    runtimes: dict[str, str] = {}
    for name in RUNTIMES:
        if name == "native":
            path = _native_path(importable)
            if path is not None:
                runtimes[name] = path
        elif importable(RUNTIME_MODULES.get(name, f"sparsedge.runtimes.{name}")):
            runtimes[name] = "installed"
    return Host(system=system, machine=machine, cpu_features=cpu_features(system, machine),
                providers=providers, plugin_eps=plugins, runtimes=runtimes,
                build_runtimes=list(RUNTIMES), build_formats=list(FORMATS))


@dataclass(frozen=True)
class Status:
    code: str  # "runs" | "emulated" | "missing" | "not-in-build" | "wrong-cpu" | "wrong-os"
    text: str

    @property
    def runs(self) -> bool:
        return self.code in ("runs", "emulated")


def _met(r: Requirement, host: Host) -> bool:
    return r.name in (host.runtimes if r.kind == "runtime" else host.providers)


def unmet(profile: TargetProfile, host: Host) -> list[Requirement]:
    """Requirements of the profile that this host lacks (runtimes of this build not installed,
    runtimes this build lacks, execution providers not installed)."""
    return [r for r in profile.requires if not _met(r, host)]


def status(profile: TargetProfile, host: Host) -> Status:
    """Whether the profile runs on this host, and if not, the first thing in the way."""
    feats = host.cpu_features
    if profile.machines and host.machine not in profile.machines + profile.emulated_on:
        need = " or ".join(profile.machines) + (f" with {', '.join(profile.cpu_features)}" if profile.cpu_features else "")
        return Status("wrong-cpu", f"wrong CPU: needs {need} (this host: {host.machine})")
    lacking = [f for f in profile.cpu_features if feats is not None and f not in feats]
    if lacking and host.machine not in profile.emulated_on:
        return Status("wrong-cpu", f"wrong CPU: needs {', '.join(profile.cpu_features)} "
                      f"(this host: {host.machine} without {', '.join(lacking)})")
    if profile.systems and host.system not in profile.systems:
        return Status("wrong-os", f"wrong OS: needs {' or '.join(profile.systems)} (this host: {host.system})")
    out_of_build = [f"the {f} export format" for f in profile.formats if f not in host.build_formats]
    out_of_build += [r.what for r in profile.requires if r.kind == "runtime" and r.name not in host.build_runtimes]
    if out_of_build:
        return Status("not-in-build", f"not available in this build: {', '.join(out_of_build)}")
    missing = unmet(profile, host)
    if missing:
        return Status("missing", "missing " + "; ".join(f"{r.what} (install with `{r.install}`)" for r in missing))
    if host.machine in profile.emulated_on:
        eps = ", ".join(p for p in profile.providers if p in host.providers)
        return Status("emulated", f"runs here (emulated: {eps} on {host.machine})")
    return Status("runs", "runs here")


def host_target(host: Host | None = None) -> TargetProfile:
    """The profile of this host: the first in TARGETS' order that runs here natively (not
    emulated), e.g. laptop-x86 on an AVX2 PC, arm64-phone on an ARM board."""
    from .profiles import TARGETS

    host = detect_host() if host is None else host
    for p in TARGETS.values():
        if status(p, host).code == "runs":
            return p
    raise SparsedgeError("no device profile runs on this host (see 'sparsedge targets')")


def report(host: Host | None = None) -> dict[str, Any]:
    """Every profile with its status on this host: what `sparsedge targets --json` prints."""
    from .profiles import TARGETS

    host = detect_host() if host is None else host
    targets = {}
    for name, p in TARGETS.items():
        st = status(p, host)
        targets[name] = {**p.to_dict(), "status": st.code, "status_text": st.text,
                         "runtimes_here": [r for r in p.runtimes if r in host.runtimes],
                         "providers_here": [e for e in p.providers if e in host.providers]}
    return {"host": host.to_dict(), "targets": targets}
