"""from_pretrained(..., quantization_config=QuantloadConfig(...)) against plain quantload.load."""
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quantload
from quantload.runtime.modules import QLinear

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny(path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval().save_pretrained(path)
    return path


def same_weights(a, b):
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QLinear)}
    assert qa.keys() == qb.keys() and qa
    for n in qa:
        assert qa[n].qweight.data.keys() == qb[n].qweight.data.keys(), n
        for k, t in qa[n].qweight.data.items():
            assert torch.equal(t, qb[n].qweight.data[k]), (n, k)
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def greedy(model, ids, n=8):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


def from_pretrained(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantload.QuantloadConfig(progress=False, **kw),
                                                device_map="cpu")


def test_smollm2_quantized_by_from_pretrained_is_quantload_load():
    from realmodels import smollm2_bf16
    path = smollm2_bf16()
    ref = quantload.load(path, quantize="nf4", progress=False)
    got = from_pretrained(path, quantize="nf4")
    assert type(got) is type(ref) and got.hf_quantizer is not None
    same_weights(ref, got)
    assert got.load_report.quantized_modules == ref.load_report.quantized_modules
    tok = quantload.load_tokenizer(path)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert greedy(got, ids) == greedy(ref, ids)
    assert got.config.quantization_config["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("scheme", ["nf4", "int4", "int8-channel"])
def test_prequantized_checkpoints_load_through_quantload(tmp_path, scheme):
    # bitsandbytes and compressed-tensors configs: transformers knows both methods and would merge the
    # checkpoint's config with ours (and raise on the class mismatch); quantload reads the files' own config
    src = quantload.load(tiny(tmp_path / "m"), quantize=scheme, progress=False)
    quantload.save(src, tmp_path / "q")
    ref = quantload.load(tmp_path / "q", progress=False)
    got = from_pretrained(tmp_path / "q")
    same_weights(ref, got)
    assert got.load_report.prequantized
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    assert torch.equal(ref(ids).logits, got(ids).logits)


def test_save_pretrained_writes_what_save_writes(tmp_path):
    got = from_pretrained(tiny(tmp_path / "m"), quantize="nf4")
    got.save_pretrained(tmp_path / "a")
    quantload.save(quantload.load(tmp_path / "m", quantize="nf4", progress=False), tmp_path / "b")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "model.safetensors" in names
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as fa, \
            safe_open(tmp_path / "b" / "model.safetensors", "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in fa.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    back = quantload.load(tmp_path / "a", progress=False)
    same_weights(back, got)


def test_other_configs_still_merge_as_transformers_does():
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer
    quantload.QuantloadConfig  # registers
    merged = AutoHfQuantizer.merge_quantization_configs(
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, None)
    assert isinstance(merged, BitsAndBytesConfig)
    ql = quantload.QuantloadConfig(quantize=None)
    assert AutoHfQuantizer.merge_quantization_configs(merged.to_dict(), ql) is ql


def test_quantload_config_is_accepted_by_load(tmp_path):
    path = tiny(tmp_path / "m")
    model = quantload.load(path, quantization_config=quantload.QuantloadConfig(quantize="nf4"), progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, QLinear)
