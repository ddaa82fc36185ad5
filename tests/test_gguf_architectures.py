"""The GGUF architectures beyond the llama family, on tiny random transformers models written to GGUF by
llama.cpp's own converter (tests/gguf_build.py), in F32, F16, Q8_0 and Q4_K.

For each: quantload's logits equal transformers' own GGUF loader (dequantized float32) and the greedy
tokens are the same; llama.cpp's logits (llama-cpp-python) agree; every file tensor feeds a parameter;
a quantized file's matrices stay in their blocks; save -> load gives the same model. Where transformers
and llama.cpp read a file differently, quantload follows llama.cpp and the case's `hf_fix` lists (and
undoes, on transformers' model) the difference.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import numpy as np
import pytest
import torch
import transformers

import quantload
from quantload.architectures import SUPPORTED_GGUF_ARCHITECTURES, gguf_to_hf
from quantload.runtime.modules import QEmbedding, QLinear
from quantload.sources.gguf import GGUFSource

sys.path.insert(0, os.path.dirname(__file__))
import gguf_build  # noqa: E402

V = gguf_build.VOCAB_SIZE
IDS = [1, 5, 9, 17, 3, 30, 200, 101]
DECODER_IDS = [0, 7, 40, 3]          # an encoder-decoder's decoder input (0: T5's decoder start token)
BLOCK_TYPES = ("f32", "f16", "q8_0", "q4_k")


def _gpt2():
    # transformers reads gpt2.context_length into n_ctx, not n_positions, so its position table keeps
    # the default 1024 rows: a file with another count loads re-initialized there (quantload sizes it
    # from position_embd.weight, as llama.cpp does); 1024 keeps the comparison meaningful
    config = transformers.GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=V, n_positions=1024,
                                     bos_token_id=1, eos_token_id=2)
    config.n_ctx = 1024    # the converter reads the legacy key real GPT-2 configs carry
    return transformers.GPT2LMHeadModel(config)


def _starcoder2():
    return transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2))


def _stablelm():
    # transformers ignores stablelm.rope.dimension_count and keeps its default partial_rotary_factor
    # of 0.25 (StableLM 2's): a file with another rotary width loads wrong there, right here
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))


def _nemotron():
    return transformers.NemotronForCausalLM(transformers.NemotronConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.5, head_dim=64, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2))


def _falcon():
    # Falcon 7B's layout: one KV head, one norm per block, parallel attention (the converter reads
    # num_kv_heads, which transformers sets to the head count unless told)
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        num_kv_heads=1, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
        bos_token_id=1, eos_token_id=2))


def _falcon40b():
    # Falcon 40B/180B's layout: two norms per block, 2 KV groups of 2 query heads
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, bos_token_id=1,
        eos_token_id=2))


def _falcon_gelu(theirs, ours):
    """llama.cpp's Falcon MLP uses the tanh GELU (ggml_gelu), transformers' the exact one; quantload
    follows llama.cpp, so transformers' model gets the same activation for the comparison."""
    assert ours.config.activation == "gelu_pytorch_tanh" and theirs.config.activation == "gelu"
    for a, b in zip(theirs.transformer.h, ours.transformer.h):
        a.mlp.act = b.mlp.act


def _bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=V, hidden_size=256, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2))


def _deci():
    # DeciLM-7B's checkpoint layout: llama tensors under a DeciLMForCausalLM config (per-layer KV heads)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2))


def _lfm2():
    return transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2))


def _qwen35():
    # 2 key heads of 2 value heads each, so llama.cpp's tiled value-head order differs from transformers'
    return transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, layer_types=["linear_attention", "full_attention"],
        full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, max_position_embeddings=128, bos_token_id=1,
        eos_token_id=2))


def _gemma4():
    # sliding layers with 64-wide heads, a full layer with 128-wide ones and proportional RoPE
    return transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, layer_types=["sliding_attention", "full_attention"],
        sliding_window=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=V, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _mamba():
    return transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=V, hidden_size=256, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _t5(cls=transformers.T5ForConditionalGeneration, config=transformers.T5Config):
    # Flan-T5's layout (gated GELU); transformers 5 saves it tied, so the file has no output.weight
    return cls(config(vocab_size=V, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=2))


def _t5_untied_scale(theirs, ours):
    """A T5 file without output.weight: transformers' T5 scales the decoder output by d_model**-0.5
    before its tied head; llama.cpp (and quantload: scale_decoder_outputs off) does not."""
    assert theirs.config.scale_decoder_outputs and not ours.config.scale_decoder_outputs
    theirs.config.scale_decoder_outputs = False    # T5's forward reads it


def _t5_gelu(theirs, ours):
    """transformers' GGUF loader marks a T5 file gated but keeps T5Config's ReLU (gated-ReLU); llama.cpp
    runs a gated T5 FFN with GELU (Flan-T5's gated-gelu), as quantload does."""
    assert theirs.config.dense_act_fn == "relu" and ours.config.dense_act_fn == "gelu_new"
    mine = dict(ours.named_modules())
    for name, m in theirs.named_modules():
        if name.endswith("DenseReluDense"):
            m.act = mine[name].act
    _t5_untied_scale(theirs, ours)


def _umt5():
    # a relative-position table in every block; "Umt5" in general.name tells both loaders
    return _t5(transformers.UMT5ForConditionalGeneration, transformers.UMT5Config)


class Case:
    def __init__(self, make, hf_fix=None, llama_cpp=True, transformers=True, config_edit=None, save=True,
                 float_linears=(), quantized_tol=3e-2, consumed=()):
        self.make = make
        self.consumed = list(consumed)      # file tensors read into the config, not into a parameter
        self.float_linears = float_linears  # modules a block file still loads as float (a column reorder)
        self.quantized_tol = quantized_tol  # vs llama.cpp on block files, relative to the largest logit
        self.save = save                   # quantload writes it back as GGUF (else: a named refusal)
        self.config_edit = config_edit     # changes to the saved config.json before converting
        self.transformers = transformers   # transformers' GGUF loader builds this model (else: llama.cpp only)
        self.hf_fix = hf_fix          # (transformers model, ours) -> None: undo a known transformers difference
        self.llama_cpp = llama_cpp    # llama.cpp runs this architecture


CASES = {
    "gpt2": Case(_gpt2, save=False),
    "starcoder2": Case(_starcoder2),
    "stablelm": Case(_stablelm),
    "nemotron": Case(_nemotron),
    "falcon": Case(_falcon, hf_fix=_falcon_gelu),
    # transformers' loader reads neither attn_norm_2 nor the KV groups: checked against llama.cpp only
    "falcon40b": Case(_falcon40b, transformers=False),
    "bloom": Case(_bloom),
    # transformers has no Deci model class: checked against llama.cpp only
    "deci": Case(_deci, transformers=False, config_edit={"architectures": ["DeciLMForCausalLM"],
                                                         "num_key_value_heads_per_layer": [2, 2]}),
    "lfm2": Case(_lfm2, save=False),
    # ssm_out's columns are reordered (value heads): dequantized at load. The gated delta rule amplifies
    # llama.cpp's Q8 activation rounding, so block files agree with it more loosely (F32: 2e-3)
    # transformers' GGUF loader cannot build Gemma 4 files (see gemma4.py): llama.cpp only
    "gemma4": Case(_gemma4, transformers=False, save=False, consumed=["rope_freqs.weight"], quantized_tol=6e-2),
    # dt_proj's rows (time_step_rank 16) are no whole block: F32 in the file, a float Linear here too;
    # the selective scan amplifies llama.cpp's Q8_K activation rounding on Q4_K files (F32: 2e-3)
    "t5": Case(_t5, hf_fix=_t5_gelu, save=False),
    "umt5": Case(_umt5, hf_fix=_t5_untied_scale, save=False),
    "mamba": Case(_mamba, save=False, float_linears=("mixer.dt_proj",), quantized_tol=6e-2),
    "qwen35": Case(_qwen35, save=False, float_linears=("linear_attn.out_proj",), quantized_tol=0.1),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{case: {block type: path}}: every case's model converted once (one converter run for all)."""
    root = tmp_path_factory.mktemp("gguf_archs")
    jobs = []
    for key, case in CASES.items():
        torch.manual_seed(0)
        model = case.make().eval()
        with torch.no_grad():   # random norms and biases, so their mapping is tested too
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.1)
        gguf_build.save_tiny(model, root / key)
        if case.config_edit:
            config_json = root / key / "config.json"
            config_json.write_text(json.dumps({**json.loads(config_json.read_text()), **case.config_edit}))
        jobs.append((root / key, root / key / f"{key}.f32.gguf"))
    gguf_build.convert(jobs)
    out = {}
    for key in CASES:
        f32 = root / key / f"{key}.f32.gguf"
        out[key] = {"f32": f32, **{t: gguf_build.requantize(f32, root / key / f"{key}.{t}.gguf", t)
                                   for t in BLOCK_TYPES if t != "f32"}}
    return out


# the file's numerics, not the fast kernels' (bf16 products), where this quantload has the choice
_EXACT = {"exact": True} if "exact" in inspect.signature(quantload.load).parameters else {}


def _ours(path):
    return quantload.load(path, dtype=torch.float32, progress=False, **_EXACT)


def _theirs(path):
    auto = transformers.AutoModelForSeq2SeqLM if path.name.startswith(("t5.", "umt5.")) else \
        transformers.AutoModelForCausalLM
    return auto.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        if model.config.is_encoder_decoder:   # the decoder's logits for a few tokens after the encoder's
            return model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([DECODER_IDS])).logits[0]
        return model(torch.tensor([ids])).logits[0]


def _greedy(model, n=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([IDS[:4]]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0].tolist()


PARAMS = [(k, t) for k in CASES for t in BLOCK_TYPES if CASES[k].transformers]


@pytest.mark.parametrize("key, block_type", PARAMS, ids=[f"{k}-{t}" for k, t in PARAMS])
def test_logits_equal_transformers_gguf(files, key, block_type):
    path = files[key][block_type]
    ours, theirs = _ours(path), _theirs(path)
    if CASES[key].hf_fix is not None:
        CASES[key].hf_fix(theirs, ours)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-4, atol=1e-4)
    assert _greedy(ours) == _greedy(theirs)
    if block_type in ("q8_0", "q4_k"):   # the matrices stay in their blocks; no float Linear left
        floats = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
        assert all(any(n.endswith(f) for f in CASES[key].float_linears) for n in floats), floats
        assert any(isinstance(m, QLinear) for m in ours.modules())
        assert any(isinstance(m, QEmbedding) for m in ours.modules())


@pytest.mark.parametrize("key", list(CASES))
def test_every_tensor_feeds_a_parameter(files, key):
    from quantload.prepare import build_skeleton
    path = files[key]["q8_0"]
    src = GGUFSource(str(path))
    try:
        spec = gguf_to_hf(src.fields, {n: src.info(n) for n in src.keys()}, file=path, read_tensor=src.get_typed)
    finally:
        src.close()
    assert spec.unused == CASES[key].consumed
    model = build_skeleton(spec.config, torch.float32)
    if spec.adapt is not None:
        spec.adapt(model)
    # every parameter once (a tied lm_head and T5's embed_tokens aliases are the embedding's), and the
    # persistent buffers (Gemma 4's layer_scalar)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in own}
    assert spec.tied == ("lm_head.weight" not in expected)
    def loaded_shape(ref):   # the file's shape, through the transform on the way (lfm2's kernel gains an axis)
        return tuple(ref.transform.apply(torch.empty(ref.shape)).shape) if ref.transform else ref.shape
    assert {k: loaded_shape(ref) for k, ref in spec.params.items()} == expected


LLAMA_CPP_TYPES = ("f32", "q8_0", "q4_k")


@pytest.fixture(scope="module")
def llama_cpp(files):
    """{(case, block type): llama.cpp's logits}, from one llama-cpp-python run over every file."""
    reason = gguf_build.llama_cpp_available()
    if reason:
        pytest.skip(reason)
    keys = [(k, t) for k in CASES if CASES[k].llama_cpp for t in LLAMA_CPP_TYPES]
    logits = gguf_build.llama_cpp_logits_many([files[k][t] for k, t in keys], IDS, DECODER_IDS)
    return {kt: torch.from_numpy(x) for kt, x in zip(keys, logits)}


@pytest.mark.parametrize("key", [k for k in CASES if CASES[k].llama_cpp])
@pytest.mark.parametrize("block_type", LLAMA_CPP_TYPES)
def test_logits_near_llama_cpp(files, llama_cpp, key, block_type):
    path = files[key][block_type]
    theirs = llama_cpp[key, block_type]
    ours = _logits(_ours(path))
    # llama.cpp multiplies quantized blocks with Q8-quantized activations (and F32 ones with its own
    # kernels): close, not equal
    tol = (2e-3 if block_type == "f32" else CASES[key].quantized_tol) * ours.abs().max().item()
    assert (ours - theirs).abs().max().item() <= tol
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize("key", list(CASES))
def test_save_and_load_again(files, key, tmp_path):
    ours = _ours(files[key]["q8_0"])
    out = tmp_path / f"{key}.gguf"
    if not CASES[key].save:
        with pytest.raises(quantload.UnsupportedError, match=f"model_type '{ours.config.model_type}' has no GGUF"):
            quantload.save(ours, out, quantize="q8_0")
        return
    quantload.save(ours, out, quantize="q8_0")
    again = _ours(out)
    assert torch.equal(_logits(again), _logits(ours))


def test_unsupported_architecture_lists_the_supported(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "rwkv7")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(quantload.UnsupportedError, match="'rwkv7' is not mapped") as info:
        quantload.load(tmp_path / "x.gguf", progress=False)
    assert ", ".join(SUPPORTED_GGUF_ARCHITECTURES) in str(info.value)
    for key in CASES:
        assert {"falcon40b": "falcon", "umt5": "t5"}.get(key, key) in SUPPORTED_GGUF_ARCHITECTURES


def test_falcon40b_is_a_layout_transformers_gguf_loader_does_not_build(files):
    """The difference behind `falcon40b`'s transformers=False: its GGUF config reader keeps the 7B
    layout (one norm, multi-query), so the 40B tensors do not fit; llama.cpp and quantload read it."""
    path = files["falcon40b"]["f32"]
    theirs = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ours = _ours(path).config
    assert theirs.new_decoder_architecture is False and theirs.multi_query is True
    assert ours.new_decoder_architecture is True and ours.num_kv_heads == 2


def test_deci_is_not_built_by_transformers_gguf_loader(files):
    path = files["deci"]["f32"]
    with pytest.raises(ValueError, match="model type `deci` but Transformers does not recognize"):
        _theirs(path)
    config = _ours(path).config
    assert type(config).__name__ == "LlamaConfig" and config.num_key_value_heads == 2


def test_gemma4_is_not_built_by_transformers_gguf_loader(files):
    """transformers keeps Gemma 4's default head_dim (256) and per-layer inputs: the tensors do not fit."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _theirs(files["gemma4"]["f32"])
    config = _ours(files["gemma4"]["f32"]).config
    assert [config.per_layer_config[i].head_dim for i in range(2)] == [64, 128]
    assert config.rope_parameters["full_attention"] == {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                        "rope_theta": 1000000.0}


def test_q4_k_test_encoder_gives_valid_blocks():
    """gguf_build's Q4_K blocks (gguf-py has no K-quant quantizer) decode, by gguf-py, close to the values."""
    import gguf
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    blocks = gguf_build._q4_k(x)
    assert blocks.shape == (4, 2 * 144) and blocks.dtype == np.uint8
    y = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    step = (x.reshape(4, 16, 32).max(-1) - np.minimum(x.reshape(4, 16, 32).min(-1), 0)) / 15
    assert (np.abs(y - x).reshape(4, 16, 32).max(-1) <= 0.75 * step + 1e-2).all()
