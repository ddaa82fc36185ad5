"""GGUF source: our own parser for GGUF v2/v3 little-endian files, memory-mapped read-only.

Layout and the hostile-input checklist: docs/gguf.md §1 (ggml's src/gguf.cpp is the
reference reader). Everything read from the file is validated before it is trusted: every count and
length is bounded by the bytes that remain *before* any loop or allocation, so a 40-byte file that
claims 2^63 tensors fails in microseconds instead of hanging (gguf-py 0.19.0 hangs on it). Errors are
FileFormatError (malformed) or UnsupportedError (valid but not handled: big-endian, v1, removed
types), naming the file, the field or tensor, and the byte offset of the bad field.

Metadata arrays are decoded in one pass: numeric arrays with one np.frombuffer, string arrays with a
tight struct.unpack_from loop (gguf-py builds a numpy object per element and needs ~10 s for a 150k
vocabulary; this needs ~0.1 s).
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import FileFormatError, MissingTensorError, QuantloadError, UnsupportedError
from ..ggml_types import GGML_TYPES
from .base import Source, TensorInfo
from .gguf_strings import StringArray

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20          # larger ones only serve to overflow padding maths (GHSA-96jg-mvhq-q7q7)
MAX_KEY_BYTES = 65535            # the spec's limit on metadata key length
MAX_NAME_BYTES = 63              # ggml: name.length() < GGML_MAX_NAME (64)
MAX_DIMS = 4                     # GGML_MAX_DIMS
HEADER_BYTES = 24                # magic, version, tensor_count, metadata_kv_count
# Smallest possible records, used to bound the counts before looping: a KV is an 8-byte key length,
# >= 1 key byte, a 4-byte type and >= 1 value byte; a tensor info is an 8-byte name length, >= 1 name
# byte, n_dims (4), >= 1 dim (8), type (4) and offset (8).
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
# ggml ids whose type_traits have blck_size 0: once valid, now refused by ggml itself.
REMOVED_GGML_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
                      36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}


class ValueType(IntEnum):
    """gguf_metadata_value_type: the type ids stored in `GGUFSource.field_types` / `array_types`."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# little-endian numpy dtype of each fixed-size value type (BOOL is read as bytes, then != 0)
_NUMPY_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"), ValueType.INT8: np.dtype("<i1"), ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"), ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("<u1"), ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"), ValueType.FLOAT64: np.dtype("<f8"),
}
# explicit struct codes: numpy's dtype.char for <u8 is 'L', which is 4 bytes in struct's "<" mode
_SCALAR_STRUCTS = {t: struct.Struct("<" + code) for t, code in [
    (ValueType.UINT8, "B"), (ValueType.INT8, "b"), (ValueType.UINT16, "H"), (ValueType.INT16, "h"),
    (ValueType.UINT32, "I"), (ValueType.INT32, "i"), (ValueType.FLOAT32, "f"), (ValueType.BOOL, "B"),
    (ValueType.UINT64, "Q"), (ValueType.INT64, "q"), (ValueType.FLOAT64, "d")]}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml types that are plain element arrays, viewable as torch tensors of this dtype
_PLAIN_TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


def _type_name(type_id: int) -> str:
    try:
        return ValueType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


class _TensorRecord(NamedTuple):
    name: str
    ne: tuple[int, ...]          # ggml order: ne[0] is the contiguous axis
    ggml_type: int
    offset: int                  # relative to the data section
    nbytes: int
    offset_field: int            # where the offset field sits in the file, for error messages


class _Cursor:
    """Reads little-endian fields from the map, refusing to run past its end."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, message: str, key: str, offset: int, error=FileFormatError):
        raise error(message, file=self.path, key=key, offset=offset)

    def need(self, n: int, key: str, what: str) -> None:
        if n > self.end - self.pos:
            self.fail(f"file truncated: {what} needs {n} bytes but only {self.end - self.pos} remain",
                      key, self.pos)

    def u32(self, key: str, what: str) -> int:
        self.need(4, key, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, key: str, what: str) -> int:
        self.need(8, key, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, key: str, what: str) -> bytes:
        start = self.pos
        n = self.u64(key, f"{what} length")
        if n > self.end - self.pos:
            self.fail(f"{what} claims {n} bytes but only {self.end - self.pos} remain", key, start)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def string(self, key: str, what: str) -> str:
        start = self.pos
        data = self.raw_string(key, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", key, start + 8 + e.start)


def _read_string_array(cur: _Cursor, count: int, key: str) -> StringArray:
    """`count` gguf_strings in one tight pass (the count is already bounded by 8 bytes per element):
    every length and every element's UTF-8 is checked here; the strings are decoded again on access."""
    buf, pos, end = cur.buf, cur.pos, cur.end
    first = pos
    unpack = _U64.unpack_from
    # Grown by append, not preallocated: a lying count in a big file costs only what it really holds.
    starts: list[int] = []
    append = starts.append
    i = 0
    try:
        for i in range(count):
            if pos + 8 > end:
                cur.fail(f"file truncated: string element {i} of {count} has no length field", key, pos)
            (n,) = unpack(buf, pos)
            pos += 8
            stop = pos + n
            if stop > end:
                cur.fail(f"string element {i} of {count} claims {n} bytes but only {end - pos} remain",
                         key, pos - 8)
            buf[pos:stop].decode("utf-8")
            append(pos)
            pos = stop
    except UnicodeDecodeError as e:
        cur.fail(f"string element {i} of {count} is not valid UTF-8 ({e.reason} at byte {e.start})",
                 key, pos + e.start)
    cur.pos = pos
    # the region is copied out of the map (metadata must outlive close()); element i is data[s_i:e_i]
    starts_a = np.fromiter(starts, dtype=np.int64, count=len(starts))
    ends_a = np.empty_like(starts_a)
    if len(starts_a):
        ends_a[:-1] = starts_a[1:] - 8
        ends_a[-1] = pos
    return StringArray(bytes(buf[first:pos]), starts_a - first, ends_a - first)


def _read_array(cur: _Cursor, key: str) -> tuple[Any, int]:
    type_offset = cur.pos
    elem_type = cur.u32(key, "array element type")
    if elem_type == ValueType.ARRAY:
        cur.fail("nested arrays are not supported (ggml refuses them too)", key, type_offset)
    if elem_type > ValueType.FLOAT64:
        cur.fail(f"unknown array element type {elem_type} (expected 0..12)", key, type_offset)
    count_offset = cur.pos
    count = cur.u64(key, "array length")
    # Bound the count by the bytes left before allocating anything: each element takes at least
    # its fixed size, a string at least its 8-byte length.
    elem_bytes = 8 if elem_type == ValueType.STRING else _NUMPY_DTYPES[elem_type].itemsize
    if count > cur.remaining // elem_bytes:
        cur.fail(f"array of {count} {_type_name(elem_type)} elements needs at least {count * elem_bytes} "
                 f"bytes but only {cur.remaining} remain", key, count_offset)
    if elem_type == ValueType.STRING:
        return _read_string_array(cur, count, key), elem_type
    dtype = _NUMPY_DTYPES[elem_type]
    if count == 0:
        return (np.zeros(0, dtype=bool) if elem_type == ValueType.BOOL
                else np.zeros(0, dtype=dtype.newbyteorder("="))), elem_type
    raw = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
    # Copy out of the map (metadata is small and must outlive close()), in native byte order.
    values = raw != 0 if elem_type == ValueType.BOOL else raw.astype(dtype.newbyteorder("="))
    del raw  # release the buffer export at once, so close() can unmap
    cur.pos += count * elem_bytes
    return values, elem_type


def _read_value(cur: _Cursor, value_type: int, key: str) -> Any:
    if value_type == ValueType.STRING:
        return cur.string(key, "string value")
    packer = _SCALAR_STRUCTS[value_type]
    cur.need(packer.size, key, f"{ValueType(value_type).name} value")
    (v,) = packer.unpack_from(cur.buf, cur.pos)
    cur.pos += packer.size
    # gguf.cpp reads BOOL as int8 and takes any non-zero byte as true; so do we.
    return bool(v) if value_type == ValueType.BOOL else v


class GGUFSource(Source):
    """A GGUF file, validated when opened; tensors are zero-copy views of a read-only memory map."""

    kind = "gguf"

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, int] = {}
        self.array_types: dict[str, int] = {}
        self.metadata = self.fields
        self.alignment = DEFAULT_ALIGNMENT
        self._tensors: dict[str, _TensorRecord] = {}
        from .files import require_regular_file
        require_regular_file(self.path)
        self._mm = self._map()
        try:
            self._parse(_Cursor(self._mm, self.path))
            # Through numpy, not torch.frombuffer: a numpy array holds a buffer export on the map,
            # which makes mmap.close() refuse (BufferError) while any view lives, instead of
            # unmapping memory that tensors still point at (torch.frombuffer does not; segfault).
            if hasattr(mmap, "MADV_DONTNEED") and self.data_offset >= mmap.PAGESIZE:
                # everything in the metadata was copied out: its pages may leave memory
                self._mm.madvise(mmap.MADV_DONTNEED, 0, self.data_offset // mmap.PAGESIZE * mmap.PAGESIZE)
            with warnings.catch_warnings():
                # torch warns that the map is not writable; callers are told not to write (Source.get).
                warnings.simplefilter("ignore", UserWarning)
                self._bytes = torch.from_numpy(np.frombuffer(self._mm, dtype=np.uint8))
        except BaseException:
            self.close()
            raise

    # --- parsing ----------------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise FileFormatError("empty file, expected a GGUF header", file=self.path, key="magic",
                                          offset=0)
                # copy-on-write: models keep zero-copy views of the blocks as their weights; a write
                # to one gets private pages instead of a segfault
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise FileFormatError(f"cannot open: {e}", file=self.path) from e

    def _parse(self, cur: _Cursor) -> None:
        self._parse_header(cur)
        n_tensors, n_kv = self._parse_counts(cur)
        for _ in range(n_kv):
            self._parse_kv(cur)
        for _ in range(n_tensors):
            record = self._parse_tensor_info(cur)
            self._tensors[record.name] = record
        # gguf-py and gguf.cpp pad the end of the tensor infos up to the alignment.
        self.data_offset = cur.pos + (-cur.pos) % self.alignment
        self._check_layout()

    def _parse_header(self, cur: _Cursor) -> None:
        cur.need(4, "magic", "the GGUF magic")
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            cur.fail(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}", "magic", 0)
        cur.pos = 4
        version = cur.u32("version", "the version")
        if version == 0:
            cur.fail("GGUF version 0 is invalid", "version", 4)
        if version & 0xFFFF == 0:
            # The version word reads byte-swapped: the file was written big-endian (docs/gguf.md §1.5).
            cur.fail(f"big-endian GGUF is not supported (version word {version:#010x} is byte-swapped "
                     f"version {int.from_bytes(version.to_bytes(4, 'little'), 'big')}); convert it with "
                     "gguf-py's gguf_convert_endian.py", "version", 4, UnsupportedError)
        if version == 1:
            cur.fail("GGUF version 1 is no longer supported (32-bit counts); re-convert the model",
                     "version", 4, UnsupportedError)
        if version not in SUPPORTED_VERSIONS:
            cur.fail(f"GGUF version {version} is newer than the supported versions {SUPPORTED_VERSIONS}",
                     "version", 4, UnsupportedError)
        self.version = version

    def _parse_counts(self, cur: _Cursor) -> tuple[int, int]:
        n_tensors = cur.u64("tensor_count", "the tensor count")
        n_kv = cur.u64("metadata_kv_count", "the metadata count")
        after = cur.remaining
        if n_tensors > after // MIN_TENSOR_INFO_BYTES:
            cur.fail(f"{n_tensors} tensors cannot fit: each tensor info takes at least "
                     f"{MIN_TENSOR_INFO_BYTES} bytes and only {after} bytes follow the header",
                     "tensor_count", 8)
        if n_kv > (after - n_tensors * MIN_TENSOR_INFO_BYTES) // MIN_KV_BYTES:
            cur.fail(f"{n_kv} metadata entries cannot fit: each takes at least {MIN_KV_BYTES} bytes and "
                     f"only {after} bytes follow the header ({n_tensors} tensor infos included)",
                     "metadata_kv_count", 16)
        return n_tensors, n_kv

    def _parse_kv(self, cur: _Cursor) -> None:
        start = cur.pos
        where = f"metadata entry at offset {start}"
        key_len = cur.u64(where, "key length")
        if key_len == 0:
            cur.fail("empty metadata key", where, start)
        if key_len > MAX_KEY_BYTES:
            cur.fail(f"metadata key of {key_len} bytes is longer than the {MAX_KEY_BYTES} the spec allows",
                     where, start)
        cur.need(key_len, where, "the metadata key")
        raw = cur.buf[cur.pos:cur.pos + key_len]
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            cur.fail(f"metadata key is not valid UTF-8 ({e.reason} at byte {e.start})",
                     raw.decode("utf-8", "backslashreplace"), cur.pos + e.start)
        cur.pos += key_len
        if key in self.fields:
            cur.fail("duplicate metadata key", key, start)
        type_offset = cur.pos
        value_type = cur.u32(key, "value type")
        if value_type > ValueType.FLOAT64:
            cur.fail(f"unknown metadata value type {value_type} (expected 0..12)", key, type_offset)
        value_offset = cur.pos
        if value_type == ValueType.ARRAY:
            value, elem_type = _read_array(cur, key)
            self.array_types[key] = elem_type
            self.field_types[key] = elem_type
        else:
            value = _read_value(cur, value_type, key)
            self.field_types[key] = value_type
        self.fields[key] = value
        if key == "general.alignment":
            self._set_alignment(cur, value, value_type, type_offset, value_offset)

    def _set_alignment(self, cur: _Cursor, value, value_type: int, type_offset: int, value_offset: int):
        key = "general.alignment"
        if value_type != ValueType.UINT32:
            cur.fail(f"must be a UINT32, found {_type_name(value_type)}", key, type_offset)
        if value == 0 or value & (value - 1) or value > MAX_ALIGNMENT:
            cur.fail(f"alignment {value} is invalid: expected a power of two between 1 and {MAX_ALIGNMENT}",
                     key, value_offset)
        self.alignment = value

    def _parse_tensor_info(self, cur: _Cursor) -> _TensorRecord:
        start = cur.pos
        where = f"tensor info at offset {start}"
        name_len = cur.u64(where, "tensor name length")
        if name_len == 0:
            cur.fail("empty tensor name", where, start)
        if name_len > MAX_NAME_BYTES:
            cur.fail(f"tensor name of {name_len} bytes is longer than ggml's limit of {MAX_NAME_BYTES}",
                     where, start)
        cur.pos = start
        name = cur.string(where, "tensor name")
        if name in self._tensors:
            cur.fail("duplicate tensor name", name, start)
        ndims_offset = cur.pos
        n_dims = cur.u32(name, "n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"n_dims is {n_dims}, expected 1..{MAX_DIMS}", name, ndims_offset)
        dims_offset = cur.pos
        cur.need(8 * n_dims, name, "dims")
        ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        for i, d in enumerate(ne):
            if d == 0:
                cur.fail(f"dim {i} is 0: empty tensors are not supported", name, dims_offset + 8 * i)
        type_offset = cur.pos
        type_id = cur.u32(name, "ggml type")
        if type_id in REMOVED_GGML_TYPES:
            cur.fail(f"ggml type {type_id} ({REMOVED_GGML_TYPES[type_id]}) was removed from ggml; "
                     "re-quantize the model", name, type_offset, UnsupportedError)
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None or ggml_type.block_size <= 0:
            cur.fail(f"unknown ggml type id {type_id} (known: {sorted(GGML_TYPES)})", name, type_offset)
        if ne[0] % ggml_type.block_size:
            cur.fail(f"dim 0 is {ne[0]}, not a multiple of the {ggml_type.name} block size "
                     f"{ggml_type.block_size}", name, dims_offset)
        # Python ints: no overflow; the bound against the file size comes right after.
        nbytes = ne[0] // ggml_type.block_size * ggml_type.type_size
        for d in ne[1:]:
            nbytes *= d
        if nbytes > cur.end:
            cur.fail(f"shape {list(ne)} of {ggml_type.name} needs {nbytes} bytes, more than the whole "
                     f"file ({cur.end} bytes)", name, dims_offset)
        offset_field = cur.pos
        offset = cur.u64(name, "tensor data offset")
        if offset % self.alignment:
            cur.fail(f"data offset {offset} is not a multiple of the alignment {self.alignment}",
                     name, offset_field)
        return _TensorRecord(name, ne, type_id, offset, nbytes, offset_field)

    def _check_layout(self) -> None:
        """Every tensor inside the file, none overlapping another.

        We do not require ggml's exact contiguous layout (offset_i == sum of the padded sizes before
        it, in info order), which llama.cpp enforces: what makes reading safe is bounds and no overlap,
        and gguf-py, which wrote most files in the wild, accepts any such layout too. A file with gaps
        or tensors out of order is odd but harmless; refusing it would only make us stricter than the
        tool that produced it. Our writer emits the exact layout, so what we write llama.cpp reads.
        """
        size = len(self._mm)
        data_offset = self.data_offset
        for t in self._tensors.values():
            end = data_offset + t.offset + t.nbytes
            if end > size:
                raise FileFormatError(
                    f"tensor data [{data_offset + t.offset}, {end}) is not within the file "
                    f"({size} bytes): the file is truncated or the offset is corrupt",
                    file=self.path, key=t.name, offset=t.offset_field)
        by_offset = sorted(self._tensors.values(), key=lambda r: r.offset)
        for prev, t in zip(by_offset, by_offset[1:]):
            if t.offset < prev.offset + prev.nbytes:
                raise FileFormatError(
                    f"tensor data at relative offset {t.offset} overlaps tensor {prev.name!r} "
                    f"[{prev.offset}, {prev.offset + prev.nbytes})", file=self.path, key=t.name,
                    offset=t.offset_field)

    # --- Source API -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._tensors)

    def _record(self, name: str) -> _TensorRecord:
        record = self._tensors.get(name)
        if record is None:
            raise MissingTensorError("no such tensor in this GGUF file", file=self.path, key=name)
        return record

    def info(self, name: str) -> TensorInfo:
        r = self._record(name)
        ggml_name = GGML_TYPES[r.ggml_type].name
        return TensorInfo(name=r.name, shape=tuple(reversed(r.ne)),
                          dtype=_PLAIN_TORCH_DTYPES.get(ggml_name, torch.uint8), nbytes=r.nbytes,
                          file=self.path, offset=self.data_offset + r.offset, ggml_type=r.ggml_type)

    def get(self, name: str) -> torch.Tensor:
        """The tensor's raw bytes: a zero-copy, read-only uint8 1-D view of the map."""
        r = self._record(name)
        if self._bytes is None:
            raise QuantloadError("the GGUF source is closed", file=self.path, key=name)
        start = self.data_offset + r.offset
        return self._bytes[start:start + r.nbytes]

    def get_typed(self, name: str, *, copy: bool = False) -> torch.Tensor:
        """F32/F16/BF16/F64/I8..I64 tensors as a view with their dtype and torch shape. copy=True reads
        the bytes with pread instead: for small tensors (norms) that keeps the map's pages out of memory
        (a page fault maps the 64 KiB around it)."""
        r = self._record(name)
        ggml_name = GGML_TYPES[r.ggml_type].name
        dtype = _PLAIN_TORCH_DTYPES.get(ggml_name)
        if dtype is None:
            raise UnsupportedError(f"{ggml_name} is a block type with no torch dtype; use get() for its "
                                   "bytes and a GGUF scheme to decode them", file=self.path, key=name)
        if copy:
            with open(self.path, "rb") as f:
                data = bytearray(os.pread(f.fileno(), r.nbytes, self.data_offset + r.offset))
            if len(data) != r.nbytes:
                raise FileFormatError(f"file truncated: read {len(data)} of {r.nbytes} bytes", file=self.path,
                                      key=name, offset=self.data_offset + r.offset)
            return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(tuple(reversed(r.ne)))
        raw = self.get(name)
        if (self.data_offset + r.offset) % dtype.itemsize:
            # Only possible with general.alignment < itemsize: a misaligned view is not safe for every
            # kernel, so this rare case pays for a copy.
            raw = raw.clone()
        return raw.view(dtype).view(tuple(reversed(r.ne)))

    def close(self) -> None:
        self._bytes = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Tensors from get() still view the map; it is unmapped when the last one is freed.
                pass
            self._mm = None
