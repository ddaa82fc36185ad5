"""The hostile-input catalogue of issue #12 (hangs, unbounded memory, contradictory input, foreign
exceptions, messages): each built here from small synthetic checkpoints, each must raise a QuantloadError
subclass naming the file, the key and what was expected -- fast, and before anything proportional to a
declared count is allocated."""
import json
import os
import pathlib
import resource
import shutil
import struct
import sys
import threading
import time

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import (ConfigError, FileFormatError, QuantStateError, UnexpectedTensorError,
                              UnsupportedError)

gguf = pytest.importorskip("gguf")
sys.path.insert(0, os.path.dirname(__file__))
import realmodels  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
SECONDS = 10          # every refusal comes well within this (the hangs it replaces never ended)
GROWTH = 512 << 20    # and grows the process's peak RSS by less than this


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refused(fn, kind, *, file, key, fragment):
    """fn() raises `kind` naming `file` (a path suffix), `key` and `fragment`, in time and memory."""
    before, t0 = peak_rss(), time.perf_counter()
    with pytest.raises(kind) as e:
        fn()
    elapsed = time.perf_counter() - t0
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak_rss() - before < GROWTH
    err = e.value
    assert err.file is not None and str(err.file).endswith(str(file)), err.file
    assert err.key in key if isinstance(key, tuple) else err.key == key, err.key
    assert fragment in str(err), str(err)
    return err


# --- synthetic checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    """A 2-layer float Llama: config.json + model.safetensors."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(d)
    return d


def variant(src: pathlib.Path, dst: pathlib.Path, *, config=None, drop_config=(), tensors=None) -> pathlib.Path:
    """A copy of checkpoint `src` with config.json keys changed (None deletes) and tensors rewritten."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in (config or {}).items():
        cfg[k] = v
    for k in drop_config:
        cfg.pop(k, None)
    (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(dst / "model.safetensors")
        save_file(tensors(sd), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def int8_ckpt(tiny, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("int8") / "q"
    quantload.save(quantload.load(tiny, quantize="int8", progress=False), d)
    return d


@pytest.fixture(scope="module")
def nf4_ckpt(tiny, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("nf4") / "q"
    quantload.save(quantload.load(tiny, quantize="nf4", progress=False), d)
    return d


def tiny_gguf(path, *, block_count=2, layers=2, fields=(), tokenizer="gpt2", tokens=None, merges=None):
    """A tiny float32 llama GGUF as convert_hf_to_gguf.py lays it out (tied output), with a tokenizer."""
    rng = np.random.default_rng(0)
    hidden, ff, heads, kv, hd, vocab = 32, 48, 4, 2, 8, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for key, value, vtype in fields:
        w.add_key_value(key, value, vtype)
    if tokens is None:
        tokens = [chr(33 + i) for i in range(vocab - 2)] + ["AB", "CD"]
        merges = ["A B", "C D"] if merges is None else merges
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    if tokenizer == "llama":
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    if merges is not None:
        w.add_token_merges(merges)
    f32 = np.float32

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(f32))
    t("token_embd.weight", vocab, hidden)
    t("output_norm.weight", hidden)
    for b in range(layers):
        for name, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv * hd, hidden)),
                            ("attn_v", (kv * hd, hidden)), ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff)),
                            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            t(f"blk.{b}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load(path, **kw):
    return quantload.load(path, progress=False, **kw)


U32 = gguf.GGUFValueType.UINT32
F32 = gguf.GGUFValueType.FLOAT32
STR = gguf.GGUFValueType.STRING


def test_the_synthetic_files_load(tiny, tmp_path):
    """The bases every case mutates are valid (so each refusal below is the mutation's doing)."""
    assert load(tiny).config.num_hidden_layers == 2
    assert load(tiny_gguf(tmp_path / "ok.gguf")).config.num_hidden_layers == 2
    assert quantload.load_tokenizer(tiny_gguf(tmp_path / "t.gguf")).convert_tokens_to_ids("AB") == 62


# --- hangs and unbounded memory -------------------------------------------------------------------------
def test_gguf_block_count_2_32_minus_1(tmp_path):
    path = tiny_gguf(tmp_path / "x.gguf", block_count=2 ** 32 - 1)
    refused(lambda: load(path), FileFormatError, file="x.gguf", key="llama.block_count",
            fragment="block_count is 4294967295, but the file holds tensors for 2 blocks")


def patch_gguf_u32(src: pathlib.Path, dst: pathlib.Path, key: str, value: int) -> pathlib.Path:
    """A copy of a GGUF file with the UINT32 metadata value of `key` overwritten in place."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        head = f.read(1 << 20)
        name = struct.pack("<Q", len(key)) + key.encode()
        at = head.index(name) + len(name)
        assert struct.unpack_from("<I", head, at)[0] == int(gguf.GGUFValueType.UINT32)
        f.seek(at + 4)
        f.write(struct.pack("<I", value))
    return dst


def test_real_smollm2_gguf_with_block_count_2_32_minus_1(tmp_path):
    path = patch_gguf_u32(realmodels.smollm2_gguf(), tmp_path / "smollm2.gguf", "llama.block_count", 2 ** 32 - 1)
    refused(lambda: load(path), FileFormatError, file="smollm2.gguf", key="llama.block_count",
            fragment="the file holds tensors for 30 blocks (blk.0..blk.29); expected block_count=30")


def test_num_hidden_layers_one_million(tiny, tmp_path):
    d = variant(tiny, tmp_path / "c", config={"num_hidden_layers": 1_000_000})
    refused(lambda: load(d), ConfigError, file="config.json", key="num_hidden_layers",
            fragment="expected between 1 and")


@pytest.mark.parametrize("attr", ["intermediate_size", "vocab_size"])
def test_size_2_40_over_a_small_checkpoint(tiny, tmp_path, attr):
    d = variant(tiny, tmp_path / "c", config={attr: 2 ** 40})
    refused(lambda: load(d), ConfigError, file="config.json", key=attr, fragment=f"{attr}=1099511627776")


def test_sentencepiece_token_of_one_mib(tmp_path):
    tokens = ["<unk>", "<s>", "</s>"] + [chr(0x41 + i) for i in range(60)] + ["A" * (1 << 20)]
    path = tiny_gguf(tmp_path / "spm.gguf", tokenizer="llama", tokens=tokens)
    refused(lambda: quantload.load_tokenizer(path), FileFormatError, file="spm.gguf", key="tokenizer.ggml.tokens",
            fragment="token 63 is 1048576 characters long; expected at most 65536")


def test_long_sentencepiece_tokens_are_linear():
    """The merges of a vocabulary with a 64 Ki-character token (the longest accepted): only cuts into
    lengths the vocabulary has are tried, so this is milliseconds, not 2^31 character copies."""
    from quantload.gguf_tokenizer import MAX_TOKEN_CHARS, spm_merges
    tokens = ["A", "AA", "A" * MAX_TOKEN_CHARS, "B", "AB"]
    vocab = {t: i for i, t in enumerate(tokens)}
    t0 = time.perf_counter()
    merges = spm_merges(tokens, [-float(i) for i in range(len(tokens))], vocab)
    assert time.perf_counter() - t0 < 1.0
    assert merges == [("A", "A"), ("A", "B")]


def run_with_deadline(fn, seconds=5.0):
    """fn() in a thread: (finished, exception)."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out["e"] = e
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    return not th.is_alive(), out.get("e"), th


@pytest.mark.parametrize("name", ["model.safetensors", "x.gguf"])
@pytest.mark.parametrize("by", ["directory", "file"])
def test_fifo_named_like_weights(tmp_path, name, by):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    finished, e, th = run_with_deadline(lambda: load(tmp_path if by == "directory" else fifo))
    if not finished:  # unblock the reader so the thread ends, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        th.join(5)
    assert finished, "load blocked on a FIFO"
    assert isinstance(e, FileFormatError) and e.file == str(fifo), e
    assert "is a FIFO, not a regular file" in str(e)


def test_fifo_config_json(tiny, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(tiny, d)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    finished, e, th = run_with_deadline(lambda: load(d))
    if not finished:
        os.close(os.open(d / "config.json", os.O_WRONLY | os.O_NONBLOCK))
        th.join(5)
    assert finished and isinstance(e, FileFormatError) and e.file == str(d / "config.json"), e


def test_fifo_gguf_tokenizer(tmp_path):
    fifo = tmp_path / "x.gguf"
    os.mkfifo(fifo)
    finished, e, th = run_with_deadline(lambda: quantload.load_tokenizer(fifo))
    if not finished:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        th.join(5)
    assert finished and isinstance(e, FileFormatError) and "FIFO" in str(e), e


# --- a model returned for input that contradicts itself -----------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 3])
def test_gguf_block_count_contradicts_tensors(tmp_path, count):
    path = tiny_gguf(tmp_path / "x.gguf", block_count=count)
    refused(lambda: load(path), FileFormatError, file="x.gguf", key="llama.block_count",
            fragment=f"block_count is {count}, but the file holds tensors for 2 blocks")


def test_gguf_missing_middle_block(tmp_path):
    path = tiny_gguf(tmp_path / "x.gguf", block_count=3, layers=3)
    from quantload.sources.gguf import GGUFSource
    from quantload.architectures import gguf_to_hf
    src = GGUFSource(path)
    shapes = {n: src.info(n) for n in src.keys() if not n.startswith("blk.1.")}
    with pytest.raises(FileFormatError, match=r"stop at blk.2 with blocks \[1\] missing") as e:
        gguf_to_hf(src.fields, shapes, file=path)
    assert e.value.key == "llama.block_count"
    far = {**{n: src.info(n) for n in src.keys()}, "blk.99999999999.attn_q.weight": ((32, 32), 0)}
    with pytest.raises(FileFormatError, match=r"stop at blk.99999999999 with blocks \[3, 4, 5, 6, 7\] missing"):
        gguf_to_hf(src.fields, far, file=path)
    src.close()


def test_layer_index_far_past_the_stack(tiny, tmp_path):
    """A stray tensor of layer 10^12: named, without building a set of 10^12 indices."""
    def add(sd):
        sd["model.layers.1000000000000.mlp.up_proj.weight"] = torch.zeros(1)
        return sd
    d = variant(tiny, tmp_path / "c", tensors=add)
    refused(lambda: load(d), ConfigError, file="config.json", key="num_hidden_layers", fragment="with [2, 3, 4, 5, 6] missing")


@pytest.mark.parametrize("n", [-1, 1, 3])
def test_num_hidden_layers_contradicts_checkpoint(tiny, tmp_path, n):
    d = variant(tiny, tmp_path / "c", config={"num_hidden_layers": n})
    expect = "expected between 1 and" if n < 1 else "holds 2 layers (0-1) under 'model.layers'"
    refused(lambda: load(d), ConfigError, file="config.json", key="num_hidden_layers", fragment=expect)


def test_int8_weights_without_quantization_config(int8_ckpt, tmp_path):
    d = variant(int8_ckpt, tmp_path / "c", drop_config=["quantization_config"])
    refused(lambda: load(d), ConfigError, file="config.json", key="quantization_config",
            fragment="bitsandbytes LLM.int8 tensor 'model.layers.0.mlp.down_proj.SCB', but config.json has no "
                     "quantization_config")


def test_int8_weights_under_an_nf4_config(int8_ckpt, nf4_ckpt, tmp_path):
    nf4 = json.loads((nf4_ckpt / "config.json").read_text())["quantization_config"]
    d = variant(int8_ckpt, tmp_path / "c", config={"quantization_config": nf4})
    refused(lambda: load(d), ConfigError, file="config.json", key="quantization_config",
            fragment="gives 'model.layers.0.mlp.down_proj' bnb-nf4, which does not read it")


def test_quantize_int8_on_an_nf4_checkpoint(nf4_ckpt):
    refused(lambda: load(nf4_ckpt, quantize="int8"), ConfigError, file="config.json", key="quantization_config",
            fragment="already quantized with 'bitsandbytes' (bnb-nf4); quantize='int8' asks for 'bitsandbytes' "
                     "(bnb-int8)")
    assert load(nf4_ckpt, quantize="nf4").load_report.quant_method == "bitsandbytes"   # the same: accepted


def rewrite_quant_state(sd, change):
    key = next(k for k in sd if k.endswith("quant_state.bitsandbytes__nf4"))
    sd[key] = change(sd[key])
    return sd


def with_json(**changes):
    def change(blob):
        d = json.loads(bytes(blob.tolist()))
        d.update(changes)
        return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    return change


def test_nested_blocksize_2_40(nf4_ckpt, tmp_path):
    d = variant(nf4_ckpt, tmp_path / "c",
                tensors=lambda sd: rewrite_quant_state(sd, with_json(nested_blocksize=2 ** 40)))
    refused(lambda: load(d), UnsupportedError, file="model.safetensors",
            key="model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4",
            fragment="nested_blocksize 1099511627776 is not supported")


# --- foreign exceptions ------------------------------------------------------------------------------------
def test_tokenizer_merges_naming_absent_tokens(tmp_path):
    path = tiny_gguf(tmp_path / "x.gguf", merges=["A B", "Q Z", "X Y"])   # "QZ" is no token
    refused(lambda: quantload.load_tokenizer(path), FileFormatError, file="x.gguf", key="tokenizer.ggml.merges",
            fragment="merge 1 ('Q' + 'Z') needs 'QZ', which is not in tokenizer.ggml.tokens")


def test_gguf_metadata_transformers_validation_rejects(tmp_path):
    """4 attention heads over an embedding of 30 (head_dim given): transformers' strict-dataclass
    validator raises StrictDataclassClassValidationError."""
    path = tiny_gguf(tmp_path / "x.gguf", fields=[("llama.attention.head_count", 3, U32),
                                                  ("llama.attention.head_count_kv", 3, U32),
                                                  ("llama.attention.key_length", 8, U32),
                                                  ("llama.attention.value_length", 8, U32)])
    refused(lambda: load(path), FileFormatError, file="x.gguf", key="llama.embedding_length",
            fragment="transformers rejects the llama config this metadata describes (StrictDataclass")


def test_gguf_yarn_with_original_context_0(tmp_path):
    path = tiny_gguf(tmp_path / "x.gguf", fields=[("llama.rope.scaling.type", "yarn", STR),
                                                  ("llama.rope.scaling.factor", 4.0, F32),
                                                  ("llama.rope.scaling.original_context_length", 0, U32)])
    refused(lambda: load(path), FileFormatError, file="x.gguf", key="llama.rope.scaling.original_context_length",
            fragment="expected a positive value, found 0")


@pytest.mark.parametrize("arch", ["AutoTokenizer", "LlamaConfig", "PreTrainedModel", "LlamaPreTrainedModel",
                                  "logging"])
def test_architectures_naming_a_non_model_class(tiny, tmp_path, arch):
    d = variant(tiny, tmp_path / "c", config={"architectures": [arch]})
    frag = "an abstract base class" if arch.endswith("PreTrainedModel") else "not a transformers model class"
    refused(lambda: load(d), ConfigError, file="config.json", key="architectures", fragment=frag)


def test_dtype_int8_in_config(tiny, tmp_path):
    d = variant(tiny, tmp_path / "c", config={"dtype": "int8"})
    refused(lambda: load(d), ConfigError, file="config.json", key="dtype", fragment="dtype='int8' is not a float")


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


@pytest.mark.parametrize("change,fragment", [
    ({"dynamic": {"+:model.layers.(0": {"bits": 8}}}, "dynamic pattern '+:model.layers.(0' is not a valid regex"),
    ({"dynamic": {"-:[": {}}}, "dynamic pattern '-:[' is not a valid regex"),
    ({"dynamic": {"+:.*down_proj": {"bits": "x"}}}, "bits='x' in dynamic['+:.*down_proj']; expected an integer"),
    ({"bits": "x"}, "GPTQ bits='x'; expected an integer"),
    ({"group_size": 0.5}, "GPTQ group_size=0.5; expected an integer"),
    ({"group_size": 0}, "GPTQ group_size=0; expected -1 or a positive integer"),
])
def test_gptq_config_errors_name_config_json(tiny, tmp_path, change, fragment):
    d = variant(tiny, tmp_path / "c", config={"quantization_config": {**GPTQ, **change}})
    refused(lambda: load(d), ConfigError, file="config.json", key="quantization_config", fragment=fragment)


def test_quant_state_json_nested_100000_deep(nf4_ckpt, tmp_path):
    deep = torch.tensor(list(b"[" * 100_000 + b"]" * 100_000), dtype=torch.uint8)
    d = variant(nf4_ckpt, tmp_path / "c", tensors=lambda sd: rewrite_quant_state(sd, lambda _: deep))
    refused(lambda: load(d), QuantStateError, file="model.safetensors",
            key="model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4", fragment="nested too deeply")


# --- messages ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qc,kind,fragment", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int3"}, UnsupportedError,
     "bnb_4bit_quant_type='int3'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": "yes"}, ConfigError, "load_in_4bit='yes' must be a boolean"),
    ({"quant_method": "nonesuch"}, UnsupportedError, "quant_method 'nonesuch' is not supported"),
])
def test_quantization_config_errors_name_config_json(tiny, tmp_path, qc, kind, fragment):
    d = variant(tiny, tmp_path / "c", config={"quantization_config": qc})
    refused(lambda: load(d), kind, file="config.json",
            key=("quantization_config", "quantization_config.quant_method"), fragment=fragment)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo quantload-hostile-pickle-ran > /dev/null",))


def test_refused_pickle_names_the_global(tmp_path):
    """torch 2.13's weights_only refusal of a blocked global (os.system) no longer says 'WeightsUnpickler
    error:'; quantload's message still says what it refused, and nothing ran."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.ones(2), "b": _Evil()}, path)
    err = refused(lambda: quantload.read_state_dict(path), FileFormatError, file="pytorch_model.bin", key=None,
                  fragment="objects that are not plain tensors")
    assert "posix.system" in str(err) or "nt.system" in str(err)
    assert "corrupt" not in str(err)


def test_refused_pickle_reason_in_each_torch_form():
    from quantload.sources.torchfile import refused_pickle_reason
    blocked = ("Weights only load failed. In PyTorch 2.6, we changed the default ...\n\n\nTrying to load "
               "unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation")
    old = ("Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL __main__.My was not "
           "an allowed global by default. Please use `torch.serialization.add_safe_globals`")
    corrupt = "Weights only load failed. ...\n Please file an issue ... WeightsUnpickler error: \n\nUnsupported operand 149"
    assert refused_pickle_reason(blocked) == ("global", "it names the global 'posix.system', which was not imported")
    assert refused_pickle_reason(old)[1] == "it names the global '__main__.My', which was not imported"
    assert refused_pickle_reason(corrupt) == ("corrupt", "Unsupported operand 149")


# --- tensors the declared model does not consume ----------------------------------------------------------
def extra_tensor(sd):
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)
    return sd


def test_unconsumed_tensor_is_an_error_and_strict_false_drops_it(tiny, tmp_path):
    d = variant(tiny, tmp_path / "c", tensors=extra_tensor)
    refused(lambda: load(d), UnexpectedTensorError, file=str(d), key="model.layers.0.mlp.extra_proj.weight",
            fragment="1 checkpoint tensor(s) are not used by the model the config declares")
    model = load(d, strict=False)
    assert model.load_report.unexpected_keys == ["model.layers.0.mlp.extra_proj.weight"]
    assert any("strict=False" in w and "extra_proj" in w for w in model.load_report.warnings)


def test_recomputed_buffers_stay_ignorable(tiny, tmp_path):
    def add(sd):
        sd["model.rotary_emb.inv_freq"] = torch.ones(4)
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        return sd
    d = variant(tiny, tmp_path / "c", tensors=add)
    assert load(d).load_report.unexpected_keys == []


def test_gguf_unconsumed_tensor(tmp_path):
    path = tmp_path / "x.gguf"
    tiny_gguf(path)
    # one more tensor after the fact: rebuild with an extra blk-less tensor
    src = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "y.gguf"), "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vtype, f.types[1] if len(f.types) > 1 else None)
        else:
            w.add_key_value(f.name, f.contents(), vtype)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(x) for x in reversed(t.shape)]))
    w.add_tensor("unused.weight", np.zeros((4,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(lambda: load(tmp_path / "y.gguf"), UnexpectedTensorError, file="y.gguf", key="unused.weight",
            fragment="not used by the model")
    assert load(tmp_path / "y.gguf", strict=False).load_report.unexpected_keys == ["unused.weight"]


def test_plan_checks_the_config_too(tiny, tmp_path):
    """plan() builds the same skeleton: the same check runs before it."""
    d = variant(tiny, tmp_path / "c", config={"num_hidden_layers": 1_000_000})
    refused(lambda: quantload.plan(d, device_map="cpu"), ConfigError, file="config.json", key="num_hidden_layers",
            fragment="expected between 1 and")
    d = variant(tiny, tmp_path / "d", config={"num_hidden_layers": 5})
    refused(lambda: quantload.plan(d, device_map="cpu"), ConfigError, file="config.json", key="num_hidden_layers",
            fragment="holds 2 layers (0-1) under 'model.layers'")
