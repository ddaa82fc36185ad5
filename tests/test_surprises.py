"""No silent surprises: skipped layers said, unsaveable layouts refused, no silent re-quantization, files
that describe their own format decoded, transformers' argument names, sizes that see quantized weights."""
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import ConfigError, QuantStateError
from quantload.runtime.modules import QLinear
from quantload.schemes.affine import ct_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny(path, hidden=64, inter=128, layers=1, tokenizer_from=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for f in os.listdir(tokenizer_from):
            if f.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(tokenizer_from, f), path)
    return model


def n_qlinear(model):
    return sum(isinstance(m, QLinear) for m in model.modules())


# --- a scheme that cannot cover every layer --------------------------------------------------------------
def test_int4_picks_a_group_size_that_divides_every_layer(tmp_path):
    tiny(tmp_path / "m", hidden=192, inter=384)  # 192 is not a multiple of 128 (SmolLM2: 576)
    with pytest.warns(quantload.QuantloadWarning, match="using group size 64"):
        model = quantload.load(tmp_path / "m", quantize="int4", progress=False)
    assert n_qlinear(model) == 7
    assert any("group size 64" in w for w in model.load_report.warnings)
    groups = model.config.quantization_config["config_groups"]
    assert groups["group_0"]["weights"]["group_size"] == 64
    assert model.config.quantization_config["ignore"] == ["lm_head"]


def test_an_explicit_group_size_that_skips_layers_says_how_many_and_what_covers_them(tmp_path):
    tiny(tmp_path / "m", hidden=192, inter=384)
    with pytest.warns(quantload.QuantloadWarning, match=r"6 layer\(s\) left unquantized.*group_size=64"):
        model = quantload.load(tmp_path / "m", quantize=ct_config(4, group_size=128), progress=False)
    assert n_qlinear(model) == 1  # only down_proj (384 wide)
    assert any("left unquantized" in w for w in model.load_report.warnings)


def test_quantize_in_memory_says_the_same(tmp_path):
    model = tiny(tmp_path / "m", hidden=192, inter=384)
    with pytest.warns(quantload.QuantloadWarning, match="using group size 64"):
        quantload.quantize_(model, "int4")
    assert n_qlinear(model) == 7


# --- GGUF: no folder layout for its blocks, no silent re-quantization ------------------------------------
@pytest.fixture(scope="module")
def smollm2_q4_1():
    from realmodels import smollm2_gguf
    return quantload.load(smollm2_gguf(), progress=False)


def test_saving_gguf_blocks_to_a_folder_is_refused(smollm2_q4_1, tmp_path):
    with pytest.raises(ConfigError, match=r"GGUF blocks .*out\.gguf.*dequantize=True"):
        quantload.save(smollm2_q4_1, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_requantizing_gguf_blocks_is_refused():
    from realmodels import smollm2_gguf
    with pytest.raises(ConfigError, match=r"already quantized \(Q4_1 x\d+.*dequantize=True"):
        quantload.load(smollm2_gguf(), quantize="nf4", progress=False)


# --- files that describe their own format ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["bnb_nf4_nodq_7x9_float16", "bnb_fp4_dq_7x9_float16", "bnb_int8_96x256_float16"])
def test_read_state_dict_decodes_self_described_bnb_files(name, tmp_path):
    shutil.copy(os.path.join(FIXTURES, name + ".safetensors"), tmp_path / "layer.safetensors")
    sd = quantload.read_state_dict(tmp_path / "layer.safetensors")  # no config.json anywhere
    expected = load_file(os.path.join(FIXTURES, name + ".expected.safetensors"))
    q = sd["layer.weight"]
    assert isinstance(q, quantload.QTensor)
    want = expected["layer.weight.dequantized"]
    assert tuple(q.shape) == tuple(want.shape)
    assert torch.equal(q.dequantize(want.dtype), want)
    assert not any(k.startswith("layer.weight.") for k in sd)


def test_undecodable_self_described_pieces_raise(tmp_path):
    src = load_file(os.path.join(FIXTURES, "bnb_nf4_nodq_7x9_float16.safetensors"))
    bad = dict(src)
    bad["layer.weight.quant_state.bitsandbytes__nf5"] = bad.pop("layer.weight.quant_state.bitsandbytes__nf4")
    save_file(bad, tmp_path / "a.safetensors")
    with pytest.raises(QuantStateError, match="nf5"):
        quantload.read_state_dict(tmp_path / "a.safetensors")
    no_state = {k: v for k, v in src.items() if "quant_state" not in k}
    save_file(no_state, tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match=r"bitsandbytes 4-bit pieces .*quantization_config="):
        quantload.read_state_dict(tmp_path / "b.safetensors")


# --- transformers' argument names, and every option an error suggests -----------------------------------
def test_transformers_argument_names(tmp_path):
    tiny(tmp_path / "m")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = quantload.load(tmp_path / "m", quantization_config=bnb, torch_dtype=torch.bfloat16,
                           low_cpu_mem_usage=True, progress=False)
    assert n_qlinear(model) == 7
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert any("low_cpu_mem_usage" in w for w in model.load_report.warnings)
    auto = quantload.load(tmp_path / "m", dtype="auto", progress=False)
    assert auto.model.norm.weight.dtype == torch.float32  # the checkpoint's
    with pytest.raises(ConfigError, match="pass one"):
        quantload.load(tmp_path / "m", quantize="nf4", quantization_config=bnb, progress=False)
    p = quantload.plan(tmp_path / "m", quantization_config=bnb, torch_dtype="float32", device_map="auto",
                       max_memory={"cpu": "1GiB"}, headroom="10MiB")
    assert "10.00 MiB on cpu (as asked)" in p.to_table()


def test_headroom_is_accepted_by_load_and_plan(tmp_path):
    tiny(tmp_path / "m")
    model = quantload.load(tmp_path / "m", device_map="auto", max_memory={"cpu": "1GiB"}, headroom=0.2,
                           progress=False)
    assert model.device_plan.headroom_rule.startswith("20%")
    assert quantload.plan(tmp_path / "m", device_map="auto", max_memory={"cpu": "1GiB"},
                          headroom=0.2).headroom_rule.startswith("20%")


# --- sizes of quantized models -------------------------------------------------------------------------
def test_num_parameters_and_memory_footprint_see_quantized_weights(tmp_path):
    ref = tiny(tmp_path / "m")
    model = quantload.load(tmp_path / "m", quantize="nf4", progress=False)
    assert model.num_parameters() == ref.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    assert model.get_memory_footprint() == model.load_report.model_bytes
    assert model.get_memory_footprint() < ref.get_memory_footprint()


# --- saved checkpoints carry their tokenizer -----------------------------------------------------------
def test_save_writes_the_source_tokenizer_by_default(tmp_path):
    from realmodels import smollm2_bf16
    tiny(tmp_path / "m", tokenizer_from=smollm2_bf16())
    model = quantload.load(tmp_path / "m", quantize="nf4", progress=False)
    quantload.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert quantload.load_tokenizer(tmp_path / "out") is not None
    quantload.save(model, tmp_path / "bare", tokenizer=None)
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
