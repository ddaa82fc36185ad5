"""Fuzzing the GGUF metadata interpretation: header key-values -> transformers config + tensor map
(gguf_to_hf; the byte-level GGUF header parser is fuzzed by test_gguf_fuzz.py). See fuzz_harness.py for
the property, the bounds and QUANTLOAD_FUZZ_SECONDS.

Seeds: tiny llama, qwen2, gemma2 and phi3 files written by our GGUF writer and read back by GGUFSource
(the fields and tensor infos exactly as the loader gets them). Each case deletes keys or gives them values
of another type or range (counts, head numbers, RoPE and context fields, eps, architecture name, the
tokenizer's token ids). A map that is made must describe every tensor with the shape the file has.

Counts here stay below 2**20: declared counts of 2**31 and more (e.g. block_count 2**32 - 1) are issue #12's
catalogue cases, tested on their own with their memory bound.
"""
from __future__ import annotations

import numpy as np
import pytest
from fuzz_harness import Budget, fuzz_settings, run_case, run_fuzz
from hypothesis import given
from hypothesis import strategies as st
from test_gguf_writer import tiny_model

from quantload.architectures import gguf_to_hf
from quantload.errors import QuantloadError
from quantload.sources.gguf import GGUFSource
from quantload.writers.gguf_writer import save_gguf

FILE = "fuzz.gguf"
KINDS = ["llama", "qwen2", "gemma2", "phi3"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("gguf_seeds")
    out = []
    for kind in KINDS:
        path = tmp_dir / f"{kind}.gguf"
        save_gguf(tiny_model(kind), path, quantize="f32")
        with GGUFSource(str(path)) as src:
            out.append((dict(src.fields), {n: src.info(n) for n in src.keys()}))
    return out


_value = st.one_of(
    st.integers(-1, 2**20), st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64, -1, -2**31]),
    st.floats(), st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan")]),
    st.booleans(), st.text(max_size=6), st.sampled_from(["llama", "qwen2", "gemma2", "phi3", "gemma3", "yarn",
                                                        "linear", "none", ""]),
    st.lists(st.integers(-1, 64), max_size=4).map(lambda v: np.asarray(v, dtype=np.int32)),
    st.lists(st.floats(width=32), max_size=4).map(lambda v: np.asarray(v, dtype=np.float32)),
)
_edit = st.tuples(st.integers(0, 1 << 10), st.sampled_from(["delete", "set", "add"]), _value,
                  st.sampled_from(["rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
                                   "attention.sliding_window", "attention.key_length", "attention.value_length",
                                   "rope.dimension_count", "context_length", "expert_count"]))


def test_seeds_map(seeds):
    for fields, tensors in seeds:
        mm = gguf_to_hf(fields, tensors, file=FILE)
        assert mm.params and not mm.unused, mm.unused


def test_gguf_metadata(seeds):
    budget = Budget("GGUF metadata -> config")

    @fuzz_settings()
    @given(seed=st.integers(0, len(KINDS) - 1), edits=st.lists(_edit, min_size=1, max_size=4))
    def fuzz(seed, edits):
        budget.tick()
        fields, tensors = seeds[seed]
        fields = dict(fields)
        arch = fields["general.architecture"]
        for where, kind, value, new_key in edits:
            keys = [k for k in fields if not k.startswith("tokenizer.ggml.t")]   # not the vocabulary arrays
            key = keys[where % len(keys)]
            if kind == "delete":
                fields.pop(key)
            elif kind == "set":
                fields[key] = value
            else:
                fields[f"{arch}.{new_key}"] = value

        def case():
            mm = gguf_to_hf(fields, tensors, file=FILE)
            for ref in mm.params.values():
                assert tuple(tensors[ref.gguf_name].shape) == tuple(ref.shape)
        result = run_case(budget, case)
        if isinstance(result, QuantloadError):
            assert result.file == FILE and result.key is not None, str(result)
    run_fuzz(budget, fuzz, need_valid=True)
