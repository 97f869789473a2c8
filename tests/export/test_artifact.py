"""The artifact folder: atomic export, manifest, inspect, and running artifacts through runtimes."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from sparsedge import SparsedgeError, load, open_runtime
from sparsedge.cli import main
from sparsedge.export import artifact
from sparsedge.export.artifact import ExportConfig, export, inspect
from tiny import save_folder


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    return load(str(save_folder("llama", tmp_path_factory.mktemp("m") / "llama")), progress=False)


GGUF_ONLY = ExportConfig(formats=("gguf",), gguf_quants=("f32", "q8_0"))


def test_export_writes_manifest_and_inspect_verifies(tiny_loaded, tmp_path):
    out = tmp_path / "art"
    m = export(tiny_loaded, out, GGUF_ONLY, progress=False)
    assert set(m["files"]) >= {"model.f32.gguf", "model.q8_0.gguf", "tokenizer.json"}
    assert m["spec"]["arch"] == "llama" and m["gguf_quants"] == ["f32", "q8_0"]
    info = inspect(out)
    assert info["verified"] and not info["problems"]
    assert not list(tmp_path.glob(".tmp-*"))
    # corrupt one byte: inspect says so, and the CLI exits non-zero with one line
    f = out / "model.q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert inspect(out)["problems"] == ["model.q8_0.gguf: hash mismatch"]
    assert main(["inspect", str(out), "--json"]) == 1


def test_existing_output_is_refused_unless_forced(tiny_loaded, tmp_path, capsys):
    out = tmp_path / "art"
    export(tiny_loaded, out, GGUF_ONLY, progress=False)
    with pytest.raises(SparsedgeError, match="exists; pass --force"):
        export(tiny_loaded, out, GGUF_ONLY, progress=False)
    m = export(tiny_loaded, out, ExportConfig(formats=("gguf",), gguf_quants=("f16",), force=True), progress=False)
    assert "model.f16.gguf" in m["files"] and not (out / "model.f32.gguf").exists()
    other = tmp_path / "not-an-artifact"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(SparsedgeError, match="not an artifact folder"):
        export(tiny_loaded, other, ExportConfig(formats=("gguf",), gguf_quants=("f32",), force=True), progress=False)
    assert (other / "precious.txt").exists()


def test_unknown_quant_and_format_fail_before_writing(tiny_loaded, tmp_path):
    with pytest.raises(SparsedgeError, match="q3_zz"):
        export(tiny_loaded, tmp_path / "a", ExportConfig(formats=("gguf",), gguf_quants=("q3_zz",)), progress=False)
    with pytest.raises(SparsedgeError, match="int3"):
        export(tiny_loaded, tmp_path / "b", ExportConfig(formats=("onnx",), onnx_quants=("int3",)), progress=False)
    with pytest.raises(SparsedgeError, match="unknown format tflite"):
        ExportConfig(formats=("tflite",))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_or_interrupted_export_leaves_nothing(tiny_loaded, tmp_path, monkeypatch, exc):
    from sparsedge.export import gguf as gguf_mod

    real = gguf_mod.write_gguf
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first file is written, the second fails
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(gguf_mod, "write_gguf", failing)
    out = tmp_path / "art"
    if isinstance(exc, OSError):
        with pytest.raises(SparsedgeError, match="no space left"):
            export(tiny_loaded, out, GGUF_ONLY, progress=False)
    else:
        with pytest.raises(KeyboardInterrupt):
            export(tiny_loaded, out, GGUF_ONLY, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_artifact_with_recipe_runs_the_recipe_function(tiny_loaded, tmp_path):
    """An artifact with a chunked CHESS recipe, run on the torch runtime from its GGUF, computes
    the same function as the source model with the recipe applied."""
    from sparsedge import sparsify

    rt_src = open_runtime(tiny_loaded, "torch")
    stats = sparsify.calibration_stats(rt_src, tiny_loaded.tokenizer,
                                       config=sparsify.CalibConfig(tokens=512, window=128, rows=256),
                                       progress=False)
    recipe = sparsify.add_chunking(sparsify.recipe_from_stats("chess", 0.5, stats, rt_src), stats, 16)
    out = tmp_path / "art"
    export(tiny_loaded, out, ExportConfig(formats=("gguf",), gguf_quants=("f32",)), recipe=recipe, progress=False)
    assert json.loads((out / "manifest.json").read_text())["recipe"]["method"] == "chess"
    toks = np.arange(4, 20)
    sparsify.apply(rt_src, recipe)
    ref = rt_src.forward(toks)
    rt_art = open_runtime(str(out), "torch")
    np.testing.assert_allclose(rt_art.forward(toks), ref, atol=1e-4, rtol=0)


def test_artifact_runtimes_need_an_artifact(tiny_loaded):
    with pytest.raises(SparsedgeError, match="sparsedge export"):
        open_runtime(tiny_loaded, "llamacpp")


def test_recipe_for_another_model_is_refused(tiny_loaded, tmp_path):
    from sparsedge import sparsify

    gem = load(str(save_folder("gemma3", tmp_path / "g")), progress=False)
    rt = open_runtime(gem, "torch")
    stats = sparsify.calibration_stats(rt, gem.tokenizer, config=sparsify.CalibConfig(tokens=256, window=128, rows=64),
                                       progress=False)
    r = sparsify.recipe_from_stats("cats", 0.5, stats, rt)
    with pytest.raises(SparsedgeError, match="another model"):
        export(tiny_loaded, tmp_path / "art", GGUF_ONLY, recipe=r, progress=False)
    assert not (tmp_path / "art").exists()
