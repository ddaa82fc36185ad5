"""GGUF v3 little-endian bytes: the header, metadata key-values and tensor-info records.

Layout: docs/gguf.md §1. Values are typed the way gguf-py's GGUFWriter types them
(numpy scalars and arrays keep their dtype, Python int -> INT32, float -> FLOAT32, bool -> BOOL,
str -> STRING, list -> ARRAY of its elements' type), so a field we write reads back equal.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, UnsupportedError
from ..sources.gguf_strings import StringArray

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20          # our reader refuses more (padding overflow class of bugs)
MAX_NAME_BYTES = 63              # ggml: name.length() < GGML_MAX_NAME (64)
MAX_DIMS = 4

# gguf_metadata_value_type
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

_NUMPY_TO_GGUF = {np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8, np.dtype(np.uint16): UINT16,
                  np.dtype(np.int16): INT16, np.dtype(np.uint32): UINT32, np.dtype(np.int32): INT32,
                  np.dtype(np.float32): FLOAT32, np.dtype(np.bool_): BOOL, np.dtype(np.uint64): UINT64,
                  np.dtype(np.int64): INT64, np.dtype(np.float64): FLOAT64}
_GGUF_TO_NUMPY = {t: d.newbyteorder("<") for d, t in _NUMPY_TO_GGUF.items()}
_GGUF_TO_NUMPY[BOOL] = np.dtype(np.uint8)    # stored as 0/1 bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def align_offset(x: int, alignment: int) -> int:
    return x + (alignment - x % alignment) % alignment


def check_alignment(alignment) -> int:
    """The alignment llama.cpp and our reader accept: a power of two, multiple of 8, at most 1 MiB."""
    if (isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)) or alignment < 8
            or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT):
        raise ConfigError(f"GGUF alignment must be a power of two between 8 and {MAX_ALIGNMENT}, got "
                          f"{alignment!r}", key="general.alignment")
    return int(alignment)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return _U64.pack(len(b)) + b


def _scalar_type(value: Any, key: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        return BOOL
    if isinstance(value, str):
        return STRING
    if isinstance(value, np.generic):
        t = _NUMPY_TO_GGUF.get(value.dtype)
        if t is None:
            raise UnsupportedError(f"numpy {value.dtype} has no GGUF value type", key=key)
        return t
    if isinstance(value, int):
        return INT32 if -2**31 <= value < 2**31 else INT64
    if isinstance(value, float):
        return FLOAT32
    raise UnsupportedError(f"a {type(value).__name__} value cannot be written as GGUF metadata", key=key)


def _array(value: Any, key: str) -> tuple[int, bytes]:
    """(element type, count + packed elements) for a numpy array or a flat list/tuple."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise UnsupportedError(f"a {value.ndim}-D array cannot be written (GGUF arrays are flat)", key=key)
        t = _NUMPY_TO_GGUF.get(value.dtype)
        if t is None:
            raise UnsupportedError(f"numpy {value.dtype} arrays have no GGUF value type", key=key)
        return t, _U64.pack(len(value)) + np.ascontiguousarray(value, dtype=_GGUF_TO_NUMPY[t]).tobytes()
    items = list(value)
    if not items or all(isinstance(v, str) for v in items):
        return STRING, _U64.pack(len(items)) + b"".join(_string(v) for v in items)
    types = {_scalar_type(v, key) if not isinstance(v, (list, tuple, np.ndarray)) else ARRAY for v in items}
    if ARRAY in types:
        raise UnsupportedError("nested arrays cannot be written (ggml's reader refuses them)", key=key)
    if len(types) != 1:
        if types <= {INT32, INT64}:
            types = {INT64}
        else:
            raise UnsupportedError(f"array elements of mixed GGUF types {sorted(types)}", key=key)
    (t,) = types
    if t == STRING:
        return STRING, _U64.pack(len(items)) + b"".join(_string(v) for v in items)
    return t, _U64.pack(len(items)) + np.asarray(items, dtype=_GGUF_TO_NUMPY[t]).tobytes()


def encode_kv(key: str, value: Any) -> bytes:
    """One metadata record: key, value type, value."""
    if not key:
        raise ConfigError("empty metadata key", key=key)
    if isinstance(value, (list, tuple, np.ndarray, StringArray)):
        sub, body = _array(value, key)
        return _string(key) + _U32.pack(ARRAY) + _U32.pack(sub) + body
    t = _scalar_type(value, key)
    if t == STRING:
        body = _string(value)
    else:
        body = np.asarray(value, dtype=_GGUF_TO_NUMPY[t]).tobytes()
    return _string(key) + _U32.pack(t) + body


def encode_tensor_info(name: str, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One tensor-info record; `shape` in torch order (GGUF stores it reversed: ne0 first)."""
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_BYTES:
        raise UnsupportedError(f"tensor name of {len(raw)} bytes; GGUF names are 1..{MAX_NAME_BYTES} bytes",
                               key=name)
    dims = [int(d) for d in reversed(tuple(shape))] or [1]
    if len(dims) > MAX_DIMS:
        raise UnsupportedError(f"{len(dims)} dimensions; GGUF tensors have at most {MAX_DIMS}", key=name)
    return (_string(raw) + _U32.pack(len(dims)) + b"".join(_U64.pack(d) for d in dims)
            + _U32.pack(ggml_type) + _U64.pack(offset))


def encode_header(fields: Mapping[str, Any], infos: Sequence[bytes], alignment: int) -> bytes:
    """Everything before the tensor data, zero-padded to the alignment."""
    head = [GGUF_MAGIC, _U32.pack(GGUF_VERSION), _U64.pack(len(infos)), _U64.pack(len(fields))]
    head += [encode_kv(k, v) for k, v in fields.items()]
    head += infos
    out = b"".join(head)
    return out + b"\0" * (align_offset(len(out), alignment) - len(out))
