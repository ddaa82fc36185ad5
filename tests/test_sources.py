"""safetensors and PyTorch checkpoint sources: exact round trips, zero-copy, and every malformed file refused
with the right error class, a message saying what was wrong, and the file's path."""
import contextlib
import json
import os
import struct
import time
import tracemalloc

import pytest
import safetensors.torch
import torch

from quantload.errors import FileFormatError, MissingTensorError, UnsupportedError
from quantload.sources import LFS_MAGIC, open_source
from quantload.sources.safetensors import SafetensorsSource
from quantload.sources.torchfile import TorchFileSource

LFS_POINTER = LFS_MAGIC + b"\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"


@contextlib.contextmanager
def refused(error_class, fragment, path):
    with pytest.raises(error_class) as info:
        yield info
    message = str(info.value)
    assert fragment in message, message
    assert os.fspath(path) in message, message


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so fp8/fp4 (which lack torch.equal on CPU) compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "f32": f, "f16": f.half(), "bf16": f.bfloat16(), "f64": f.double()[:2],
        "fp8_e4m3": f.to(torch.float8_e4m3fn), "fp8_e5m2": f.to(torch.float8_e5m2),
        "e8m0": torch.arange(6, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "fp4": torch.arange(8, dtype=torch.uint8).view(2, 4).view(torch.float4_e2m1fn_x2),
        "i8": torch.arange(-3, 4, dtype=torch.int8), "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "i64": torch.arange(3, dtype=torch.int64) * 2**40, "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(7.5),
    }


def write_raw(path, header, data=b"", length=None):
    """A safetensors file from a header (dict or raw bytes) and data, with an optional lying length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


# --- safetensors: valid files --------------------------------------------------------------------------
def test_safetensors_round_trip_all_dtypes(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sample_tensors(), path, metadata={"format": "pt", "note": "x"})
    expected = safetensors.torch.load_file(path)
    with SafetensorsSource([str(path)]) as src:
        assert sorted(src.keys()) == sorted(expected)
        assert src.metadata == {"format": "pt", "note": "x"}
        raw = path.read_bytes()
        for key, want in expected.items():
            got = src.get(key)
            assert_same(got, want)
            info = src.info(key)
            assert (info.shape, info.dtype, info.file) == (tuple(want.shape), want.dtype, str(path))
            # the absolute offset addresses exactly this tensor's bytes
            assert raw[info.offset:info.offset + info.nbytes] == bits(want).numpy().tobytes()


def test_safetensors_golden_fixtures_match_the_library(fixtures_dir):
    files = sorted(fixtures_dir.glob("*.safetensors"))
    assert files
    for path in files:
        expected = safetensors.torch.load_file(path)
        with SafetensorsSource([str(path)]) as src:
            assert sorted(src.keys()) == sorted(expected)
            for key, want in expected.items():
                assert_same(src.get(key), want)


def test_safetensors_is_zero_copy_and_lazy(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1000), "b": torch.zeros(1000)}, path)
    src = SafetensorsSource([str(path)])
    assert src._maps == {}  # opening read the header only
    a, b = src.get("a"), src.get("b")
    # both are views into one mapping of the file: their addresses differ by their file offsets
    assert b.data_ptr() - a.data_ptr() == src.info("b").offset - src.info("a").offset
    assert src.get("a").data_ptr() == a.data_ptr()
    src.close()
    assert src._maps == {}
    assert a.sum().item() == 1000  # tensors stay valid after close: the map lives as long as they do


def test_safetensors_sharded_with_index(tmp_path):
    tensors = sample_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for i, (shard, keys) in enumerate(shards.items()):
        safetensors.torch.save_file({k: tensors[k] for k in keys}, tmp_path / shard,
                                    metadata={"format": "pt", f"shard{i}": "y"})
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    with open_source(tmp_path) as src:
        assert isinstance(src, SafetensorsSource)
        assert sorted(src.keys()) == names
        assert src.metadata == {"format": "pt", "shard0": "y", "shard1": "y"}
        for k in names:
            assert_same(src.get(k), tensors[k])
            assert src.info(k).file == str(tmp_path / weight_map[k])
        with refused(MissingTensorError, "no such tensor", tmp_path / "model.safetensors.index.json"):
            src.get("nope")


def test_safetensors_shards_without_index(tmp_path):
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"b": torch.zeros(3)}, tmp_path / "b.safetensors")
    with open_source(tmp_path) as src:
        assert sorted(src.keys()) == ["a", "b"]
        assert_same(src.get("b"), torch.zeros(3))
    # the same key in two shards is ambiguous
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "c.safetensors")
    with refused(FileFormatError, "exactly one shard", tmp_path / "c.safetensors") as info:
        open_source(tmp_path)
    assert info.value.key == "a"


# --- safetensors: malformed headers ----------------------------------------------------------------------
F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_HEADERS = {
    "overlap": ({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12,
                "overlaps tensor 'a'"),
    "past_end": ({"a": F32x2}, 4, "runs past the end of the data section"),
    "hole": ({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, 20,
             "hole in the data section"),
    "trailing_bytes": ({"a": F32x2}, 12, "tensors cover only 8"),
    "bad_json": (b'{"a": {"dtype": ', 0, "not valid JSON"),
    "not_utf8": (b'{"\xff": 1}', 0, "not valid JSON"),
    "not_object": (b"[1, 2, 3]", 0, "must be a JSON object, found list"),
    "duplicate_key": (b'{"a": ' + json.dumps(F32x2).encode() + b', "a": ' + json.dumps(F32x2).encode() + b"}",
                      8, "duplicate key 'a'"),
    "unknown_dtype": ({"a": {**F32x2, "dtype": "F17"}}, 8, "unknown dtype 'F17'"),
    "size_vs_shape": ({"a": {**F32x2, "shape": [3]}}, 8, "hold 8 bytes, but dtype F32 with shape [3] needs 12"),
    "negative_dim": ({"a": {**F32x2, "shape": [-2]}}, 8, "non-negative integers"),
    "bool_dim": ({"a": {**F32x2, "shape": [True, 2]}}, 8, "non-negative integers"),
    "reversed_offsets": ({"a": {**F32x2, "data_offsets": [8, 0]}}, 8, "0 <= begin <= end"),
    "entry_not_object": ({"a": [1, 2]}, 0, "expected an object"),
    "metadata_not_str": ({"__metadata__": {"n": 1}, "a": F32x2}, 8, "string to string"),
    "huge_shape": ({"a": {**F32x2, "shape": [2**62, 2**62, 7]}}, 8, "more bytes than the whole data section (8)"),
    "hundred_digit_dim": (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 100 + b'], "data_offsets": [0, 8]}}', 8,
                          "more digits than any 64-bit number"),
    "empty_shape_vs_size": ({"a": {**F32x2, "shape": [2, 0]}}, 8, "needs 0"),
    "metadata_not_object": ({"__metadata__": [], "a": F32x2}, 8, "string to string"),
    "f4_partial_byte": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, 1, "whole bytes"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_safetensors_bad_header(tmp_path, case):
    header, data_size, fragment = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data_size))
    with refused(FileFormatError, fragment, path):
        SafetensorsSource([str(path)])


@pytest.mark.parametrize("case", [c for c in BAD_HEADERS if c != "duplicate_key"])
def test_bad_headers_are_refused_by_the_safetensors_library_too(tmp_path, case):
    """We are never stricter than the format (except duplicate names, which the library lets shadow)."""
    header, data_size, _ = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data_size))
    with pytest.raises(Exception):
        with safetensors.safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_safetensors_error_names_key_and_offset(tmp_path):
    header = {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(12))
    with refused(FileFormatError, "key 'b'", path) as info:
        SafetensorsSource([str(path)])
    assert info.value.offset == 8 + len(json.dumps(header)) + 4


def test_safetensors_dtype_torch_lacks(tmp_path):
    path = write_raw(tmp_path / "f6.safetensors", {"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}},
                     bytes(3))
    with refused(UnsupportedError, "F6_E2M3 has no torch equivalent", path):
        SafetensorsSource([str(path)])


def test_safetensors_truncated(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"a": torch.ones(100), "b": torch.ones(100)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with refused(FileFormatError, "runs past the end of the data section", path):
        SafetensorsSource([str(path)])
    path.write_bytes(raw[:40])  # cut inside the header
    with refused(FileFormatError, "header length", path):
        SafetensorsSource([str(path)])
    path.write_bytes(raw[:5])  # not even the length
    with refused(FileFormatError, "too short for the 8-byte header length", path):
        SafetensorsSource([str(path)])


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 10**9])
def test_safetensors_huge_header_length_fails_fast_without_allocating(tmp_path, length):
    path = write_raw(tmp_path / "bad.safetensors", b"{}", length=length)
    tracemalloc.start()
    start = time.perf_counter()
    with refused(FileFormatError, f"header length {length} runs past the end of the file", path):
        SafetensorsSource([str(path)])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20, (elapsed, peak)


def test_safetensors_header_over_limit(tmp_path):
    path = tmp_path / "big.safetensors"
    length = 101 * 2**20
    write_raw(path, b"{", length=length)
    os.truncate(path, 8 + length + 8)  # sparse: the header length fits in the file, but is absurd
    with refused(FileFormatError, "exceeds the 104857600-byte limit", path):
        SafetensorsSource([str(path)])


# --- safetensors: bad indexes ---------------------------------------------------------------------------
def write_index(tmp_path, weight_map, name="model.safetensors.index.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_index_missing_shard(tmp_path):
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    index = write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with refused(FileFormatError, "names shard 's2.safetensors', which does not exist", index):
        open_source(tmp_path)


def test_index_key_absent_from_its_shard(tmp_path):
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    safetensors.torch.save_file({"b": torch.ones(2)}, tmp_path / "s2.safetensors")
    index = write_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with refused(FileFormatError, "places this tensor in 's1.safetensors', which has no such tensor", index) as info:
        open_source(tmp_path)
    assert info.value.key == "b"


def test_index_malformed(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with refused(FileFormatError, '"weight_map"', index):
        open_source(tmp_path)
    index.write_text('{"weight_map": {"a": "s.safetensors", "a": "t.safetensors"}}')
    with refused(FileFormatError, "duplicate key 'a'", index):
        open_source(tmp_path)
    write_index(tmp_path, {"a": "../elsewhere.safetensors"})
    with refused(FileFormatError, "relative file name inside the checkpoint folder", index):
        open_source(tmp_path)


# --- LFS pointers ---------------------------------------------------------------------------------------
def test_lfs_pointer_directory_and_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(LFS_POINTER)
    with refused(FileFormatError, "git-LFS pointer", path):
        open_source(tmp_path)
    with refused(FileFormatError, "git-LFS pointer", path):
        open_source(path)
    bin_path = tmp_path / "sub" / "pytorch_model.bin"
    bin_path.parent.mkdir()
    bin_path.write_bytes(LFS_POINTER)
    with refused(FileFormatError, "git-LFS pointer", bin_path):
        open_source(bin_path.parent)


def test_lfs_pointer_behind_index(tmp_path):
    (tmp_path / "s1.safetensors").write_bytes(LFS_POINTER)
    write_index(tmp_path, {"a": "s1.safetensors"})
    with refused(FileFormatError, "git-LFS pointer", tmp_path / "s1.safetensors"):
        open_source(tmp_path)


# --- PyTorch files --------------------------------------------------------------------------------------
class NotATensor:
    """Saving an instance pickles a reference to this class: weights_only must refuse it."""


def plain_state_dict():
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.arange(4.0).bfloat16(),
            "emb.weight": torch.ones(5, 2, dtype=torch.float16)}


def test_torch_plain_round_trip_zero_copy(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(plain_state_dict(), path)
    expected = torch.load(path, weights_only=True)
    raw = path.read_bytes()
    with open_source(tmp_path) as src:
        assert isinstance(src, TorchFileSource)
        assert src.keys() == list(expected)
        for key, want in expected.items():
            got = src.get(key)
            assert_same(got, want)
            # memory-mapped, not read into RAM: tensors sit as far apart in memory as in the file
            first = src.get(next(iter(expected)))
            assert got.data_ptr() - first.data_ptr() == \
                raw.find(bits(got).numpy().tobytes()) - raw.find(bits(first).numpy().tobytes())
            info = src.info(key)
            assert (info.shape, info.dtype, info.nbytes, info.file, info.offset) == \
                (tuple(want.shape), want.dtype, want.numel() * want.element_size(), str(path), -1)


def test_torch_legacy_format(tmp_path):
    path = tmp_path / "old.pt"
    sd = plain_state_dict()
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with open_source(path) as src:
        for key, want in sd.items():
            assert_same(src.get(key), want)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
    lambda sd: {"model": sd, "step": 10},
    lambda sd: {"module": sd},
    lambda sd: {"model_state_dict": sd, "config": {"hidden": 4}},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: {**sd, "num_batches_tracked_note": "text", "version": 2},  # non-tensor values ignored
    lambda sd: {"module." + k: v for k, v in sd.items()},  # DDP prefix on every key: stripped
    lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
], ids=["state_dict", "model", "module", "model_state_dict", "twice_nested", "extra_values", "ddp", "ddp_compile"])
def test_torch_nested_state_dicts(tmp_path, wrap):
    sd = plain_state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(sd), path)
    with open_source(path) as src:
        assert sorted(src.keys()) == sorted(sd)
        for key, want in sd.items():
            assert_same(src.get(key), want)


def test_torch_prefix_kept_unless_on_every_key(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"module.a": torch.ones(1), "b": torch.zeros(1)}, path)
    with open_source(path) as src:
        assert sorted(src.keys()) == ["b", "module.a"]


def test_torch_sharded_with_index(tmp_path):
    sd = plain_state_dict()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 2)}-of-00002.bin" for i, k in enumerate(keys)}
    index = write_index(tmp_path, weight_map, "pytorch_model.bin.index.json")
    with open_source(tmp_path) as src:
        assert isinstance(src, TorchFileSource)
        assert sorted(src.keys()) == sorted(keys)
        assert src.info(keys[2]).file == str(tmp_path / weight_map[keys[2]])
        assert_same(src.get(keys[0]), sd[keys[0]])
    weight_map[keys[0]] = weight_map[keys[2]]
    write_index(tmp_path, weight_map, "pytorch_model.bin.index.json")
    with refused(FileFormatError, "which has no such tensor", index):
        open_source(tmp_path)


def test_torch_truncated(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(plain_state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with refused(FileFormatError, "truncated or corrupt", path):
        TorchFileSource([str(path)])
    torch.save(plain_state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-20])
    with refused(FileFormatError, "truncated or corrupt", path):
        TorchFileSource([str(path)])


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_arbitrary_pickle_refused(tmp_path, legacy):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, path, _use_new_zipfile_serialization=not legacy)
    with refused(FileFormatError, "objects that are not plain tensors", path) as info:
        TorchFileSource([str(path)])
    assert "never unpickles arbitrary code" in str(info.value)
    assert "NotATensor" in str(info.value)


def test_torch_no_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with refused(FileFormatError, "no state dict of tensors found (top level: list)", path):
        TorchFileSource([str(path)])
    torch.save({"epoch": 1, "config": {"a": 1}}, path)
    with refused(FileFormatError, "top level: keys ['epoch', 'config']", path):
        TorchFileSource([str(path)])
