"""Property-based fuzzing of the GGUF parser (hypothesis, derandomized, no example database).

1. Mutation fuzz: small valid files (written by gguf-py and by hand) get bit flips, byte writes, lying
   u32/u64 counts, truncations, deletions and splices. Parsing must either succeed (and then every
   accessor must work) or raise a QuantloadError, quickly and with bounded memory. Any other exception,
   a hang (SIGALRM) or a big allocation fails the test.
2. Round trip: random metadata of every value type and random tensors written by gguf-py's GGUFWriter
   read back equal.

The whole file is bounded by example counts plus a wall-clock budget, so a loaded CI box stays fast.
"""
from __future__ import annotations

import math
import os
import signal
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantload.errors import QuantloadError
from quantload.sources.gguf_strings import StringArray
from quantload.sources.gguf import GGUFSource, ValueType

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
TIME_BUDGET_S = 12.0          # per fuzz test; examples past it are skipped
PER_PARSE_LIMIT_S = 5         # a parse of a <2 KiB file taking this long is a hang
PEAK_MEMORY_LIMIT = 4 << 20   # bytes traced while parsing a <2 KiB file
FUZZ_SETTINGS = settings(max_examples=1200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- seed files -----------------------------------------------------------------------------------

def _gguf_py_seed(path) -> bytes:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_custom_alignment(16)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_key_value("tokenizer.ggml.tokens", ["a", "bc", "<s>"], VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value("tokenizer.ggml.scores", [0.5, -1.0, 2.0], VT.ARRAY, sub_type=VT.FLOAT32)
    w.add_key_value("x.u64s", [1, 2**63], VT.ARRAY, sub_type=VT.UINT64)
    rng = np.random.default_rng(1)
    w.add_tensor("output_norm.weight", rng.standard_normal(8).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.integers(0, 256, (2, 34), dtype=np.uint8), raw_dtype=QT.Q8_0)
    w.add_tensor("token_embd.weight", rng.standard_normal((2, 4)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _hand_seed() -> bytes:
    """v2, every scalar type once, a bool array, an empty array, a 2-D Q4_K tensor and an I32."""
    scalars = b"".join(_gstr(b"s%d" % t) + struct.pack("<I", t) + struct.pack(fmt, v) for t, fmt, v in [
        (0, "<B", 7), (1, "<b", -7), (2, "<H", 7), (3, "<h", -7), (4, "<I", 7), (5, "<i", -7),
        (6, "<f", 0.25), (7, "<B", 1), (10, "<Q", 7), (11, "<q", -7), (12, "<d", 0.5)])
    arrays = (_gstr(b"b") + struct.pack("<IIQ", 9, 7, 3) + b"\x01\x00\x01"
              + _gstr(b"e") + struct.pack("<IIQ", 9, 8, 0))
    kvs = scalars + arrays
    infos = (_gstr(b"q") + struct.pack("<I2QIQ", 2, 256, 1, QT.Q4_K, 0)
             + _gstr(b"i") + struct.pack("<I1QIQ", 1, 4, QT.I32, 160))
    out = b"GGUF" + struct.pack("<IQQ", 2, 2, 13) + kvs + infos
    out += b"\0" * (-len(out) % 32)
    return out + bytes(range(176))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    d = tmp_path_factory.mktemp("seeds")
    result = [_gguf_py_seed(d / "seed.gguf"), _hand_seed()]
    for data in result:             # the seeds themselves must be valid
        (d / "check.gguf").write_bytes(data)
        GGUFSource(str(d / "check.gguf")).close()
    return result


# --- mutations ------------------------------------------------------------------------------------

_U64_LIES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 32]
_U32_LIES = [0, 1, 3, 4, 5, 8, 9, 12, 13, 31, 43, 2**16, 2**31, 2**32 - 1]
_position = st.integers(0, 4096)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("byte"), _position, st.integers(0, 255)),
    st.tuples(st.just("u64"), _position, st.sampled_from(_U64_LIES) | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("u32"), _position, st.sampled_from(_U32_LIES) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("delete"), _position, st.integers(1, 40)),
    st.tuples(st.just("splice"), _position, _position, st.integers(1, 64)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        if not buf:
            break
        kind, pos = m[0], m[1] % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << m[2]
        elif kind == "byte":
            buf[pos] = m[2]
        elif kind in ("u64", "u32"):
            packed = struct.pack("<Q" if kind == "u64" else "<I", m[2])
            buf[pos:pos + len(packed)] = packed
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "delete":
            del buf[pos:pos + m[2]]
        else:  # splice: insert a copy of another segment of the file
            src = m[2] % len(buf)
            buf[pos:pos] = buf[src:src + m[3]]
    return bytes(buf)


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang("parse did not finish in time")


def _exercise(src: GGUFSource) -> None:
    """A file that parsed must be fully usable: every accessor works or refuses with QuantloadError."""
    for key, value in src.fields.items():
        assert src.field_types[key] in ValueType.__members__.values()
        if key in src.array_types:
            assert isinstance(value, (StringArray, np.ndarray))
            assert all(isinstance(v, str) for v in value) if isinstance(value, StringArray) else True
        else:
            assert isinstance(value, (int, float, bool, str))
    for name in src.keys():
        info = src.info(name)
        raw = src.get(name)
        assert raw.dtype == torch.uint8 and raw.numel() == info.nbytes
        assert 0 < info.offset and info.offset + info.nbytes <= os.path.getsize(src.path)
        try:
            typed = src.get_typed(name)
            assert typed.shape == info.shape and typed.dtype == info.dtype
        except QuantloadError:
            assert info.dtype == torch.uint8


def _time_left(started: list[float]) -> bool:
    if not started:
        started.append(time.monotonic())
    return time.monotonic() - started[0] < TIME_BUDGET_S


_fuzz_clock: list[float] = []


@FUZZ_SETTINGS
@given(seed_index=st.integers(0, 1), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_files_parse_or_raise_quantload_error(seeds, tmp_path_factory, seed_index, mutations):
    if not _time_left(_fuzz_clock):
        return
    data = _mutate(seeds[seed_index], mutations)
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(PER_PARSE_LIMIT_S)
    tracemalloc.start()
    try:
        try:
            src = GGUFSource(str(path))
        except QuantloadError as e:
            assert e.file == str(path) and e.key is not None and e.offset is not None, str(e)
            assert 0 <= e.offset <= len(data), str(e)
            return
        with src:
            _exercise(src)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < PEAK_MEMORY_LIMIT, f"parsing a {len(data)}-byte file traced {peak} bytes"


# --- round trip of random metadata through gguf-py's writer ---------------------------------------

_INT_RANGES = {VT.UINT8: (0, 2**8 - 1), VT.INT8: (-2**7, 2**7 - 1), VT.UINT16: (0, 2**16 - 1),
               VT.INT16: (-2**15, 2**15 - 1), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-2**31, 2**31 - 1),
               VT.UINT64: (0, 2**64 - 1), VT.INT64: (-2**63, 2**63 - 1)}


def _values_of(vt: VT):
    if vt in _INT_RANGES:
        return st.integers(*_INT_RANGES[vt])
    if vt == VT.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vt == VT.FLOAT64:
        return st.floats(allow_nan=False)
    if vt == VT.BOOL:
        return st.booleans()
    return st.text(max_size=12).filter(bool)     # gguf-py skips empty string values


_scalar_types = st.sampled_from([t for t in VT if t != VT.ARRAY])
_entry = _scalar_types.flatmap(lambda vt: st.tuples(
    st.just(vt), st.booleans(), st.lists(_values_of(vt), min_size=1, max_size=6)))
_key = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z0-9_]{1,8}){0,2}", fullmatch=True)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.dictionaries(_key, _entry, max_size=8),
       shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), max_size=3))
def test_random_metadata_round_trips(tmp_path_factory, entries, shapes):
    path = tmp_path_factory.getbasetemp() / "roundtrip.gguf"
    entries.pop("general.architecture", None)
    w = gguf.GGUFWriter(str(path), arch="test")
    for key, (vt, as_array, values) in entries.items():
        if as_array:
            w.add_key_value(key, values, VT.ARRAY, sub_type=vt)
        else:
            w.add_key_value(key, values[0], vt)
    tensors = {f"t{i}": np.arange(math.prod(s), dtype=np.float32).reshape(s) for i, s in enumerate(shapes)}
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFSource(str(path)) as src:
        assert src.fields.pop("general.architecture") == "test"
        assert list(src.fields) == list(entries)
        for key, (vt, as_array, values) in entries.items():
            got = src.fields[key]
            assert src.field_types[key] == vt and (key in src.array_types) == as_array
            expected = values if as_array else values[0]
            if vt == VT.FLOAT32:   # stored as float32: compare after the same rounding
                expected = np.float32(expected).tolist() if not as_array else np.float32(values)
            if as_array and vt != VT.STRING:
                assert np.array_equal(got, np.asarray(expected, dtype=got.dtype))
                assert len(got) == len(values)
            else:
                assert got == expected
        assert src.keys() == list(tensors)
        for name, array in tensors.items():
            assert torch.equal(src.get_typed(name), torch.from_numpy(array))
