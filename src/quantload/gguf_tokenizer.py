"""A transformers fast tokenizer built from a GGUF file's tokenizer metadata, with the `tokenizers`
library directly (no slow tokenizer, no per-token Python beyond building the vocabulary dict).

    tok = gguf_tokenizer(fields, file=path)          # PreTrainedTokenizerFast
    fields = tokenizer_fields(tok)                    # and back, for the GGUF writer

Two vocabularies, as llama.cpp reads them (`tokenizer.ggml.model`):

- `gpt2`: byte-level BPE with merges; the split regex comes from `tokenizer.ggml.pre`.
- `llama`: SentencePiece BPE with scores and byte fallback. Files carry no merges, so they are derived
  from the scores (a merge ranks by the score of the token it makes) -- what llama.cpp's SPM tokenizer
  does at run time. `tokenizer.ggml.add_space_prefix` (default true) adds the leading "▁".

Token types: CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (llama.cpp
matches both whole in text). bos/eos/unk/pad come from their ids, add_bos/add_eos from the flags (llama
defaults add_bos to true, as llama.cpp does), and the chat template from `tokenizer.chat_template`.
Where transformers' own GGUF tokenizer differs from llama.cpp we follow transformers for identical ids,
except two things noted at `_llama_normalizer` and `PRE_TOKENIZER_SPLITS["smollm"]`.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import FileFormatError, QuantloadError, UnsupportedError
from .sources.gguf_strings import StringArray

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: the longest token accepted (characters); real vocabularies stay under a few hundred
MAX_TOKEN_CHARS = 1 << 16

# --- split regexes per tokenizer.ggml.pre (as in transformers' GGUF integration / llama-vocab.cpp) -------
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    # the GPT-2 regex of ByteLevel itself
    **dict.fromkeys(("default", "gpt-2", "gpt2"), None),
    # SmolLM's own tokenizer.json splits every digit before the GPT-2 regex (llama.cpp's "smollm" does the
    # same); transformers' GGUF tokenizer omits the digit split. Its merges never join digits, so ids agree.
    "smollm": None,
}
_DIGITS_FIRST = {"smollm"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies are spelled in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_CHARS = bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())


# --- reading the metadata ----------------------------------------------------------------------------------
class _Vocab:
    def __init__(self, fields: Mapping[str, Any], file):
        self.file = file
        self.model = _string(fields, "tokenizer.ggml.model", file)
        self.pre = fields.get("tokenizer.ggml.pre", "default")
        self.arch = fields.get("general.architecture", "")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple, StringArray)) or not tokens or not all(isinstance(t, str) for t in tokens[:1]):
            raise FileFormatError("expected a non-empty array of strings", file=file, key="tokenizer.ggml.tokens")
        self.tokens: list[str] = list(tokens)
        n = len(self.tokens)
        if not all(isinstance(t, str) for t in self.tokens):
            bad = next(i for i, t in enumerate(self.tokens) if not isinstance(t, str))
            raise FileFormatError(f"token {bad} is a {type(self.tokens[bad]).__name__}; expected strings", file=file,
                                  key="tokenizer.ggml.tokens")
        longest = max(range(n), key=lambda i: len(self.tokens[i]))
        if len(self.tokens[longest]) > MAX_TOKEN_CHARS:
            raise FileFormatError(f"token {longest} is {len(self.tokens[longest])} characters long; expected at most "
                                  f"{MAX_TOKEN_CHARS}", file=file, key="tokenizer.ggml.tokens")
        self.types = self._numeric(fields, "tokenizer.ggml.token_type", n, np.integer)
        self.scores = self._numeric(fields, "tokenizer.ggml.scores", n, np.floating)
        merges = fields.get("tokenizer.ggml.merges")
        if merges is not None and not isinstance(merges, (list, tuple, StringArray)):
            raise FileFormatError("expected an array of strings", file=file, key="tokenizer.ggml.merges")
        self.merges = list(merges) if merges else None
        self.ids = {}
        for attr, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                          ("pad", "padding_token_id")):
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
                raise FileFormatError(f"expected a token id below {n}, found {value!r}", file=file,
                                      key=f"tokenizer.ggml.{key}")
            self.ids[attr] = int(value)
        self.add_bos = _flag(fields, "tokenizer.ggml.add_bos_token", self.model == "llama", file)
        self.add_eos = _flag(fields, "tokenizer.ggml.add_eos_token", False, file)
        self.add_space_prefix = _flag(fields, "tokenizer.ggml.add_space_prefix", True, file)
        template = fields.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise FileFormatError("expected a string", file=file, key="tokenizer.chat_template")
        self.chat_template = template

    def _numeric(self, fields, key, n, kind):
        value = fields.get(key)
        if value is None:
            return None
        arr = np.asarray(value)
        if arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, kind):
            raise FileFormatError(f"expected {n} {'integers' if kind is np.integer else 'numbers'} "
                                  f"(one per token), found {arr.dtype} array of shape {arr.shape}", file=self.file, key=key)
        return arr

    def of_type(self, token_type: int) -> list[int]:
        if self.types is None:
            return []
        return np.nonzero(self.types == token_type)[0].tolist()


def _string(fields, key, file) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise FileFormatError(f"expected a string, found {value!r}", file=file, key=key)
    return value


def _flag(fields, key, default: bool, file) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise FileFormatError(f"expected a boolean, found {value!r}", file=file, key=key)
    return bool(value)


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0 (a token may itself start with a space)
    cut = merge.find(" ", 1)
    return (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")


# --- builders ----------------------------------------------------------------------------------------------
def _byte_level(v: _Vocab):
    from tokenizers import Regex, decoders, pre_tokenizers

    if v.merges is None:
        raise FileFormatError("a gpt2 (byte-level BPE) vocabulary needs merges, and there are none",
                              file=v.file, key="tokenizer.ggml.merges")
    # Vocabularies are stored spelled in GPT-2's byte alphabet; a token that is not (an added token
    # stored as plain text) is respelled so the BPE model can reach it.
    vocab = {}
    for i, tok in enumerate(v.tokens):
        vocab[tok if _BYTE_ALPHABET.issuperset(tok) else "".join(_BYTE_CHARS[b] for b in tok.encode())] = i
    merges = [_split_merge(m) for m in v.merges]
    _check_merges(merges, vocab, v.file)
    tk = _bpe(v.file, vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
              end_of_word_suffix="", fuse_unk=False)
    if v.pre not in PRE_TOKENIZER_SPLITS:
        warnings.warn(f"{v.file or 'GGUF'}: tokenizer.ggml.pre {v.pre!r} is not known; using the GPT-2 split "
                      f"regex, which may tokenize differently from llama.cpp", stacklevel=3)
    split = PRE_TOKENIZER_SPLITS.get(v.pre)
    if split is not None:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif v.pre in _DIGITS_FIRST:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk, vocab


def _check_merges(merges: list[tuple[str, str]], vocab: dict[str, int], file) -> None:
    """A merge joins two tokens of the vocabulary into a third one of it (what `tokenizers` requires,
    raising a bare Exception otherwise)."""
    for i, (left, right) in enumerate(merges):
        for part in (left, right, left + right):
            if part not in vocab:
                raise FileFormatError(f"merge {i} ({left!r} + {right!r}) needs {part[:40]!r}, which is not in "
                                      "tokenizer.ggml.tokens; expected merges of tokens of the vocabulary",
                                      file=file, key="tokenizer.ggml.merges")


def _bpe(file, **kwargs):
    """tokenizers' BPE model, its refusals (a bare Exception) as a FileFormatError naming the file."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    try:
        return Tokenizer(BPE(**kwargs))
    except Exception as e:
        raise FileFormatError(f"tokenizers refuses this vocabulary: {str(e)[:200]}", file=file,
                              key="tokenizer.ggml.merges") from None


def spm_merges(tokens: list[str], scores, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging: every split of a token into two
    tokens of the vocabulary, ranked by the score of the merged token (best first), then longer left
    part, longer right part, then the ids of the parts -- the order transformers' `generate_merges` gives."""
    score_of = dict(zip(tokens, np.asarray(scores, dtype=np.float64).tolist()))
    # only cuts whose both sides have the length of some token can split it into two tokens: looping over
    # those lengths keeps a long token linear (every cut of a 1 MiB token would copy 10^12 characters)
    lengths = sorted({len(t) for t in vocab})
    length_set = set(lengths)
    merges = []
    for token, score in score_of.items():
        local = []
        n = len(token)
        for cut in lengths:
            if cut >= n:
                break
            if n - cut not in length_set:
                continue
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        merges.extend((-score, -len(left), -len(right), left, right) for _, _, left, right in local)
    merges.sort(key=lambda m: (m[0], m[1], m[2]))   # stable: equal keys keep the per-token order
    return [(m[3], m[4]) for m in merges]


def _sentencepiece(v: _Vocab):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokens = v.tokens
    if v.arch in ("gemma", "gemma2", "gemma3"):
        # Gemma stores its whitespace-run tokens as real spaces; its normalizer looks them up as "▁"s.
        # Its scores do not follow the merge order, the order of the tokens in the file does.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = -np.arange(len(tokens), dtype=np.float64)
    else:
        if v.scores is None and v.merges is None:
            raise FileFormatError("a llama (SentencePiece) vocabulary needs scores or merges",
                                  file=v.file, key="tokenizer.ggml.scores")
        scores = v.scores
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [_split_merge(m) for m in v.merges] if v.merges else spm_merges(tokens, scores, vocab)
    if v.merges:
        _check_merges(merges, vocab, v.file)
    unk = tokens[v.ids["unk"]] if "unk" in v.ids else None
    tk = _bpe(v.file, vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.arch in ("gemma", "gemma2", "gemma3"):
        # as transformers' GemmaTokenizer (Gemma files say add_space_prefix = false)
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        tk.normalizer = _llama_normalizer(v.add_space_prefix)
        if v.add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(steps)
    return tk, vocab


def _llama_normalizer(add_space_prefix: bool):
    """Spaces become "▁", and one "▁" is put before every piece of text -- also one that already starts
    with a space, and also after a special token: SentencePiece's and llama.cpp's rule, and the original
    Llama 2 tokenizer.json's. transformers' GGUF tokenizer uses a Metaspace pre-tokenizer instead, which
    skips the prefix on text starting with a space and after special tokens, and ignores
    add_space_prefix = false."""
    from tokenizers import normalizers
    replace = normalizers.Replace(" ", "\u2581")
    return normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_space_prefix else replace


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def gguf_tokenizer(fields: Mapping[str, Any], file=None):
    """A `transformers.PreTrainedTokenizerFast` for the tokenizer a GGUF file describes."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    file = str(file) if file is not None else None
    v = _Vocab(fields, file)
    builder = _BUILDERS.get(v.model)
    if builder is None:
        raise UnsupportedError(f"tokenizer model {v.model!r} is not supported (supported: {', '.join(_BUILDERS)})",
                               file=file, key="tokenizer.ggml.model")
    try:
        tk, vocab = builder(v)
    except QuantloadError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge naming an absent token
        raise FileFormatError(f"the tokens and merges do not make a BPE model: {str(e)[:200]}", file=file,
                              key="tokenizer.ggml.merges") from None

    byte_level = v.model == "gpt2"
    # A control token spelled outside the byte alphabet in a byte-level vocabulary is a llama.cpp mislabel
    # of a plain-text token; transformers skips those too.
    control = [AddedToken(v.tokens[i], special=True, normalized=False) for i in v.of_type(CONTROL)
               if not byte_level or _BYTE_ALPHABET.issuperset(v.tokens[i])]
    user = [AddedToken(v.tokens[i], special=False, normalized=False) for i in v.of_type(USER_DEFINED)
            if v.tokens[i] in vocab]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

    special = {f"{name}_token": v.tokens[i] for name, i in v.ids.items()}
    kwargs = dict(special, add_bos_token=v.add_bos, add_eos_token=v.add_eos, clean_up_tokenization_spaces=False)
    if v.chat_template is not None:
        kwargs["chat_template"] = v.chat_template
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


# --- the other way: a transformers fast tokenizer -> GGUF tokenizer metadata (for the writer) ------------
_PRE_NAME_OF_SPLIT = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _QWEN35: "qwen35", _TEKKEN: "tekken", _GPT4O: "gpt-4o"}


def _byte_level_pre_name(pre: dict | None) -> str:
    """The `tokenizer.ggml.pre` llama.cpp needs to split text as this pre-tokenizer does."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _PRE_NAME_OF_SPLIT.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None and steps[0].get("behavior") == "Isolated":
            return name
    raise UnsupportedError(f"this byte-level pre-tokenizer has no llama.cpp equivalent we know: {pre}",
                           key="tokenizer.ggml.pre")


def _spm_space_prefix(tok_json: dict) -> bool:
    norm, pre = tok_json.get("normalizer") or {}, tok_json.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps):
        return True
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return False


def tokenizer_fields(tokenizer) -> dict[str, Any]:
    """GGUF `tokenizer.*` metadata for a transformers fast tokenizer, as llama.cpp reads it: the inverse
    of `gguf_tokenizer` for byte-level BPE (`gpt2`) and SentencePiece-style BPE with byte fallback
    (`llama`). Numbers are numpy scalars/arrays carrying their GGUF type (uint32 ids, int32 token types,
    float32 scores). SentencePiece scores are rebuilt from the merge order (a token scores minus the rank
    of the merge that makes it), which gives the same merges back. Anything else raises UnsupportedError."""
    import json

    backend = tokenizer.backend_tokenizer
    tok_json = json.loads(backend.to_str())
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise UnsupportedError(f"a {model.get('type')} tokenizer model cannot be written to GGUF yet (BPE only)",
                               key="tokenizer.ggml.model")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = np.full(n, UNUSED, dtype=np.int32)
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        tokens[i], types[i] = added.content, CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    fields: dict[str, Any] = {}
    if model.get("byte_fallback"):
        fields["tokenizer.ggml.model"] = "llama"
        fields["tokenizer.ggml.pre"] = "default"
        rank = {}
        for r, merge in enumerate(merges):
            left, right = _split_merge(merge)
            rank.setdefault(left + right, r)
        # tokens no merge makes rank last, so a rebuilt merge never reaches one BPE could not
        unreachable = -float(len(merges) + 1)
        scores = np.array([-float(rank[t]) - 1 if t in rank else unreachable for t in tokens], dtype=np.float32)
        for i, token in enumerate(tokens):
            if types[i] == NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
        fields["tokenizer.ggml.scores"] = scores
        fields["tokenizer.ggml.add_space_prefix"] = _spm_space_prefix(tok_json)
    else:
        fields["tokenizer.ggml.model"] = "gpt2"
        fields["tokenizer.ggml.pre"] = _byte_level_pre_name(tok_json.get("pre_tokenizer"))
        fields["tokenizer.ggml.merges"] = merges
    fields["tokenizer.ggml.tokens"] = tokens
    fields["tokenizer.ggml.token_type"] = types

    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(value, int) and 0 <= value < n:
            fields[f"tokenizer.ggml.{key}"] = np.uint32(value)
    # whether encoding adds bos/eos, as the post-processor really does it
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    fields["tokenizer.ggml.add_bos_token"] = bool(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    fields["tokenizer.ggml.add_eos_token"] = bool(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = template
    elif isinstance(template, dict):
        for name, text in template.items():
            fields["tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"] = text
    return fields
