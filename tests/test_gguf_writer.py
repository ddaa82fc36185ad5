"""The GGUF writer: every tensor's bytes equal gguf-py's quantize() of the float weight (after the
transformers -> llama.cpp transform), llama.cpp's layout rules hold, metadata and tokenizer keys read
back equal, our reader and loader accept the file, and a loaded model computes what the source did.
GGUF -> Hugging Face through the CLI."""
import os
import pathlib

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import quantload  # noqa: E402
from quantload.architectures import gguf_extra_tensors, hf_to_gguf  # noqa: E402
from quantload.cli import main as cli_main  # noqa: E402
from quantload.errors import ConfigError, UnsupportedError  # noqa: E402
from quantload.gguf_tokenizer import tokenizer_fields  # noqa: E402
from quantload.sources.gguf import GGUFSource  # noqa: E402
from quantload.writers.gguf_format import encode_header, encode_kv, encode_tensor_info  # noqa: E402
from quantload.writers.gguf_writer import save_gguf  # noqa: E402

T = gguf.GGMLQuantizationType
# quantize= -> (general.file_type, ggml type of the matrices)
FILE_TYPES = {"f32": (0, T.F32), "f16": (1, T.F16), "bf16": (32, T.BF16), "q8_0": (7, T.Q8_0),
              "q4_0": (2, T.Q4_0), "q4_1": (3, T.Q4_1), "q5_0": (8, T.Q5_0), "q5_1": (9, T.Q5_1)}
# relative logits error allowed for a tiny random model written in each type
LOGITS_TOL = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2, "q5_0": 0.15, "q5_1": 0.15,
              "q4_0": 0.3, "q4_1": 0.3}


# --- tiny models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE fast tokenizer trained in milliseconds (vocab 300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def tiny_model(kind: str, vocab: int = 300, seed: int = 0):
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    if kind == "llama":          # untied; ffn_down rows of 40 do not split into 32-blocks -> F16
        cfg = transformers.LlamaConfig(intermediate_size=40, tie_word_embeddings=False, **common)
    elif kind == "llama3":       # llama3 RoPE scaling -> rope_freqs.weight first
        cfg = transformers.LlamaConfig(intermediate_size=96, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
            **{**common, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
               "hidden_size": 128, "max_position_embeddings": 131072})
    elif kind == "qwen2":        # q/k/v biases (1-D, F32), tied embeddings (no output.weight)
        cfg = transformers.Qwen2Config(intermediate_size=96, tie_word_embeddings=True, **common)
    elif kind == "gemma2":       # norms stored as w + 1
        cfg = transformers.Gemma2Config(intermediate_size=96, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=32, **common)
    elif kind == "phi3":         # fused qkv and gate_up
        cfg = transformers.Phi3Config(intermediate_size=96, pad_token_id=0, tie_word_embeddings=False,
                                      **{**common, "num_key_value_heads": 4})
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():   # norms away from their init of exactly 1 (0 for gemma), so transforms show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# --- references -------------------------------------------------------------------------------------
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_type(name: str, shape, requested: T) -> T:
    """convert_hf_to_gguf's rule: matrices in the file type (F16 when ne0 doesn't split into blocks),
    1-D tensors and norms in F32."""
    if requested == T.F32 or len(shape) < 2 or name.endswith("_norm.weight"):
        return T.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[requested][0]:
        return T.F16
    return requested


def expected_tensors(model, extra=None) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 weight as llama.cpp stores it (inverse transforms applied)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    _, _, names = hf_to_gguf(model.config, [k for k in sd if not k.endswith("rotary_emb.inv_freq")])
    out = dict(extra or {})
    for hf_name, (gguf_name, inverse) in names.items():
        w = sd[hf_name]
        out[gguf_name] = inverse.apply(w) if inverse is not None else w
    if model.config.model_type == "llama":   # the q/k permutation, spelled as llama.cpp spells it
        cfg = model.config
        for i in range(cfg.num_hidden_layers):
            q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
            k = sd[f"model.layers.{i}.self_attn.k_proj.weight"]
            assert torch.equal(out[f"blk.{i}.attn_q.weight"], llama_permute(q, cfg.num_attention_heads))
            assert torch.equal(out[f"blk.{i}.attn_k.weight"], llama_permute(k, cfg.num_key_value_heads))
    if model.config.model_type == "gemma2":
        assert torch.equal(out["output_norm.weight"], sd["model.norm.weight"] + 1)
    return out


def roundtrip_model(model, requested: T):
    """The model whose weights are gguf-py's dequantize(quantize(w)) in the type the writer picks: what
    a loaded file must compute."""
    import copy
    ref = copy.deepcopy(model)
    _, _, names = hf_to_gguf(model.config, list(model.state_dict()))
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for hf_name, (gguf_name, inverse) in names.items():
            w = params[hf_name].float()
            stored = inverse.apply(w) if inverse is not None else w
            ty = expected_type(gguf_name, tuple(w.shape), requested)
            values = gguf.quants.dequantize(gguf.quants.quantize(stored.numpy(), ty), ty)
            back = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(w.shape)
            params[hf_name].copy_(inverse.inverse().apply(back) if inverse is not None else back)
    return ref


def tensor_bytes(t) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


def check_layout(path, alignment=32):
    """llama.cpp's rules: data start aligned; tensors in info order, each at the sum of the padded
    sizes before it; zero padding; the file ends after the last tensor's padding."""
    r = gguf.GGUFReader(str(path))
    size = os.path.getsize(path)
    raw = np.fromfile(path, dtype=np.uint8)
    start = r.data_offset
    assert start % alignment == 0
    pos = start
    for t in r.tensors:
        assert t.data_offset == pos, t.name
        end = pos + t.n_bytes
        pos = end + (-end) % alignment
        assert not raw[end:pos].any(), f"padding after {t.name} is not zero"
    assert pos == size
    ours = GGUFSource(str(path))
    try:
        assert ours.data_offset == start and ours.keys() == [t.name for t in r.tensors]
        assert [ours.info(n).offset for n in ours.keys()] == [int(t.data_offset) for t in r.tensors]
    finally:
        ours.close()
    return r


def check_against_gguf_py(reader, expected: dict[str, torch.Tensor], requested: T):
    assert [t.name for t in reader.tensors] == list(expected)   # also: the model's order, extras first
    for t in reader.tensors:
        w = expected[t.name]
        want_type = expected_type(t.name, tuple(w.shape), requested)
        assert t.tensor_type == want_type, t.name
        assert tuple(int(d) for d in t.shape) == tuple(reversed(w.shape)), t.name
        want = gguf.quants.quantize(w.numpy(), want_type)
        assert tensor_bytes(t) == np.ascontiguousarray(want).tobytes(), t.name


def field_value(reader, key):
    f = reader.fields[key]
    return f.contents(), f.types


GGUF_TYPE_OF = {np.uint32: gguf.GGUFValueType.UINT32, np.float32: gguf.GGUFValueType.FLOAT32,
                np.int32: gguf.GGUFValueType.INT32, str: gguf.GGUFValueType.STRING,
                bool: gguf.GGUFValueType.BOOL}


def check_fields(reader, want: dict):
    for k, v in want.items():
        got, types = field_value(reader, k)
        if isinstance(v, np.ndarray):
            assert types == [gguf.GGUFValueType.ARRAY, GGUF_TYPE_OF[v.dtype.type]], k
            assert np.array_equal(np.asarray(got), v), k
        elif isinstance(v, list):
            assert types[0] == gguf.GGUFValueType.ARRAY and got == v, k
        else:
            assert types == [GGUF_TYPE_OF[type(v)]], k
            assert (np.float32(got) == v) if isinstance(v, np.floating) else got == v, k


def logits_of(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def rel_err(a, b):
    return float((a - b).norm() / a.norm())


IDS = torch.tensor([[0, 5, 17, 42, 99, 250, 7, 3]])


# --- tiny models: every type ---------------------------------------------------------------------------
@pytest.mark.parametrize("qname", list(FILE_TYPES))
def test_tiny_llama_every_type(qname, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / f"tiny-{qname}.gguf"
    assert quantload.save(model, str(out), tokenizer=tiny_tokenizer, quantize=qname) == [str(out)]
    file_type, requested = FILE_TYPES[qname]
    r = check_layout(out)
    check_against_gguf_py(r, expected_tensors(model), requested)
    if gguf.GGML_QUANT_SIZES[requested][0] > 1:   # the F16 fallback really happened
        assert r.get_tensor(7).name == "blk.0.ffn_down.weight" and r.get_tensor(7).tensor_type == T.F16

    _, arch_fields, _ = hf_to_gguf(model.config, [k for k in model.state_dict()])
    check_fields(r, {**arch_fields, "general.type": "model", "general.file_type": np.uint32(file_type),
                     "general.quantization_version": np.uint32(2)})
    check_fields(r, tokenizer_fields(tiny_tokenizer))
    assert "general.alignment" not in r.fields          # default 32 is not written, as gguf-py does
    assert list(r.fields)[3:5] == ["general.architecture", "general.type"]

    loaded = quantload.load(str(out), progress=False, exact=True)     # the file's numerics, bit for bit
    got = logits_of(loaded, IDS)
    assert rel_err(logits_of(roundtrip_model(model, requested), IDS), got) < 1e-5
    err = rel_err(logits_of(model, IDS), got)
    assert err < LOGITS_TOL[qname], err
    if qname in ("f32", "f16", "bf16"):   # the file holds the weights cast, nothing else
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[qname]
        back = quantload.load(str(out), dequantize=True, progress=False).state_dict()
        for k, v in model.state_dict().items():
            cast = v if v.dim() == 1 else v.to(dtype)   # 1-D stays F32; block size 1: no F16 fallback
            assert torch.equal(back[k], cast.float()), k


# --- tiny models: every mapped transform ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "gemma2", "phi3"])
def test_tiny_architectures_q8_0(kind, tmp_path):
    model = tiny_model(kind)
    out = tmp_path / f"{kind}.gguf"
    save_gguf(model, out, quantize="q8_0")
    r = check_layout(out)
    extra = gguf_extra_tensors(model.config)
    expected = expected_tensors(model, extra)
    check_against_gguf_py(r, expected, T.Q8_0)
    if kind == "llama3":
        assert r.tensors[0].name == "rope_freqs.weight" and r.tensors[0].tensor_type == T.F32
    if model.config.tie_word_embeddings:
        assert "output.weight" not in expected
    _, arch_fields, _ = hf_to_gguf(model.config, list(model.state_dict()))
    check_fields(r, arch_fields)
    assert not any(k.startswith("tokenizer.") for k in r.fields)   # none given, none invented
    loaded = quantload.load(str(out), progress=False, exact=True)     # the file's numerics, bit for bit
    got = logits_of(loaded, IDS)
    assert rel_err(logits_of(roundtrip_model(model, T.Q8_0), IDS), got) < 1e-5
    assert rel_err(logits_of(model, IDS), got) < LOGITS_TOL["q8_0"]


def test_alignment_64(tmp_path):
    model = tiny_model("qwen2")
    out = tmp_path / "a64.gguf"
    save_gguf(model, out, quantize="q4_0", alignment=64)
    r = check_layout(out, alignment=64)
    check_fields(r, {"general.alignment": np.uint32(64)})
    check_against_gguf_py(r, expected_tensors(model), T.Q4_0)


def test_gguf_born_quantized_weights_are_copied_not_requantized(tiny_tokenizer, tmp_path):
    """A model loaded from GGUF keeps its blocks; writing the same type copies them (q/k rows permuted
    back), and general.* / tokenizer.* of the source carry over when no tokenizer is passed."""
    model = tiny_model("llama")
    first = tmp_path / "first.gguf"
    save_gguf(model, first, tokenizer=tiny_tokenizer, quantize="q5_1")
    loaded = quantload.load(str(first), progress=False)
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QLinear"
    again = tmp_path / "again.gguf"
    save_gguf(loaded, again, quantize="q5_1")
    assert pathlib.Path(first).read_bytes() == pathlib.Path(again).read_bytes()


# --- the real model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_path():
    from realmodels import smollm2_gguf
    return str(smollm2_gguf())


@pytest.mark.slow
def test_smollm2_q4_1_copied_bit_exact(smollm2_path, tmp_path):
    """SmolLM2 Q4_1 loaded quantized and written as q4_1: every Q4_1 and F32 tensor is the source file's
    bytes; token_embd (Q8_0 in the source) is requantized from its values as gguf-py would."""
    src = GGUFSource(smollm2_path)
    model = quantload.load(smollm2_path, progress=False)
    out = tmp_path / "smollm2-q4_1.gguf"
    save_gguf(model, out, quantize="q4_1")
    r = check_layout(out)
    assert sorted(t.name for t in r.tensors) == sorted(src.keys())
    for t in r.tensors:
        info = src.info(t.name)
        if info.ggml_type in (T.Q4_1, T.F32):
            assert t.tensor_type == info.ggml_type and tensor_bytes(t) == src.get(t.name).numpy().tobytes(), t.name
        else:
            values = gguf.quants.dequantize(src.get(t.name).numpy().reshape(info.shape[0], -1), T(info.ggml_type))
            assert t.tensor_type == T.Q4_1
            assert tensor_bytes(t) == gguf.quants.quantize(values, T.Q4_1).tobytes(), t.name
    # every key-value of the source comes back with its value and GGUF type (no tokenizer was passed)
    written = GGUFSource(str(out))
    assert set(written.fields) - set(src.fields) == {"llama.attention.key_length", "llama.attention.value_length"}
    for k, v in src.fields.items():
        assert written.field_types[k] == src.field_types[k], k
        assert written.array_types.get(k) == src.array_types.get(k), k
        got = written.fields[k]
        assert (np.array_equal(np.asarray(got), np.asarray(v)) if isinstance(v, (list, np.ndarray)) else got == v), k
    written.close()
    src.close()
    loaded = quantload.load(str(out), progress=False)
    for (name, a), (_, b) in zip(qweights(model), qweights(loaded)):   # the layers load back identical
        assert torch.equal(a.data["blocks"], b.data["blocks"]), name
    err = rel_err(logits_of(model, IDS), logits_of(loaded, IDS))   # only the embedding went Q8_0 -> Q4_1
    assert err < 0.15, err   # measured 0.076


def qweights(model):
    out = [(n, m.qweight) for n, m in model.named_modules() if ".layers." in n and hasattr(m, "qweight")]
    assert len(out) == 7 * model.config.num_hidden_layers
    return out


@pytest.mark.slow
def test_smollm2_from_bf16_checkpoint_q8_0(tmp_path):
    """The real HF bf16 checkpoint with its tokenizer, written as q8_0: gguf-py's bytes for every
    tensor, llama.cpp's metadata and tokenizer keys, and logits close to the bf16 model's."""
    from realmodels import smollm2_bf16
    ckpt = smollm2_bf16()
    model = quantload.load(str(ckpt), dtype=torch.float32, progress=False)   # bf16 values, f32 compute
    tok = quantload.load_tokenizer(str(ckpt))
    out = tmp_path / "smollm2-q8_0.gguf"
    save_gguf(model, out, tokenizer=tok, quantize="q8_0")
    r = check_layout(out)
    check_against_gguf_py(r, expected_tensors(model), T.Q8_0)
    _, arch_fields, _ = hf_to_gguf(model.config, list(model.state_dict()))
    check_fields(r, {**arch_fields, "general.file_type": np.uint32(7)})
    check_fields(r, tokenizer_fields(tok))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    loaded = quantload.load(str(out), progress=False)
    want, got = logits_of(model, ids), logits_of(loaded, ids)
    assert rel_err(want, got) < 0.05 and torch.equal(want.argmax(-1), got.argmax(-1))   # measured 0.0196
    assert quantload.load_tokenizer(str(out))("Hello there").input_ids == tok("Hello there").input_ids


# --- GGUF -> Hugging Face, and the CLI both ways --------------------------------------------------------
def test_cli_gguf_to_hf_dequantize(tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    g = tmp_path / "tiny.gguf"
    save_gguf(model, g, tokenizer=tiny_tokenizer, quantize="q4_0")
    out = tmp_path / "hf"
    assert cli_main(["convert", str(g), str(out), "--dequantize"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = quantload.load(str(g), dequantize=True, progress=False)
    a, b = hf.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "hello world, the lazy fox"
    assert tok(text).input_ids == quantload.load_tokenizer(str(g))(text).input_ids


def test_cli_hf_to_gguf(tiny_tokenizer, tmp_path):
    model = tiny_model("qwen2")
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out.gguf"
    assert cli_main(["convert", str(src), str(out), "--quantize", "q5_0"]) == 0
    r = check_layout(out)
    check_against_gguf_py(r, expected_tensors(model), T.Q5_0)
    check_fields(r, {"general.file_type": np.uint32(8), **tokenizer_fields(quantload.load_tokenizer(str(src)))})


# --- refusals and atomicity -----------------------------------------------------------------------------
def test_unknown_quantize_name_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="cannot write GGUF as 'q4_k'") as e:
        save_gguf(tiny_model("llama"), tmp_path / "x.gguf", quantize="q4_k")
    assert e.value.key == "quantize" and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("alignment", [0, 12, 3 << 20, True])
def test_bad_alignment_is_refused(alignment, tmp_path):
    with pytest.raises(ConfigError, match="power of two between 8 and"):
        save_gguf(tiny_model("llama"), tmp_path / "x.gguf", alignment=alignment)


def test_unmapped_architecture_is_refused(tmp_path):
    cfg = transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                 vocab_size=50, word_embed_proj_dim=32, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(cfg)
    with pytest.raises(UnsupportedError, match="model_type 'opt' has no GGUF mapping"):
        save_gguf(model, tmp_path / "x.gguf")


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(40, 64, device="meta"))
    with pytest.raises(ConfigError, match="still on the meta device") as e:
        save_gguf(model, out)
    assert e.value.key == "model.layers.1.mlp.up_proj.weight"
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.gguf"]


# --- metadata encoding ----------------------------------------------------------------------------------
def test_metadata_values_keep_their_types(tmp_path):
    fields = {"general.architecture": "llama", "a.u8": np.uint8(7), "a.i16": np.int16(-3), "a.u64": np.uint64(2**40),
              "a.f64": np.float64(0.1), "a.int": 5, "a.big": 2**40, "a.float": 0.5, "a.bool": True,
              "a.bools": [True, False, True], "a.ints": [1, 2, 3], "a.strs": ["x", "é", ""],
              "a.f32s": np.array([1.5, -2], dtype=np.float32), "a.empty": []}
    V = gguf.GGUFValueType
    want = {"a.u8": [V.UINT8], "a.i16": [V.INT16], "a.u64": [V.UINT64], "a.f64": [V.FLOAT64], "a.int": [V.INT32],
            "a.big": [V.INT64], "a.float": [V.FLOAT32], "a.bool": [V.BOOL], "a.bools": [V.ARRAY, V.BOOL],
            "a.ints": [V.ARRAY, V.INT32], "a.strs": [V.ARRAY, V.STRING], "a.f32s": [V.ARRAY, V.FLOAT32]}
    info = encode_tensor_info("t.weight", (2, 32), int(T.F32), 0)
    path = tmp_path / "m.gguf"
    path.write_bytes(encode_header(fields, [info], 32) + np.arange(64, dtype=np.float32).tobytes())
    r = gguf.GGUFReader(str(path))
    for k, types in want.items():
        assert r.fields[k].types == types, k
    src = GGUFSource(str(path))
    for k, v in fields.items():
        got = src.fields[k]
        assert np.array_equal(np.asarray(got), np.asarray(v)) if isinstance(v, (list, np.ndarray)) else got == v, k
    assert torch.equal(src.get_typed("t.weight"), torch.arange(64, dtype=torch.float32).view(2, 32))
    src.close()


def test_metadata_refusals():
    with pytest.raises(UnsupportedError, match="nested arrays"):
        encode_kv("a.nested", [[1, 2], [3]])
    with pytest.raises(UnsupportedError, match="cannot be written as GGUF metadata"):
        encode_kv("a.obj", object())
    with pytest.raises(UnsupportedError, match="GGUF names are 1..63 bytes"):
        encode_tensor_info("x" * 64, (4,), 0, 0)
    with pytest.raises(UnsupportedError, match="at most 4"):
        encode_tensor_info("t", (1, 1, 1, 1, 1), 0, 0)
