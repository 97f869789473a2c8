"""Runtimes behind one protocol (base.Runtime). ``open_runtime`` picks one by name from a registry.

The torch reference is the numerical oracle; later runtimes (onnxruntime, llama.cpp, native) are
registered here as they land. Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SparsedgeError
from .base import Runtime, tree_depths, tree_mask


def _open_torch(model: Any, **opts: Any) -> Runtime:
    from ..sources import LoadedModel, load
    from .torch_ref import TorchRuntime

    loaded = model if isinstance(model, LoadedModel) else load(model)
    return TorchRuntime.from_loaded(loaded, **opts)


RUNTIMES: dict[str, Callable[..., Runtime]] = {
    "torch": _open_torch,
}


def open_runtime(model: Any, runtime: str = "torch", **opts: Any) -> Runtime:
    """A Runtime for a model argument (built-in name, folder, GGUF, hub id) or a LoadedModel."""
    if runtime not in RUNTIMES:
        raise SparsedgeError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    return RUNTIMES[runtime](model, **opts)


__all__ = ["Runtime", "RUNTIMES", "open_runtime", "tree_depths", "tree_mask"]
