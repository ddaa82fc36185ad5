"""Fuzzing the GGUF tokenizer fields -> tokenizer builder (gguf_tokenizer; see fuzz_harness.py for the
property, the bounds and QUANTLOAD_FUZZ_SECONDS).

Seeds: a byte-level BPE vocabulary (tokenizer_fields of a BPE trained here, as the writer emits it) and a
SentencePiece-style llama vocabulary with scores, types, byte tokens and special ids. Each case deletes or
retypes fields (strings, numbers, bools, arrays of the wrong dtype or length) and edits single tokens,
merges, scores and types. A tokenizer that is built must then encode and decode text.
"""
from __future__ import annotations

import numpy as np
from fuzz_harness import FUZZ_SECONDS, Budget, fuzz_settings, run_case, run_fuzz
from hypothesis import given
from hypothesis import strategies as st

from quantload.gguf_tokenizer import gguf_tokenizer, tokenizer_fields

FILE = "fuzz.gguf"
TEXTS = ["hello world", " the quick brown fox", "ab\nba <s> x", "", "déjà 漢字 🦙"]


def _bpe_fields() -> dict:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 5, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    return {"general.architecture": "llama", **tokenizer_fields(fast)}


def _spm_fields() -> dict:
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "ab", "\u2581a", "\u2581ab", "ba", "x"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [1] * 8 + [6] * 256
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -2.5, -0.5, -0.7, -0.2, -3.0, -4.0] + [0.0] * 256
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.asarray(scores, np.float32),
            "tokenizer.ggml.token_type": np.asarray(types, np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True}


SEEDS = [_bpe_fields(), _spm_fields()]
KEYS = sorted({k for s in SEEDS for k in s} | {"tokenizer.ggml.merges", "tokenizer.ggml.pre",
                                                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                                                "tokenizer.ggml.add_eos_token"})

_short_text = st.text(max_size=6) | st.sampled_from(["", " ", "a b", "a  b", " a", "\u2581", "<0x41>", "<s>",
                                                     "gpt2", "llama", "bert", "gemma2", "qwen2", "default"])
_numbers = st.integers(-2**63, 2**64) | st.sampled_from([0, 1, 2, -1, 10, 266, 267, 2**31, 2**32 - 1]) \
    | st.floats(allow_nan=True, allow_infinity=True)
_arrays = st.tuples(st.sampled_from([np.int32, np.uint8, np.int64, np.float32, np.float64, np.bool_]),
                    st.integers(0, 300), st.integers(-3, 3)).map(
    lambda t: np.full(t[1], t[2]).astype(t[0]))
_value = st.one_of(_short_text, _numbers, st.booleans(), st.none(), _arrays,
                   st.lists(_short_text, max_size=20), st.lists(_numbers, max_size=5))
_field_edit = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
    st.tuples(st.just("set"), st.sampled_from(KEYS), _value),
    st.tuples(st.just("element"), st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                   "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]),
              st.integers(0, 1 << 12), _short_text | _numbers),
    st.tuples(st.just("resize"), st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                  "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]),
              st.integers(-5, 5)),
)


def _apply(fields: dict, edits) -> dict:
    f = dict(fields)
    for e in edits:
        kind, key = e[0], e[1]
        if kind == "delete":
            f.pop(key, None)
        elif kind == "set":
            f[key] = e[2]
        elif key in f and isinstance(f[key], (list, np.ndarray)) and len(f[key]):
            arr = list(f[key]) if isinstance(f[key], list) else f[key].copy()
            if kind == "element":
                i = e[2] % len(arr)
                if isinstance(arr, list):
                    arr[i] = e[3] if isinstance(e[3], str) else str(e[3])
                elif not isinstance(e[3], str):
                    try:
                        arr[i] = e[3]
                    except (OverflowError, ValueError):
                        pass
            else:
                arr = arr[:e[2]] if e[2] < 0 else (list(arr) + list(arr[:e[2]]) if isinstance(arr, list)
                                                   else np.concatenate([arr, arr[:e[2]]]))
            f[key] = arr
    return f


def test_seeds_build():
    for fields in SEEDS:
        tok = gguf_tokenizer(fields, file=FILE)
        assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True).strip() == "hello world"


def test_tokenizer_fields():
    budget = Budget("GGUF tokenizer fields")

    @fuzz_settings()
    @given(seed=st.sampled_from([0, 1]), edits=st.lists(_field_edit, min_size=1, max_size=4))
    def fuzz(seed, edits):
        budget.tick()
        fields = _apply(SEEDS[seed], edits)

        def case():
            tok = gguf_tokenizer(fields, file=FILE)
            for text in TEXTS:
                ids = tok(text)["input_ids"]
                # ids index the file's token array (duplicated tokens make len(tok) smaller)
                assert all(0 <= i < len(fields["tokenizer.ggml.tokens"]) for i in ids)
                tok.decode(ids)
        result = run_case(budget, case)
        if not isinstance(result, BaseException):
            return
        assert result.file == FILE and result.key is not None, str(result)
    run_fuzz(budget, fuzz, need_valid=True)
