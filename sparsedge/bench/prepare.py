"""What a bench run needs before it measures: runtimes that are installed, recipes (files or
calibrated on the fly), artifact folders (dense and one per recipe), GenAI's own build.

Everything lands under the work folder (default OUT/artifacts) and is reused by a rerun when it
matches (same source model, quant types and recipe), so a rerun measures without exporting again.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparsedgeError

# every runtime bench knows: sparsedge's four, and GenAI as a peer
RUNTIMES = ("native", "llamacpp", "onnxruntime", "genai", "torch")
DEFAULT_RUNTIMES = ("native", "llamacpp", "onnxruntime", "genai")  # torch (the reference) is slow
# runtimes that run a recipe (llama.cpp ignores it; GenAI builds from the dense source)
RECIPE_RUNTIMES = ("native", "onnxruntime", "torch")
_INSTALL = {"llamacpp": "pip install 'sparsedge[llamacpp]' (llama-cpp-python)",
            "onnxruntime": "pip install onnxruntime", "genai": "pip install onnxruntime-genai",
            "torch": "pip install 'sparsedge[torch]'", "native": "reinstall sparsedge (its C library is built by pip)"}


def installed(runtime: str) -> bool:
    if runtime == "native":
        try:
            from ..runtimes.native import _lib

            _lib.lib()
            return True
        except Exception:  # the compiled library is missing or cannot load on this CPU
            return False
    module = {"llamacpp": "llama_cpp", "onnxruntime": "onnxruntime", "genai": "onnxruntime_genai",
              "torch": "torch"}[runtime]
    return importlib.util.find_spec(module) is not None


def select_runtimes(asked: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(runtimes to run, notes). Asked-for runtimes must exist and be installed; the default set
    takes what is installed and notes the rest."""
    notes = []
    if asked:
        bad = [r for r in asked if r not in RUNTIMES]
        if bad:
            raise SparsedgeError(f"unknown runtime {bad[0]!r} (known: {', '.join(RUNTIMES)})")
        for r in asked:
            if not installed(r):
                raise SparsedgeError(f"runtime {r!r} is not installed here: {_INSTALL[r]}")
        return list(dict.fromkeys(asked)), notes
    out = []
    for r in DEFAULT_RUNTIMES:
        if installed(r):
            out.append(r)
        else:
            notes.append(f"{r}: not installed, skipped ({_INSTALL[r]})")
    return out, notes


@dataclass
class RecipeSpec:
    """A --recipes entry: a recipe.json path, or METHOD:S[:SCOPE] to calibrate on the fly."""

    text: str
    path: Path | None = None
    method: str | None = None
    sparsity: float | None = None
    scope: str = "all"

    @classmethod
    def parse(cls, s: str, scope: str = "all") -> "RecipeSpec":
        p = Path(s).expanduser()
        if p.suffix == ".json" or p.exists() or "/" in s:
            if not p.is_file():
                raise SparsedgeError(f"no such recipe file: {s}")
            return cls(s, path=p)
        from .. import sparsify

        method, _, rest = s.partition(":")
        level, _, sc = rest.partition(":")
        if not level:
            raise SparsedgeError(f"a recipe is a recipe.json path or METHOD:SPARSITY[:SCOPE], e.g. teal:0.5 "
                                 f"(got {s!r})")
        sparsify.get_method(method)
        try:
            level_f = float(level)
        except ValueError:
            raise SparsedgeError(f"bad sparsity {level!r} in {s!r}: a number in (0, 1), e.g. teal:0.5")
        sparsify.check_sparsity(level_f)
        return cls(s, method=method, sparsity=level_f, scope=sc or scope)

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path.stem
        return f"{self.method}:{self.sparsity:g}" + (f":{self.scope}" if self.scope != "all" else "")

    @property
    def slug(self) -> str:
        return "sparse-" + self.label.replace(":", "-").replace("/", "-")


@dataclass
class Variant:
    name: str  # "dense" or the recipe's label
    artifact: Path  # artifact folder
    recipe: dict | None = None  # the recipe summary (method, target, sites, held-out results)
    runtimes: list[str] = field(default_factory=list)


def _reusable(folder: Path, source: str, gguf: list[str], onnx: list[str], recipe) -> bool:
    from ..export.artifact import is_artifact, read_manifest

    if not is_artifact(folder):
        return False
    m = read_manifest(folder)
    r = m.get("recipe")
    same_recipe = (r is None and recipe is None) or (
        r is not None and recipe is not None and r["method"] == recipe.method
        and r["target_sparsity"] == recipe.target_sparsity and r["sites"] == list(recipe.sites))
    return (m["source"]["model"] == source and same_recipe and set(gguf) <= set(m.get("gguf_quants", []))
            and set(onnx) <= set(m.get("onnx_quants", [])))


def export_variant(loaded, folder: Path, runtimes: list[str], gguf_quants: tuple[str, ...], onnx_quant: str,
                   recipe=None, progress: bool = True) -> tuple[Path, bool]:
    """(artifact folder, reused?) holding the formats the runtimes need."""
    from ..export.artifact import ExportConfig, export

    gguf = list(gguf_quants) if set(runtimes) & {"native", "llamacpp", "torch"} else []
    onnx = [onnx_quant] if "onnxruntime" in runtimes else []
    if _reusable(folder, loaded.name, gguf, onnx, recipe):
        return folder, True
    formats = tuple(f for f, q in (("gguf", gguf), ("onnx", onnx)) if q)
    cfg = ExportConfig(formats=formats, gguf_quants=tuple(gguf) or ("q4_0",), onnx_quants=tuple(onnx) or ("int4",),
                       force=True)
    export(loaded, folder, cfg, recipe, progress=progress)
    return folder, False


def get_recipe(spec: RecipeSpec, loaded, recipes_dir: Path, calib_tokens: int, progress: bool):
    """A SparsityRecipe: loaded from its file, or calibrated (and saved, reused by a rerun)."""
    from .. import sparsify

    if spec.path is not None:
        return sparsify.SparsityRecipe.load(spec.path).validate(loaded.spec)
    saved = recipes_dir / f"{spec.slug}.json"
    if saved.is_file():
        r = sparsify.SparsityRecipe.load(saved)
        if r.calibration is not None and getattr(r.calibration, "tokens", calib_tokens) == calib_tokens:
            return r.validate(loaded.spec)
    recipe = sparsify.calibrate(loaded, spec.method, spec.sparsity, scope=spec.scope,
                                config=sparsify.CalibConfig(tokens=calib_tokens), progress=progress)
    recipe.save(saved)
    return recipe


def source_folder(loaded) -> Path | None:
    """The HF folder a model (or an artifact's source model) lives in, for GenAI's builder."""
    if loaded.manifest is None:
        return Path(loaded.path)
    from ..sources import load

    try:
        src = load(loaded.manifest["source"]["model"], progress=False)
    except SparsedgeError:
        return None
    return Path(src.path) if src.manifest is None else None


def recipe_summary(recipe) -> dict[str, Any]:
    return {"method": recipe.method, "target_sparsity": recipe.target_sparsity, "sites": list(recipe.sites),
            "results": recipe.results or None}
