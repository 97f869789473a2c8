"""Device profiles as data: what to export for a device, and what must be installed to run it.

A profile names the artifact (formats and quantization), how it runs (runtime, ONNX Runtime
execution providers, threads, tree budget), the shapes it needs (a fixed context and verification
token count for static-shape NPU graphs), the CPUs it is for, and its requirements: each one a
runtime or an execution provider with the command that installs it. Host detection (host.py) turns
requirements into a status on this machine; ``export_config`` turns a profile into an ExportConfig.

The registry ``TARGETS`` is keyed by name and fails loudly on an unknown key (DESIGN.md §5.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import SparsedgeError


@dataclass(frozen=True)
class Requirement:
    """Something a profile needs on the host: a sparsedge runtime (a key of runtimes.RUNTIMES) or
    an ONNX Runtime execution provider (built in, or a plugin EP library)."""

    kind: str  # "runtime" | "provider"
    name: str  # "native", "llamacpp", "npu" / "QNNExecutionProvider", ...
    what: str  # how messages name it
    install: str  # what brings it: a pip command, or how to rebuild sparsedge


NATIVE = Requirement("runtime", "native", "the native runtime (sparsedge's C kernels)",
                     "reinstall sparsedge with pip to build its C extension "
                     "(in a checkout: pip install -e . --no-build-isolation)")
LLAMACPP = Requirement("runtime", "llamacpp", "the llama.cpp runtime", "pip install llama-cpp-python")
ONNXRUNTIME = Requirement("runtime", "onnxruntime", "the ONNX Runtime runtime", "pip install onnxruntime")
NPU_RUNTIME = Requirement("runtime", "npu", "the npu runtime", "a sparsedge build with the npu runtime")
CPU_EP = Requirement("provider", "CPUExecutionProvider", "ONNX Runtime's CPU execution provider",
                     "pip install onnxruntime")
# onnxruntime-qnn is a plugin EP library (it does not replace onnxruntime): on x86 it ships
# Qualcomm's HTP backend as an emulator (DESIGN.md §3).
QNN_EP = Requirement("provider", "QNNExecutionProvider", "the QNN execution provider", "pip install onnxruntime-qnn")
# The plugin package, not onnxruntime-openvino: that one is a whole onnxruntime build and would
# replace the onnxruntime wheel sparsedge depends on. Host detection accepts either.
OPENVINO_EP = Requirement("provider", "OpenVINOExecutionProvider", "the OpenVINO execution provider",
                          "pip install onnxruntime-ep-openvino")
COREML_EP = Requirement("provider", "CoreMLExecutionProvider", "the CoreML execution provider",
                        "pip install onnxruntime (on macOS; its wheel includes CoreML)")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    # the artifact: formats of sparsedge.export.artifact.FORMATS and their quantization
    formats: tuple[str, ...]
    gguf_quants: tuple[str, ...] = ()
    onnx_quants: tuple[str, ...] = ()
    activation_type: str | None = None  # static QDQ (npu format): activation / weight integer types
    weight_type: str | None = None
    # how it runs
    runtime: str = "native"  # what `sparsedge run` uses on an artifact of this profile
    runtimes: tuple[str, ...] = ()  # every runtime that runs its files (runtime first)
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, in preference order
    threads: int | None = None  # None: all cores
    static_shapes: bool = False  # NPU compilers need every shape fixed ahead of time
    context: int = 2048  # maximum context (static graphs: the fixed KV cache length)
    verify_tokens: int | None = None  # static graphs: tokens of the verification graph (plus a 1-token graph)
    tree_budget: int = 16  # most draft tokens per verification
    # where it runs
    machines: tuple[str, ...] = ()  # normalised platform.machine(): "x86_64", "arm64"; () = any
    cpu_features: tuple[str, ...] = ()  # flags the CPU kernels need ("avx2", "fma", "neon")
    systems: tuple[str, ...] = ()  # "linux", "darwin", "windows"; () = any
    emulated_on: tuple[str, ...] = ()  # machines where the accelerator backend is an emulator
    requires: tuple[Requirement, ...] = ()
    packages: tuple[str, ...] = field(init=False)  # pip packages a user installs for it

    def __post_init__(self) -> None:
        pkgs = [r.install.removeprefix("pip install ").split(" ")[0] for r in self.requires
                if r.install.startswith("pip install ")]
        object.__setattr__(self, "packages", tuple(dict.fromkeys(pkgs)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requires"] = [f"{r.kind}:{r.name}" for r in self.requires]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# x86 laptops and desktops: the native engine's AVX2+FMA kernels on GGUF (llama.cpp runs the same
# files), and an int4 MatMulNBits ONNX graph for ONNX Runtime's CPU execution provider.
LAPTOP_X86 = TargetProfile(
    name="laptop-x86", description="x86-64 laptop/desktop CPU (AVX2+FMA)",
    formats=("gguf", "onnx"), gguf_quants=("q4_0", "q8_0"), onnx_quants=("int4",),
    runtime="native", runtimes=("native", "llamacpp", "onnxruntime"), providers=("CPUExecutionProvider",),
    context=4096, tree_budget=16,
    machines=("x86_64",), cpu_features=("avx2", "fma"),
    requires=(NATIVE, CPU_EP),
)

# Phones: 4 threads because big.LITTLE phones have about 4 fast cores and slow cores hold the
# others back at every barrier; smaller trees because verification costs more per token there.
ARM64_PHONE = TargetProfile(
    name="arm64-phone", description="arm64 phone/SBC CPU (NEON)",
    formats=("gguf",), gguf_quants=("q4_0",),
    runtime="native", runtimes=("native", "llamacpp"),
    threads=4, context=2048, tree_budget=8,
    machines=("arm64",), cpu_features=("neon",),
    requires=(NATIVE,),
)

# Snapdragon HTP: static QDQ (16-bit activations, 8-bit weights, what the HTP runs), every shape
# fixed: a 512-entry KV cache, a 1-token decode graph and an 8-token verification graph (so a tree
# of 7 drafts below the last committed token). On x86 the QNN HTP backend is an emulator.
QUALCOMM_NPU = TargetProfile(
    name="qualcomm-npu", description="Qualcomm Hexagon NPU through ONNX Runtime's QNN HTP execution provider",
    formats=("npu",), onnx_quants=("qdq",), activation_type="uint16", weight_type="uint8",
    runtime="npu", runtimes=("npu",), providers=("QNNExecutionProvider",),
    static_shapes=True, context=512, verify_tokens=8, tree_budget=7,
    machines=("arm64",), emulated_on=("x86_64",),
    requires=(NPU_RUNTIME, QNN_EP),
)

# Intel Core Ultra NPU: OpenVINO's execution provider takes symmetric int4 weights (MatMulNBits
# without zero points: our int4sym kind) and fixes shapes itself when it compiles for the NPU device.
INTEL_NPU = TargetProfile(
    name="intel-npu", description="Intel NPU through ONNX Runtime's OpenVINO execution provider",
    formats=("onnx",), onnx_quants=("int4sym",),
    runtime="onnxruntime", runtimes=("onnxruntime",),
    providers=("OpenVINOExecutionProvider", "CPUExecutionProvider"),
    context=2048, tree_budget=8,
    machines=("x86_64",),
    requires=(ONNXRUNTIME, OPENVINO_EP),
)

# Apple silicon: GGUF Q4_0 on llama.cpp's CPU path (no Metal build needed), and an fp32 ONNX graph
# for the CoreML execution provider (CoreML picks its own precision; it has no MatMulNBits).
# CoreML is used where present, not required: the GGUF path runs on every Mac.
APPLE = TargetProfile(
    name="apple", description="Apple silicon Mac: llama.cpp CPU (GGUF) or the CoreML execution provider (ONNX)",
    formats=("gguf", "onnx"), gguf_quants=("q4_0",), onnx_quants=("fp32",),
    runtime="llamacpp", runtimes=("llamacpp", "native", "onnxruntime"),
    providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
    context=4096, tree_budget=16,
    machines=("arm64",), cpu_features=("neon",), systems=("darwin",),
    requires=(LLAMACPP,),
)

TARGETS: dict[str, TargetProfile] = {p.name: p for p in (LAPTOP_X86, ARM64_PHONE, QUALCOMM_NPU, INTEL_NPU, APPLE)}

# ExportConfig fields of the npu format, filled from the profile (ExportConfig field -> profile field)
NPU_EXPORT_FIELDS = {
    "npu_context": "context",
    "npu_verify_tokens": "verify_tokens",
    "npu_activation_type": "activation_type",
    "npu_weight_type": "weight_type",
}


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise SparsedgeError(f"unknown target {name!r} (known: {', '.join(TARGETS)})") from None


def export_config(name: str, host=None, *, formats: tuple[str, ...] | None = None,
                  gguf_quants: tuple[str, ...] | None = None, onnx_quants: tuple[str, ...] | None = None,
                  force: bool = False):
    """The ExportConfig of a profile; ``formats`` / quants given (not None) override the profile's.

    Fails (SparsedgeError, one line) on an unknown target, on a format this build lacks, and on a
    runtime or execution provider the profile needs that is not installed on ``host`` (default:
    this machine). A host with the wrong CPU is fine: exporting for a phone on a laptop is the point.
    """
    from ..export.artifact import FORMATS, ExportConfig
    from .host import detect_host, unmet

    profile = get_target(name)
    given = {"formats": formats, "gguf_quants": gguf_quants, "onnx_quants": onnx_quants}
    chosen = {k: v if v is not None else getattr(profile, k) for k, v in given.items()}
    defaults = {f.name: f.default for f in fields(ExportConfig)}
    for fmt, key in (("gguf", "gguf_quants"), ("onnx", "onnx_quants")):
        if fmt in chosen["formats"] and not chosen[key]:  # e.g. --formats gguf on an ONNX-only profile
            chosen[key] = defaults[key]
    lacking = [f for f in chosen["formats"] if f not in FORMATS]
    if lacking:
        raise SparsedgeError(f"target {name} exports the {', '.join(lacking)} format, not available in this "
                             f"build of sparsedge (formats here: {', '.join(FORMATS)})")
    host = detect_host() if host is None else host
    absent = [r.what for r in profile.requires if r.kind == "runtime" and r.name not in host.build_runtimes]
    if absent:
        raise SparsedgeError(f"target {name} runs on {', '.join(absent)}, not available in this build of sparsedge")
    problems = unmet(profile, host)
    if problems:
        raise SparsedgeError(f"target {name} needs " + "; ".join(f"{r.what}: {r.install}" for r in problems))
    extra: dict[str, Any] = {}
    if "npu" in chosen["formats"]:
        known = {f.name for f in fields(ExportConfig)}
        absent = [f for f in NPU_EXPORT_FIELDS if f not in known]
        if absent:
            raise SparsedgeError(f"target {name}: the npu export options ({', '.join(absent)}) are not available "
                                 "in this build of sparsedge")
        extra = {cfg_field: getattr(profile, prof_field) for cfg_field, prof_field in NPU_EXPORT_FIELDS.items()}
    record = {**profile.to_dict(), "overridden": [k for k, v in given.items() if v is not None]}
    return ExportConfig(formats=tuple(chosen["formats"]), gguf_quants=tuple(chosen["gguf_quants"]),
                        onnx_quants=tuple(chosen["onnx_quants"]), force=force, target=name,
                        extra={"target_profile": record}, **extra)
