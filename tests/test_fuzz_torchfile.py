"""Fuzzing the PyTorch checkpoint reader (torch.load with weights_only=True behind TorchFileSource; see
fuzz_harness.py for the property, the bounds and QUANTLOAD_FUZZ_SECONDS).

Two levels: byte mutations of whole files (zip and legacy format), and mutations of the zip's data.pkl
re-zipped with valid CRCs, so the unpickler itself sees hostile opcodes, including splices of a GLOBAL +
REDUCE that would call a sentinel function if anything ran code: the sentinel must never run.
"""
from __future__ import annotations

import io
import sys
import types
import zipfile

import torch
from fuzz_harness import FUZZ_SECONDS, Budget, byte_mutations, fuzz_settings, mutate, run_case, run_fuzz
from hypothesis import given
from hypothesis import strategies as st

from quantload.errors import QuantloadError
from quantload.sources.torchfile import TorchFileSource

_sentinel = types.ModuleType("quantload_fuzz_sentinel")
_sentinel.calls = []
_sentinel.boom = lambda *a: _sentinel.calls.append(a)
sys.modules[_sentinel.__name__] = _sentinel
#: protocol-0 GLOBAL + empty tuple + REDUCE: calls quantload_fuzz_sentinel.boom() if unpickled unsafely
EVIL = b"cquantload_fuzz_sentinel\nboom\n)R"


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int16),
            "nested.x": torch.tensor([True, False]), "h": torch.randn(2, generator=g).half()}


def _saved(**kw) -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, **kw)
    return buf.getvalue()


ZIP_SEED, LEGACY_SEED = _saved(), _saved(_use_new_zipfile_serialization=False)


def _zip_parts(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


PARTS = _zip_parts(ZIP_SEED)
PKL = next(i for i, (info, _) in enumerate(PARTS) if info.filename.endswith("data.pkl"))


def _rezip(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i, (info, body) in enumerate(PARTS):
            z.writestr(info.filename, pkl if i == PKL else body)
    return buf.getvalue()


def _check(budget, path, data):
    path.write_bytes(data)

    def case():
        with TorchFileSource([str(path)]) as src:
            for key in src.keys():
                info = src.info(key)
                t = src.get(key)
                assert tuple(t.shape) == info.shape and t.dtype == info.dtype
                t.clone()
    result = run_case(budget, case)
    assert not _sentinel.calls, "a pickle ran code"
    if isinstance(result, QuantloadError):
        assert result.file == str(path), str(result)


def test_seeds_are_valid(tmp_path):
    for i, data in enumerate((ZIP_SEED, LEGACY_SEED, _rezip(PARTS[PKL][1]))):
        (tmp_path / f"{i}.pt").write_bytes(data)
        with TorchFileSource([str(tmp_path / f"{i}.pt")]) as src:
            assert sorted(src.keys()) == sorted(_state_dict()), i


def test_file_bytes(tmp_path):
    budget = Budget("torch file bytes", FUZZ_SECONDS / 2)   # the torch reader: half each

    @fuzz_settings()
    @given(legacy=st.booleans(), mutations=byte_mutations)
    def fuzz(legacy, mutations):
        budget.tick()
        _check(budget, tmp_path / "fuzz.pt", mutate(LEGACY_SEED if legacy else ZIP_SEED, mutations))
    run_fuzz(budget, fuzz)


def test_pickle_opcodes(tmp_path):
    budget = Budget("torch data.pkl", FUZZ_SECONDS / 2)
    pkl = PARTS[PKL][1]

    @fuzz_settings()
    @given(mutations=byte_mutations, evil_at=st.none() | st.integers(0, len(pkl)))
    def fuzz(mutations, evil_at):
        budget.tick()
        body = mutate(pkl, mutations)
        if evil_at is not None:
            body = body[:evil_at] + EVIL + body[evil_at:]
        _check(budget, tmp_path / "fuzz.pt", _rezip(body))
    run_fuzz(budget, fuzz)
