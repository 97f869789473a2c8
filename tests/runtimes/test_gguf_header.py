"""The native runtime's own GGUF header reader (runtimes/native/gguf_header.py) against gguf-py's
GGUFReader on files our exporter writes (tiny models, every quant type, a real BPE vocab with
merges) and on files with every metadata value type; truncated and corrupt files must raise
SparsedgeError and nothing else; large arrays stay undecoded; the chunked re-layout of the loader
equals the whole-tensor one; a native session imports neither torch nor gguf-py."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from sparsedge import load  # noqa: E402
from sparsedge.errors import SparsedgeError  # noqa: E402
from sparsedge.runtimes.native import gguf_header as gh  # noqa: E402
from sparsedge.runtimes.native import loader  # noqa: E402
from sparsedge.runtimes.native._lib import COL, R8, ROW  # noqa: E402

from tiny import hf_model, tiny_tokenizer  # noqa: E402

QT = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- comparison with gguf-py


def _assert_same_as_gguf_py(path):
    ref = gguf.GGUFReader(str(path))
    f = gh.GGUFFile(path)
    # metadata: gguf-py also lists the header's own counts as pseudo-fields (GGUF.*)
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(f.fields) == ref_keys
    for k in ref_keys:
        rf = ref.fields[k]
        want = rf.contents()
        got = f.fields[k]
        assert f.field_types[k] == rf.types[0].name, k
        if isinstance(got, gh.LazyArray):
            assert got.count > gh.EAGER_ARRAY_MAX and got.type == rf.types[-1].name, k
            got = got.values()
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=0, abs=0) or np.float32(got) == np.float32(want), k
        elif isinstance(want, list) and want and isinstance(want[0], float):
            np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64), err_msg=k)
        else:
            assert got == want, k
    # tensors: same names, order, types, shapes, offsets, sizes and bytes
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert mine.type == t.tensor_type.name and mine.type_id == int(t.tensor_type)
        assert mine.ne == tuple(int(x) for x in t.shape)
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        v = f.view(mine)
        np.testing.assert_array_equal(v.view(np.uint8).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
        if len(mine.ne) == 2:  # pread copy of a row range equals the mapped bytes
            rows = mine.ne[1]
            raw = v.view(np.uint8).reshape(rows, -1)
            np.testing.assert_array_equal(f.read(mine, 1, rows), raw[1:])
    assert f.alignment == (ref.alignment if hasattr(ref, "alignment") else 32)
    f.close()
    return f


@pytest.fixture(scope="module")
def tiny_artifact_model(tmp_path_factory):
    """A tiny Llama HF folder with a BPE tokenizer that has merges (vocab 320)."""
    path = tmp_path_factory.mktemp("m") / "llama"
    tok = tiny_tokenizer(320)
    hf_model("llama", vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return load(str(path), progress=False)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
def test_exported_files_parse_like_gguf_py(tiny_artifact_model, tmp_path, quant):
    from sparsedge.export.gguf import write_gguf

    p = tmp_path / f"m.{quant}.gguf"
    write_gguf(tiny_artifact_model, p, quant=quant, progress=False)
    f = _assert_same_as_gguf_py(p)
    assert len(f.fields["tokenizer.ggml.tokens"]) == 320 and f.fields["tokenizer.ggml.merges"]


def _all_types_file(path, n_big=5000):
    """Every metadata value type, small and big arrays of each, and tensors of several types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_string("t.empty", "")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1.0 / 3)
    w.add_array("t.small_ints", [1, 2, 3])
    w.add_array("t.small_bools", [True, False, True])
    w.add_array("t.small_strs", ["a", "", "ü"])
    w.add_array("t.big_strs", [f"tok{i}" * (i % 5) for i in range(n_big)])
    w.add_array("t.big_ints", list(range(n_big)))
    w.add_array("t.big_floats", [i / 7 for i in range(n_big)])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    w.add_tensor("w.f32", a)
    w.add_tensor("w.f16", a.astype(np.float16))
    w.add_tensor("w.q8", gguf.quants.quantize(a, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("w.q4", gguf.quants.quantize(a, QT.Q4_0), raw_dtype=QT.Q4_0)
    w.add_tensor("w.q41", gguf.quants.quantize(a, QT.Q4_1), raw_dtype=QT.Q4_1)
    w.add_tensor("v.f32", a[0])
    w.add_tensor("x.3d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_parses_like_gguf_py(tmp_path):
    p = _all_types_file(tmp_path / "types.gguf")
    _assert_same_as_gguf_py(p)
    f = gh.GGUFFile(p)
    assert f.fields["t.small_strs"] == ["a", "", "ü"]
    assert f.fields["t.u64"] == 2**63 + 5 and f.fields["t.str"] == "héllo ✓"


def test_type_table_matches_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES

    for tid, (name, be, bb) in gh.GGML_TYPES.items():
        t = QT(tid)
        assert t.name == name and tuple(GGML_QUANT_SIZES[t]) == (be, bb)


def test_big_arrays_stay_undecoded(tmp_path):
    """A 200k-entry vocab: kept as offset + count (no Python object per token), decoded on demand."""
    n = 200_000
    p = _all_types_file(tmp_path / "big.gguf", n_big=n)
    tracemalloc.start()
    f = gh.GGUFFile(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, f"parsing allocated {peak} bytes of Python objects"
    for k in ("t.big_strs", "t.big_ints", "t.big_floats"):
        assert isinstance(f.fields[k], gh.LazyArray) and len(f.fields[k]) == n
    assert f.fields["t.big_strs"].values()[:7] == ["", "tok1", "tok2tok2", "tok3tok3tok3", "tok4" * 4, "", "tok6"]
    a = f.fields["t.big_ints"].array()
    assert a.dtype == np.int32 and a[12345] == 12345 and not a.flags.writeable
    with pytest.raises(SparsedgeError):
        f.fields["t.big_strs"].array()


# ----------------------------------------------------------------------------- malformed files


def test_truncated_anywhere_raises_sparsedge_error(tmp_path):
    data = _all_types_file(tmp_path / "t.gguf", n_big=50).read_bytes()
    bad = tmp_path / "cut.gguf"
    cuts = sorted(set(list(range(0, 64)) + list(range(64, len(data), 97)) + [len(data) - 1]))
    for n in cuts:
        bad.write_bytes(data[:n])
        with pytest.raises(SparsedgeError):
            gh.GGUFFile(bad)


def test_corrupt_bytes_raise_sparsedge_error_or_parse(tmp_path):
    """Random byte flips in the header: a clear error or a parse, never another exception."""
    p = _all_types_file(tmp_path / "c.gguf", n_big=50)
    data = bytearray(p.read_bytes())
    hdr_end = gh.GGUFFile(p).data_offset
    rng = np.random.default_rng(1)
    bad = tmp_path / "flip.gguf"
    errors = 0
    for _ in range(300):
        d = bytearray(data)
        for i in rng.integers(0, hdr_end, size=3):
            d[i] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(d))
        try:
            gh.GGUFFile(bad).close()
        except SparsedgeError:
            errors += 1
    assert errors > 0


def _header(version=3, n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


@pytest.mark.parametrize("blob, match", [
    (b"GGML" + bytes(40), "magic"),
    (_header(version=1) + bytes(16), "version 1"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + bytes(8), "big-endian"),
    (_header(n_kv=2**62) + bytes(64), "cannot fit"),
    (_header(n_kv=1) + _kv("a", 99, b"\0" * 8), "unknown value type"),
    (_header(n_kv=1) + _kv("a", 8, struct.pack("<Q", 2**40) + b"x"), "past the end"),
    (_header(n_kv=1) + _kv("a", 8, struct.pack("<Q", 2) + b"\xff\xfe"), "UTF-8"),
    (_header(n_kv=1) + _kv("a", 9, struct.pack("<IQ", 4, 2**50) + bytes(8)), "past the end"),
    (_header(n_kv=1) + _kv("a", 9, struct.pack("<IQ", 9, 1) + bytes(16)), "unsupported type"),
    (_header(n_kv=2) + _kv("a", 4, bytes(4)) + _kv("a", 4, bytes(4)), "duplicate"),
    (_header(n_kv=1) + _kv("general.alignment", 4, struct.pack("<I", 48)), "power of two"),
])
def test_specific_corruptions(tmp_path, blob, match):
    p = tmp_path / "x.gguf"
    p.write_bytes(blob)
    with pytest.raises(SparsedgeError, match=match):
        gh.GGUFFile(p)


def _tensor_info(name: str, ne, tid: int, off: int) -> bytes:
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + \
        struct.pack("<IQ", tid, off)


@pytest.mark.parametrize("info, match", [
    (_tensor_info("w", (32, 4), 0, 8), "not aligned"),
    (_tensor_info("w", (32, 4000), 0, 0), "past the end"),
    (_tensor_info("w", (33, 4), 8, 0), "whole blocks"),
    (_tensor_info("w", (0, 4), 0, 0), "empty dimension"),
    (_tensor_info("w", (1, 1, 1, 1, 1), 0, 0), "5 dimensions"),
    (_tensor_info("w", (2**62, 2**62), 0, 0), "past the end"),
])
def test_bad_tensor_infos(tmp_path, info, match):
    p = tmp_path / "x.gguf"
    body = _header(n_tensors=1) + info
    pad = (-len(body)) % 32
    p.write_bytes(body + bytes(pad) + bytes(32 * 4 * 4))
    with pytest.raises(SparsedgeError, match=match):
        gh.GGUFFile(p)


# ----------------------------------------------------------------------------- the loader's chunked re-layout


@pytest.mark.parametrize("gtype", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("rows", [256, 200])  # 200: not whole 32-row groups (COL Q4_0 falls back)
def test_chunked_build_equals_whole_tensor(tmp_path, monkeypatch, gtype, rows):
    cols = 96
    a = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    if gtype in ("F32", "F16"):
        w.add_tensor("w", a.astype(np.float16) if gtype == "F16" else a)
    else:
        w.add_tensor("w", gguf.quants.quantize(a, QT[gtype]), raw_dtype=QT[gtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gh.GGUFFile(tmp_path / "w.gguf")
    t = f.tensors["w"]
    whole = loader.weight_from_raw(gtype, f.read(t), rows, cols)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 1)  # 32 rows per chunk: many chunks and a ragged tail
    layouts = {ROW: whole, COL: loader.to_col(whole)}
    if loader.r8_ok(gtype, rows):
        layouts[R8] = loader.to_r8(whole)
    for layout, want in layouts.items():
        got = loader.build_weight(f, t, rows, cols, layout)
        assert (got.type, got.layout) == (want.type, want.layout)
        np.testing.assert_array_equal(got.q, want.q)
        if want.d is None:
            assert got.d is None
        else:
            np.testing.assert_array_equal(got.d, want.d)
    if gtype == "F32":  # row-major F32 stays a view of the file
        assert loader._is_mapped(loader.build_weight(f, t, rows, cols, ROW).q)


# ----------------------------------------------------------------------------- no torch on the runtime path


def test_native_session_imports_neither_torch_nor_gguf_py(tmp_path):
    """A fresh process opens a dense native session (a GGUF file, and an artifact folder through
    open_runtime) and decodes: torch, transformers and gguf-py must stay out of sys.modules."""
    from sparsedge.runtimes.native import level

    try:
        level()
    except SparsedgeError as e:
        pytest.skip(str(e))
    w = gguf.GGUFWriter(str(tmp_path / "model.f32.gguf"), "llama")
    H, F, V, L = 64, 128, 96, 2
    for k, v in [("block_count", L), ("embedding_length", H), ("feed_forward_length", F)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(V)])
    rng = np.random.default_rng(3)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", r(V, H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(L):
        for n, s in [("attn_q", (H, H)), ("attn_k", (32, H)), ("attn_v", (32, H)), ("attn_output", (H, H)),
                     ("ffn_gate", (F, H)), ("ffn_up", (F, H)), ("ffn_down", (H, F))]:
            w.add_tensor(f"blk.{i}.{n}.weight", r(*s))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "gguf_quants": ["f32"]}))
    code = f"""
import sys
from sparsedge.runtimes import open_runtime
from sparsedge.runtimes.native import NativeRuntime
a = NativeRuntime({str(tmp_path / 'model.f32.gguf')!r}, threads=1)
b = open_runtime({str(tmp_path)!r}, "native", quant="f32", threads=1)
for rt in (a, b):
    t = 1
    for _ in range(4):
        t = int(rt.forward([t])[-1].argmax())
print(sorted(m for m in ("torch", "transformers", "gguf") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
