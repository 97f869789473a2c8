"""A small GGUF reader for the native runtime's load path: the header over a read-only memory map,
large metadata arrays left undecoded, tensor data as numpy views of the map or as copies read on
demand.

    f = GGUFFile("model.q4_0.gguf")
    f.fields["llama.block_count"]             # 30 (scalars and small arrays decoded)
    f.fields["tokenizer.ggml.tokens"]         # LazyArray(STRING, 49152) — not decoded
    f.fields["tokenizer.ggml.tokens"].values()    # decoded on demand
    t = f.tensors["blk.0.ffn_up.weight"]      # TensorInfo: type "Q4_0", ne (576, 1536), offset, nbytes
    f.view(t)                                 # zero-copy numpy view of the mapped file
    f.read(t, row0, row1)                     # bytes of rows [row0, row1) copied by pread()

Why not gguf-py's GGUFReader here: it turns every element of every metadata array into numpy
views (the 49152-token vocab, its token types and ~49k merges become some 200k arrays), about
160 MB of Python objects for a 90 MB model, all kept alive as long as the reader is. This reader
walks the vocab once (string lengths only) and keeps an offset and a count. gguf-py stays the
writer, and the reference these results are tested against.

Everything is bounds-checked in Python: a truncated or corrupt file raises SparsedgeError (offsets
past the end, unknown value types, absurd counts, misaligned or overlapping-the-end tensor data),
never an IndexError deep in a struct call, and never a pointer handed to C. Only little-endian
GGUF v2/v3 files are read (what gguf-py and llama.cpp write on every platform we target).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SparsedgeError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# arrays up to this many elements are decoded while parsing (layer patterns, small lists); larger
# ones (vocab, merges, token types, scores) only record where they are
EAGER_ARRAY_MAX = 1024

# GGUF metadata value types: id -> (name, struct format or None for string/array)
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_NP = {"UINT8": "<u1", "INT8": "<i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4", "INT32": "<i4",
       "FLOAT32": "<f4", "BOOL": "?", "UINT64": "<u8", "INT64": "<i8", "FLOAT64": "<f8"}

# GGML tensor types: id -> (name, elements per block, bytes per block), as ggml/gguf-py define them
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}


@dataclass(frozen=True)
class LazyArray:
    """A metadata array left undecoded: ``count`` elements of ``type`` starting at byte ``offset``
    of the file (for STRING: each a uint64 length + UTF-8 bytes, walked once while parsing)."""

    file: "GGUFFile"
    type: str
    count: int
    offset: int
    nbytes: int

    def values(self) -> list[Any]:
        """The decoded elements (a list, as gguf-py's ``ReaderField.contents()`` gives)."""
        if self.type == "STRING":
            out, pos = [], self.offset
            for _ in range(self.count):
                s, pos = self.file._string(pos)
                out.append(s)
            return out
        return self.array().tolist()

    def array(self) -> np.ndarray:
        """Numeric arrays as a read-only numpy view of the mapped file (no copy)."""
        if self.type == "STRING":
            raise SparsedgeError("a string array has no numpy view; use values()")
        return np.frombuffer(self.file.map, dtype=_NP[self.type], count=self.count, offset=self.offset)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"LazyArray({self.type}, {self.count})"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str        # "F32", "Q4_0", ... or "type#<id>" for a type this table does not know
    type_id: int
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous axis (numpy shape = reversed)
    offset: int      # absolute byte offset of the data in the file
    nbytes: int      # -1 when the type is unknown (size not computable)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order (rows first)."""
        return tuple(reversed(self.ne))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (ne[0] elements) in this tensor's type."""
        _, be, bb = GGML_TYPES[self.type_id]
        return self.ne[0] // be * bb


class GGUFFile:
    """The parsed header of one GGUF file, with its read-only memory map kept open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = open(self.path, "rb")
        except OSError as e:
            raise SparsedgeError(f"cannot open GGUF file {self.path}: {e}") from e
        try:
            self.size = os.fstat(self._fd.fileno()).st_size
            if self.size < 24:
                raise SparsedgeError(f"{self.path.name} is not a GGUF file ({self.size} bytes)")
            self.map = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ primitives (bounds-checked)
    def _bad(self, what: str, pos: int) -> SparsedgeError:
        return SparsedgeError(f"{self.path.name} is not a readable GGUF file: {what} at byte {pos} "
                              f"(file has {self.size} bytes; truncated or corrupt?)")

    def _unpack(self, fmt: str, pos: int) -> tuple[Any, int]:
        n = struct.calcsize(fmt)
        if pos + n > self.size:
            raise self._bad(f"{fmt} past the end", pos)
        return struct.unpack_from(fmt, self.map, pos)[0], pos + n

    def _string(self, pos: int) -> tuple[str, int]:
        n, pos = self._unpack("<Q", pos)
        if n > self.size - pos:
            raise self._bad(f"string of {n} bytes past the end", pos)
        try:
            return self.map[pos:pos + n].decode("utf-8"), pos + n
        except UnicodeDecodeError as e:
            raise self._bad(f"string is not UTF-8 ({e.reason})", pos) from None

    def _skip_strings(self, pos: int, count: int) -> int:
        """Walk ``count`` strings (lengths only): the vocab costs no Python objects."""
        unpack, size, m = struct.unpack_from, self.size, self.map
        for _ in range(count):
            if pos + 8 > size:
                raise self._bad("string array past the end", pos)
            n = unpack("<Q", m, pos)[0]
            pos += 8 + n
            if pos > size:
                raise self._bad(f"string of {n} bytes past the end", pos - n)
        return pos

    def _value(self, vtype: int, pos: int, key: str) -> tuple[Any, int]:
        if vtype not in VALUE_TYPES:
            raise self._bad(f"metadata {key!r} has unknown value type {vtype}", pos)
        name, fmt = VALUE_TYPES[vtype]
        if fmt is not None:
            return self._unpack(fmt, pos)
        if name == "STRING":
            return self._string(pos)
        etype, pos = self._unpack("<I", pos)
        count, pos = self._unpack("<Q", pos)
        if etype not in VALUE_TYPES or VALUE_TYPES[etype][0] == "ARRAY":
            # nested arrays: neither gguf-py's writer nor llama.cpp's models use them
            raise self._bad(f"metadata {key!r} is an array of unsupported type {etype}", pos)
        ename, efmt = VALUE_TYPES[etype]
        esize = struct.calcsize(efmt) if efmt else 8  # a string takes at least its length
        if count * esize > self.size - pos:
            raise self._bad(f"metadata {key!r}: array of {count} {ename} past the end", pos)
        start = pos
        if ename == "STRING":
            pos = self._skip_strings(pos, count)
        else:
            pos += count * esize
        lazy = LazyArray(self, ename, count, start, pos - start)
        if count <= EAGER_ARRAY_MAX:
            return lazy.values(), pos
        return lazy, pos

    # ------------------------------------------------------------------ header
    def _parse(self) -> None:
        if self.map[:4] != MAGIC:
            raise SparsedgeError(f"{self.path.name} is not a GGUF file (magic {bytes(self.map[:4])!r})")
        version, pos = self._unpack("<I", 4)
        if version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            what = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version}"
            raise SparsedgeError(f"{self.path.name}: {what} is not supported (little-endian v2/v3 only)")
        self.version = version
        n_tensors, pos = self._unpack("<Q", pos)
        n_kv, pos = self._unpack("<Q", pos)
        # each key/value takes >= 12 bytes and each tensor info >= 24: absurd counts fail here,
        # not after a loop of 2^63 iterations
        if n_kv * 12 + n_tensors * 24 > self.size - pos:
            raise self._bad(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit", pos)
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, str] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            vtype, pos = self._unpack("<I", pos)
            if key in self.fields:
                raise self._bad(f"duplicate metadata key {key!r}", pos)
            self.fields[key], pos = self._value(vtype, pos, key)
            self.field_types[key] = VALUE_TYPES[vtype][0]
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise SparsedgeError(f"{self.path.name}: general.alignment = {align!r} is not a power of two")
        self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            n_dims, pos = self._unpack("<I", pos)
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._bad(f"tensor {name!r} has {n_dims} dimensions", pos)
            ne = []
            for _ in range(n_dims):
                d, pos = self._unpack("<Q", pos)
                ne.append(d)
            tid, pos = self._unpack("<I", pos)
            off, pos = self._unpack("<Q", pos)
            infos.append((name, tuple(ne), tid, off))
        self.data_offset = (pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, tid, off in infos:
            if name in self.tensors:
                raise SparsedgeError(f"{self.path.name}: duplicate tensor {name!r}")
            if off % align:
                raise SparsedgeError(f"{self.path.name}: tensor {name!r} data offset {off} is not aligned to {align}")
            if any(d == 0 for d in ne):
                raise SparsedgeError(f"{self.path.name}: tensor {name!r} has an empty dimension {list(ne)}")
            nbytes = -1
            if tid in GGML_TYPES:
                tname, be, bb = GGML_TYPES[tid]
                if ne[0] % be:
                    raise SparsedgeError(f"{self.path.name}: tensor {name!r} ({tname}) has {ne[0]} columns, "
                                         f"not whole blocks of {be}")
                n = 1
                for d in ne:
                    n *= d
                nbytes = n // be * bb
            else:
                tname = f"type#{tid}"
            start = self.data_offset + off
            if start > self.size or (nbytes > 0 and nbytes > self.size - start):
                raise SparsedgeError(f"{self.path.name}: tensor {name!r} ({nbytes} bytes at {start}) runs past "
                                     f"the end of the file ({self.size} bytes; truncated?)")
            self.tensors[name] = TensorInfo(name, tname, tid, ne, start, nbytes)
        self._drop(0, self.data_offset)

    def _drop(self, start: int, end: int) -> None:
        """Give back the pages of [start, end) that parsing touched (the vocab walk reads ~1.5 MB):
        they are file-backed and clean, so the kernel re-reads them if anything looks again."""
        page = mmap.PAGESIZE
        a, b = (start + page - 1) // page * page, end // page * page
        if b > a and hasattr(self.map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self.map.madvise(mmap.MADV_DONTNEED, a, b - a)
            except OSError:  # advisory only
                pass

    # ------------------------------------------------------------------ data
    def view(self, t: TensorInfo) -> np.ndarray:
        """Zero-copy view of a tensor's bytes in the map: float types in their numpy dtype and shape
        (rows first), block-quantized types as uint8 [rows..., row_bytes]."""
        if t.nbytes < 0:
            raise SparsedgeError(f"tensor {t.name!r} has unknown type {t.type}")
        dt = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
              "I32": np.int32, "I64": np.int64}.get(t.type)
        if dt is not None:
            return np.frombuffer(self.map, dtype=dt, count=t.nbytes // np.dtype(dt).itemsize,
                                 offset=t.offset).reshape(t.shape)
        a = np.frombuffer(self.map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return a.reshape(t.shape[:-1] + (t.row_bytes,))

    def read(self, t: TensorInfo, row0: int = 0, row1: int | None = None) -> np.ndarray:
        """A private copy of rows [row0, row1) of a 2-D tensor (uint8 [rows, row_bytes]) by pread():
        the file's pages are not mapped into this process, so a weight that is re-laid out costs
        its new layout only, not also the original."""
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row1 = rows if row1 is None else row1
        rb = t.row_bytes
        if not 0 <= row0 <= row1 <= rows:
            raise SparsedgeError(f"rows [{row0}, {row1}) of tensor {t.name!r} ({rows} rows)")
        buf = np.empty((row1 - row0, rb), np.uint8)
        mv, want, got, off = memoryview(buf).cast("B"), buf.nbytes, 0, t.offset + row0 * rb
        while got < want:
            if hasattr(os, "preadv"):
                n = os.preadv(self._fd.fileno(), [mv[got:]], off + got)
            else:  # no preadv (older macOS, Windows): seek + readinto on our own handle
                self._fd.seek(off + got)
                n = self._fd.readinto(mv[got:])
            if not n:
                break
            got += n
        if got != want:
            raise SparsedgeError(f"{self.path.name}: short read of tensor {t.name!r} ({got} of {want} bytes; "
                                 "was the file truncated while loading?)")
        return buf

    def close(self) -> None:
        m = getattr(self, "map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # numpy views still alive; the map closes when they go
                pass
        self._fd.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.fields)} fields, {len(self.tensors)} tensors)"
