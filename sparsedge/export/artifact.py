"""The artifact folder (DESIGN.md §2): everything a device needs, with a manifest that says what
is inside and lets ``inspect`` re-verify it.

    OUT/manifest.json      sparsedge version, source, model spec, recipe summary, quant types,
                           files with size + sha256, quantization errors, target profile
    OUT/recipe.json        when the export carries a sparsity recipe
    OUT/model.<q>.gguf     one GGUF per requested quant type (recipe under `sparsedge.recipe`)
    OUT/onnx/model.<k>.onnx  fp32 and/or quantized ONNX decoders with KV cache
    OUT/npu/model.k<T>.onnx  static-shape QDQ decoders for NPUs (format "npu"): one graph for
                           decoding (T = 1) and one for verifying drafts (T = npu_verify_tokens),
                           over a fixed cache of npu_context slots, quantized with shared scales
    OUT/tokenizer.json, tokenizer_config.json, ...   the tokenizer (and chat template)

``export`` builds all of it in a temporary folder beside OUT and renames it at the end: an export
that fails or is interrupted leaves nothing at OUT (nor an old artifact half-replaced).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparsedgeError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
FORMATS = ("gguf", "onnx", "npu")
NPU_DIR = "npu"


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = ("gguf",)
    gguf_quants: tuple[str, ...] = ("q4_0",)
    onnx_quants: tuple[str, ...] = ("int4",)  # "fp32" keeps the unquantized graph
    force: bool = False
    target: str | None = None  # device profile name, recorded in the manifest
    extra: dict[str, Any] = field(default_factory=dict)
    # format "npu": static graphs (sparsedge.export.onnx.StaticShape) quantized QDQ for an NPU
    npu_context: int = 512
    npu_verify_tokens: int = 8
    npu_activation_type: str = "uint16"
    npu_weight_type: str = "uint8"

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise SparsedgeError(f"unknown format {', '.join(bad) or '(none)'} (known: {', '.join(FORMATS)})")
        if "npu" in self.formats and not (1 < self.npu_verify_tokens < self.npu_context):
            raise SparsedgeError(f"npu_verify_tokens must lie in 2..{self.npu_context - 1} (got {self.npu_verify_tokens})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def _check_quants(cfg: ExportConfig) -> None:
    """Fail on an unknown quant type before any work is done."""
    if "gguf" in cfg.formats:
        from ..quantize.gguf import check_quant

        for q in cfg.gguf_quants:
            check_quant(q)
    if "onnx" in cfg.formats:
        from ..quantize.onnx import check_kind

        for k in cfg.onnx_quants:
            if k != "fp32":
                check_kind(k)
    if "npu" in cfg.formats:
        from ..quantize.onnx import QDQ_TYPES

        for t in (cfg.npu_activation_type, cfg.npu_weight_type):
            if t not in QDQ_TYPES:
                raise SparsedgeError(f"unknown QDQ type {t!r} (known: {', '.join(QDQ_TYPES)})")


def _export_npu(spec, weights, tmp: Path, cfg: ExportConfig, recipe, progress: bool) -> dict[str, Any]:
    """The npu format: fp32 static graphs for T = verify tokens and T = 1, the first QDQ-quantized
    on the calibration corpus, the second with the first's activation scales (so that both compute
    a token's row identically); the fp32 graphs are dropped."""
    from ..quantize.onnx import quantize_onnx, shared_scales
    from .onnx import StaticShape, export_onnx

    work = tmp / ".npu-fp32"
    out = tmp / NPU_DIR
    reports: dict[str, Any] = {}
    scales = None
    for t in (cfg.npu_verify_tokens, 1):
        name = f"model.k{t}.onnx"
        src = export_onnx(spec, weights, work, recipe=recipe, progress=progress, weights_permuted=True,
                          static=StaticShape(cfg.npu_context, t), file_name=name)
        # calibration text: the tokenizer in tmp (OUT/tokenizer.json); with shared scales, two
        # windows only feed the quantizer's pass, whose ranges the scales replace
        rep = quantize_onnx(src, out / name, "qdq", activation_type=cfg.npu_activation_type,
                            weight_type=cfg.npu_weight_type, scales=scales,
                            **({} if scales is None else {"calib_windows": 2}))
        reports[f"{NPU_DIR}/{name}"] = {**rep, "context": cfg.npu_context, "tokens": t}
        if scales is None:
            scales = shared_scales(out / name)
        for p in work.glob(name + "*"):
            p.unlink()
    work.rmdir()
    return reports


def export(loaded, out: str | Path, cfg: ExportConfig, recipe=None, progress: bool = True) -> dict:
    """Write the artifact folder for a LoadedModel (and an optional SparsityRecipe) at ``out``."""
    from .. import __version__

    out = Path(out).expanduser()
    if out.exists() and not cfg.force:
        raise SparsedgeError(f"{out} exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise SparsedgeError(f"{out} exists and is not an artifact folder; refusing to replace it")
    _check_quants(cfg)
    spec = loaded.spec
    if "npu" in cfg.formats:  # what the static graphs cannot compute is refused before any file is written
        from .onnx import check_supported

        check_supported(spec, static=True)
    if recipe is not None:
        recipe.validate(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    t0 = time.perf_counter()
    try:
        weights = loaded.state_dict()
        if recipe is not None and recipe.chunks is not None and recipe.chunks.permutation:
            from ..sparsify.chunks import permute_ffn

            weights = dict(weights)  # permute_ffn replaces entries: the loaded tensors stay as they are
            for layer, perm in enumerate(recipe.chunks.permutation):
                permute_ffn(weights, layer, perm)
        reports: dict[str, Any] = {}
        if recipe is not None:
            recipe.save(tmp / "recipe.json")
        loaded.tokenizer.save_pretrained(tmp)
        if "gguf" in cfg.formats:
            from .gguf import write_gguf

            for q in cfg.gguf_quants:
                rep = write_gguf(loaded, tmp / f"model.{q}.gguf", quant=q, weights=weights,
                                 recipe=recipe, progress=progress)
                reports[f"model.{q}.gguf"] = rep
        if "onnx" in cfg.formats:
            from ..quantize.onnx import quantize_onnx
            from .onnx import export_onnx

            onnx_dir = tmp / "onnx"
            # the weights above are in the recipe's neuron order already
            fp32 = export_onnx(spec, weights, onnx_dir, recipe=recipe, progress=progress,
                               weights_permuted=True)
            for k in cfg.onnx_quants:
                if k == "fp32":
                    continue
                dst = onnx_dir / f"model.{k}.onnx"
                reports[f"onnx/{dst.name}"] = quantize_onnx(fp32, dst, k)
            if "fp32" not in cfg.onnx_quants:
                for p in onnx_dir.glob(fp32.name + "*"):  # the graph and its external data
                    p.unlink()
        if "npu" in cfg.formats:
            reports.update(_export_npu(spec, weights, tmp, cfg, recipe, progress))
        manifest = {
            "format": MANIFEST_FORMAT,
            "sparsedge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"model": loaded.name, "kind": loaded.kind},
            "spec": spec.to_dict(),
            "recipe": None if recipe is None else {
                "method": recipe.method, "target_sparsity": recipe.target_sparsity,
                "sites": list(recipe.sites), "chunk_size": recipe.chunks.size if recipe.chunks else None,
                "results": recipe.results,
            },
            "gguf_quants": list(cfg.gguf_quants) if "gguf" in cfg.formats else [],
            "onnx_quants": list(cfg.onnx_quants) if "onnx" in cfg.formats else [],
            "npu": {"context": cfg.npu_context, "verify_tokens": cfg.npu_verify_tokens,
                    "activation_type": cfg.npu_activation_type, "weight_type": cfg.npu_weight_type}
            if "npu" in cfg.formats else None,
            "target": cfg.target,
            "target_profile": cfg.extra.get("target_profile"),  # the profile as exported (targets/)
            "quality": reports,
            "export_s": round(time.perf_counter() - t0, 2),
            "files": _file_table(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.chmod(0o755)
        if out.exists():  # --force: the old artifact goes only once the new one is complete
            old = out.with_name(f".tmp-old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return manifest
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SparsedgeError(f"no space left on the device while writing {out}; nothing was written") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder).expanduser() / MANIFEST
    if not p.is_file():
        raise SparsedgeError(f"{folder} is not an artifact folder (no {MANIFEST})")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SparsedgeError(f"{p} is corrupt: {e}") from e
    if m.get("format") != MANIFEST_FORMAT:
        raise SparsedgeError(f"artifact format {m.get('format')!r} is not supported")
    return m


def is_artifact(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def inspect(folder: str | Path) -> dict:
    """The manifest plus a re-verification of every file's size and sha256."""
    root = Path(folder).expanduser()
    m = read_manifest(root)
    problems = []
    for name, meta in m["files"].items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            problems.append(f"{name}: hash mismatch")
    return {**m, "verified": not problems, "problems": problems}
