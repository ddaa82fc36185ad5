"""Fuzzing the bitsandbytes 4-bit quant_state JSON and the pieces it describes (Bnb4Scheme.decode; see
fuzz_harness.py for the property, the bounds and QUANTLOAD_FUZZ_SECONDS).

Seeds: NF4 with double quant and FP4 without, as the scheme encodes them (bitsandbytes' own keys and
bytes). Each case edits the JSON (any value replaced, deleted or added), mutates its bytes, renames the
quant_state key, or drops/retypes a companion tensor. What decodes must dequantize to the shape the
quant_state gives.
"""
from __future__ import annotations

import copy
import json

import torch
from fuzz_harness import (FUZZ_SECONDS, Budget, byte_mutations, edit_json, fuzz_settings, json_edits, mutate,
                          run_case, run_fuzz)
from hypothesis import given
from hypothesis import strategies as st

from quantload.errors import QuantloadError
from quantload.schemes.bnb4 import QS_PREFIX, QS_TYPE_PREFIX, Bnb4Scheme

FILE = "fuzz.safetensors"


def _seed(quant_type, double_quant, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    scheme = Bnb4Scheme(quant_type, 64, double_quant)
    pieces = scheme.encode(scheme.quantize(w))
    qs = next(k for k in pieces if k.startswith(QS_PREFIX))
    return pieces, qs, json.loads(bytes(pieces[qs].tolist()))


SEEDS = [_seed("nf4", True, (16, 48)), _seed("fp4", False, (6, 22))]
_piece_edit = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10)),
    st.tuples(st.just("dtype"), st.integers(0, 10),
              st.sampled_from([torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool])),
    st.tuples(st.just("reshape"), st.integers(0, 10), st.integers(-3, 3)),
    st.tuples(st.just("key"), st.sampled_from(["nf4", "fp4", "int4", "", "nf4 "])),
)


def _edit_pieces(pieces: dict, qs: str, edits):
    pieces = dict(pieces)
    for e in edits:
        names = sorted(pieces)
        if not names:
            break
        if e[0] == "key":
            if qs in pieces:
                pieces[QS_PREFIX + QS_TYPE_PREFIX + e[1]] = pieces.pop(qs)
            continue
        name = names[e[1] % len(names)]
        if e[0] == "drop":
            del pieces[name]
        elif e[0] == "dtype":
            pieces[name] = pieces[name].to(e[2])
        else:   # grow or shrink the flat tensor by a few elements
            flat = pieces[name].reshape(-1)
            pieces[name] = flat[:max(0, flat.numel() + e[2])] if e[2] < 0 else torch.cat([flat, flat[:e[2]]])
    return pieces


def test_seeds_decode():
    for pieces, _, meta in SEEDS:
        qt = Bnb4Scheme().decode(pieces, file=FILE, prefix="layer")
        assert tuple(qt.dequantize(torch.float32).shape) == tuple(meta["shape"])


def test_quant_state():
    budget = Budget("quant_state JSON")

    @fuzz_settings()
    @given(seed=st.sampled_from([0, 1]), edits=st.none() | json_edits, mutations=st.none() | byte_mutations,
           piece_edits=st.lists(_piece_edit, max_size=2))
    def fuzz(seed, edits, mutations, piece_edits):
        budget.tick()
        pieces, qs, meta = SEEDS[seed]
        doc = edit_json(copy.deepcopy(meta), edits) if edits else meta
        raw = json.dumps(doc).encode()
        if mutations is not None:
            raw = mutate(raw, mutations)
        pieces = _edit_pieces({**pieces, qs: torch.tensor(list(raw), dtype=torch.uint8)}, qs, piece_edits)

        def case():
            qt = Bnb4Scheme().decode(pieces, file=FILE, prefix="layer")
            w = qt.dequantize(torch.float32)
            assert tuple(w.shape) == tuple(qt.shape)
        result = run_case(budget, case)
        if isinstance(result, QuantloadError):
            assert result.file == FILE and result.key is not None and result.key.startswith("layer."), str(result)
    run_fuzz(budget, fuzz)
