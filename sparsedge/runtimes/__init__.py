"""Runtimes behind one protocol (base.Runtime). ``open_runtime`` picks one by name from a registry.

The torch reference is the numerical oracle; later runtimes (onnxruntime, llama.cpp, native) are
registered here as they land. Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SparsedgeError
from .base import Runtime, tree_depths, tree_mask


def _loaded(model: Any):
    from ..sources import LoadedModel, load

    return model if isinstance(model, LoadedModel) else load(model)


def _artifact_recipe(loaded):
    from pathlib import Path

    from ..sparsify.recipe import SparsityRecipe

    p = Path(loaded.path) / "recipe.json"
    return SparsityRecipe.load(p) if p.is_file() else None


def _open_torch(model: Any, quant: str | None = None, **opts: Any) -> Runtime:
    from .torch_ref import TorchRuntime

    loaded = _loaded(model)
    rt = TorchRuntime.from_loaded(loaded, **opts)
    if loaded.manifest is not None:
        recipe = _artifact_recipe(loaded)
        if recipe is not None:  # the artifact's weights are in the recipe's neuron order already
            from ..sparsify.apply import apply

            apply(rt, recipe, weights_permuted=True)
    return rt


def _need_artifact(loaded, runtime: str):
    if loaded.manifest is None:
        raise SparsedgeError(
            f"the {runtime} runtime runs artifact folders; make one with 'sparsedge export {loaded.name} -o OUT'"
        )


def _open_llamacpp(model: Any, quant: str | None = None, **opts: Any) -> Runtime:
    from ..sources import artifact_file, gguf_file_type, source_gguf
    from .llamacpp import LlamaCppRuntime

    loaded = _loaded(model)
    if loaded.manifest is None:  # a model that came as a GGUF runs as it is: the user's own file
        own = source_gguf(loaded)
        if own is None:
            _need_artifact(loaded, "llamacpp")
        if quant is not None:
            raise SparsedgeError(f"{loaded.name} runs as its own GGUF ({own.name}, {gguf_file_type(own)}); "
                                 f"for {quant} export it first: 'sparsedge export {loaded.name} -o OUT "
                                 f"--gguf-quant {quant}'")
        return LlamaCppRuntime(own, **opts)
    return LlamaCppRuntime(artifact_file(loaded.path, loaded.manifest, "gguf", quant), **opts)


def _open_onnxruntime(model: Any, quant: str | None = None, **opts: Any) -> Runtime:
    from ..sources import artifact_file
    from .onnxrt import OnnxRuntime

    loaded = _loaded(model)
    _need_artifact(loaded, "onnxruntime")
    return OnnxRuntime(artifact_file(loaded.path, loaded.manifest, "onnx", quant), loaded.spec, **opts)


def _open_native(model: Any, quant: str | None = None, **opts: Any) -> Runtime:
    from .native import open_native

    return open_native(model, quant, **opts)


def _open_npu(model: Any, quant: str | None = None, provider: str = "qnn", threads: int | None = None,
              **opts: Any) -> Runtime:
    """The static graphs of an artifact's npu format, on the QNN HTP backend (provider="qnn") or
    on ONNX Runtime's CPU provider (provider="cpu", the reference for the same graphs)."""
    from .npu import NpuRuntime

    loaded = _loaded(model)
    _need_artifact(loaded, "npu")
    if quant not in (None, "qdq"):
        raise SparsedgeError(f"the npu runtime runs the artifact's QDQ graphs (quant {quant!r} asked)")
    if not loaded.manifest.get("npu"):
        raise SparsedgeError(f"artifact {loaded.path} has no npu graphs; export with --target qualcomm-npu")
    return NpuRuntime(loaded.path / "npu", provider=provider, threads=threads, **opts)


RUNTIMES: dict[str, Callable[..., Runtime]] = {
    "torch": _open_torch,
    "llamacpp": _open_llamacpp,
    "onnxruntime": _open_onnxruntime,
    "native": _open_native,
    "npu": _open_npu,
}


def open_runtime(model: Any, runtime: str = "torch", **opts: Any) -> Runtime:
    """A Runtime for a model argument (built-in name, folder, GGUF, hub id) or a LoadedModel."""
    if runtime not in RUNTIMES:
        raise SparsedgeError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    return RUNTIMES[runtime](model, **opts)


__all__ = ["Runtime", "RUNTIMES", "open_runtime", "tree_depths", "tree_mask"]
