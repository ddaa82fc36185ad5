"""Fuzzing the safetensors header parser and the shard index parser (see fuzz_harness.py for the
property, the bounds and QUANTLOAD_FUZZ_SECONDS).

Header: byte mutations aimed at the 8-byte length and the JSON header, and JSON-level edits (any value
replaced, deleted or added) re-serialized over the same data section. Index: JSON-level edits and byte
mutations of model.safetensors.index.json over two valid shards. A file that opens must then be fully
readable: every tensor's view has the shape and dtype the header gives and lies inside the file.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from fuzz_harness import FUZZ_SECONDS, Budget, byte_mutations, edit_json, fuzz_settings, json_edits, mutate, run_case, run_fuzz
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from quantload.errors import QuantloadError
from quantload.sources.safetensors import SafetensorsSource


def _seed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g).half(),
            "c": torch.arange(6, dtype=torch.uint8).reshape(3, 2), "d": torch.randn(1, 2).bfloat16(),
            "scalar": torch.tensor(7, dtype=torch.int64), "flags": torch.tensor([True, False]),
            "empty": torch.zeros(0, 3)}


SEED = save(_seed_tensors(), metadata={"format": "pt"})
HEADER_END = 8 + int.from_bytes(SEED[:8], "little")
HEADER = json.loads(SEED[8:HEADER_END])


def _rebuild(header: dict | object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def _exercise(src: SafetensorsSource, file_size: int) -> None:
    for key in src.keys():
        info = src.info(key)
        assert info.offset + info.nbytes <= file_size
        t = src.get(key)
        assert tuple(t.shape) == info.shape and t.dtype == info.dtype
        t.clone()


def _check(budget, path, data):
    path.write_bytes(data)

    def case():
        with SafetensorsSource([str(path)]) as src:
            _exercise(src, len(data))
    result = run_case(budget, case)
    if isinstance(result, QuantloadError):
        assert result.file == str(path), str(result)


def test_seed_is_valid(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(SEED)
    with SafetensorsSource([str(tmp_path / "s.safetensors")]) as src:
        assert sorted(src.keys()) == sorted(_seed_tensors())


def test_header_bytes(tmp_path):
    budget = Budget("safetensors header bytes", FUZZ_SECONDS / 2)   # the header parser: half each

    @fuzz_settings()
    @given(mutations=byte_mutations, header_only=st.booleans())
    def fuzz(mutations, header_only):
        budget.tick()
        _check(budget, tmp_path / "fuzz.safetensors", mutate(SEED, mutations, 0, HEADER_END if header_only else None))
    run_fuzz(budget, fuzz)


def test_header_json(tmp_path):
    budget = Budget("safetensors header JSON", FUZZ_SECONDS / 2)

    @fuzz_settings()
    @given(edits=json_edits)
    def fuzz(edits):
        budget.tick()
        header = edit_json(copy.deepcopy(HEADER), edits)
        _check(budget, tmp_path / "fuzz.safetensors", _rebuild(header, SEED[HEADER_END:]))
    run_fuzz(budget, fuzz)


# --- shard index -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    tensors = _seed_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, keys in shards.items():
        (d / shard).write_bytes(save({k: tensors[k] for k in keys}))
    index = {"metadata": {"total_size": 123}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    with SafetensorsSource([str(d / shard) for shard in shards]):
        pass
    return d, index


def test_index(sharded):
    budget = Budget("shard index")
    d, index = sharded

    @fuzz_settings()
    @given(edits=json_edits, mutations=st.none() | byte_mutations)
    def fuzz(edits, mutations):
        budget.tick()
        text = json.dumps(edit_json(copy.deepcopy(index), edits), indent=2).encode()
        if mutations is not None:
            text = mutate(text, mutations)
        path = d / "model.safetensors.index.json"
        path.write_bytes(text)

        def case():
            with SafetensorsSource([str(path)]) as src:
                for key in src.keys():
                    assert os.path.dirname(src.info(key).file) == str(d)   # never a file outside the folder
                _exercise(src, max(os.path.getsize(d / f) for f in os.listdir(d)))
        result = run_case(budget, case)
        if isinstance(result, QuantloadError):
            assert result.file is not None and result.file.startswith(str(d)), str(result)
    run_fuzz(budget, fuzz)
