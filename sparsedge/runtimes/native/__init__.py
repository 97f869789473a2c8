"""runtimes/native: sparse CPU kernels in C that turn activation sparsity into wall-clock speed.

A compact C library (sparsedge_native.c, built by the package's setup.py into
``_sparsedge_native*.so``, bound with ctypes) runs a whole decoder step per call on a GGUF artifact
(F32, F16, Q8_0, Q4_0 weights), and uses the artifact's sparsity recipe to skip inactive neurons:

- gate-thresholded FFN (CATS, CHESS): gate dense -> each token's active set -> up only on active
  rows -> down only on active neurons (down stored neuron-major);
- input-thresholded sites (TEAL, WINA, CHESS's q/o inputs): the consuming weight is stored
  input-channel-major and inactive channels are skipped;
- k tokens per call (draft trees): quantized weights are laid out eight rows interleaved (R8) at
  load on AVX2 CPUs, so one pass over each weight tile serves all k tokens (4 per register pass,
  one SIMD lane per row, integer maddubs sums); each token keeps its own active set.

SIMD paths (AVX2+FMA, NEON) are chosen at run time from the CPU's features;
SPARSEDGE_NATIVE_SCALAR=1 forces the scalar kernels.
"""

from __future__ import annotations

from typing import Any

from ._lib import level, set_level
from .loader import NativeModel
from .runtime import NativeRuntime


def open_native(model: Any, quant: str | None = None, **opts: Any) -> NativeRuntime:
    """The ``native`` entry of sparsedge.runtimes.RUNTIMES: a GGUF path, or an artifact folder's GGUF."""
    from pathlib import Path

    if isinstance(model, (str, Path)) and str(model).endswith(".gguf") and Path(model).is_file():
        return NativeRuntime(model, **opts)
    from ...export.artifact import is_artifact, read_manifest
    from ...sources import LoadedModel, artifact_file, load

    if isinstance(model, (str, Path)) and is_artifact(model):
        # the manifest names the GGUF; sources.load() would also build the tokenizer through
        # transformers, which imports torch (~200 MB of RSS) that the engine never uses
        folder = Path(model).expanduser()
        return NativeRuntime(artifact_file(folder, read_manifest(folder), "gguf", quant), **opts)
    loaded = model if isinstance(model, LoadedModel) else load(model)
    if loaded.manifest is None:
        from ...errors import SparsedgeError

        raise SparsedgeError(
            f"the native runtime runs GGUF artifacts; make one with 'sparsedge export {loaded.name} -o OUT'"
        )
    return NativeRuntime(artifact_file(loaded.path, loaded.manifest, "gguf", quant), **opts)


__all__ = ["NativeRuntime", "NativeModel", "open_native", "level", "set_level"]
