"""BitNet b1.58 packed ternary against transformers' bitnet integration run here on CPU: its pack_weights /
unpack_weights, and whole tiny llama models loaded by transformers (BitLinear / AutoBitLinear) and by
quantload. transformers wraps those functions in torch.compile; they run eagerly here (dynamo disabled),
the same ops without a C++ compile on a shared 2-core machine."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import ShapeMismatchError, UnsupportedError
from quantload.schemes.bitnet import BitNetScheme, pack_ternary, unpack_ternary
from quantload.schemes.registry import spec_from_dict

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations import bitnet as hf_bitnet  # noqa: E402


@pytest.fixture(autouse=True)
def eager():
    import torch._dynamo
    with torch._dynamo.config.patch(disable=True):
        yield


def _ternary(shape, seed=0):
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed)).to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_and_unpack_match_transformers(dtype):
    q = _ternary((64, 48))
    packed = hf_bitnet.pack_weights(q.clone())
    assert torch.equal(pack_ternary(q), packed)
    assert torch.equal(unpack_ternary(packed, dtype), hf_bitnet.unpack_weights(packed, dtype=dtype))


def _bitlinear_model(tmp_path, linear_class, arch="llama"):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "bitnet":                 # microsoft/bitnet-b1.58-2B-4T's architecture (sub-norms, relu2)
        from transformers import BitNetConfig, BitNetForCausalLM
        cfg, cls = BitNetConfig(**kw), BitNetForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).to(torch.bfloat16)
    scheme = BitNetScheme(linear_class)
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith("proj.weight"):
            enc = scheme.quantize(v).encode()
            f = v.float()
            s = 1.0 / f.abs().mean().clamp_(min=1e-5)                          # transformers' WeightQuant
            want = hf_bitnet.pack_weights((f * s).round().clamp(-1, 1))
            assert torch.equal(enc["weight"], want)
            tensors[k], tensors[k[:-6] + "weight_scale"] = enc["weight"], enc["weight_scale"]
        else:
            tensors[k] = v
    d = tmp_path / f"{arch}-{linear_class}"
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    body = json.loads(cfg.to_json_string())
    body["architectures"] = [cls.__name__]
    body["dtype"] = "bfloat16"
    body["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                   "quantization_mode": "offline", "modules_to_not_convert": None}
    (d / "config.json").write_text(json.dumps(body))
    return d, tensors, cls


@pytest.mark.parametrize("linear_class, arch", [("bitlinear", "llama"), ("autobitlinear", "llama"),
                                                ("autobitlinear", "bitnet")])
def test_tiny_model_matches_transformers_and_round_trips(tmp_path, linear_class, arch):
    d, tensors, cls = _bitlinear_model(tmp_path, linear_class, arch)
    ref = cls.from_pretrained(d, dtype=torch.bfloat16)
    assert type(ref.model.layers[0].mlp.up_proj).__name__ == {"bitlinear": "BitLinear",
                                                               "autobitlinear": "AutoBitLinear"}[linear_class]
    ours = quantload.load(d, progress=False)
    assert ours.model.layers[0].mlp.up_proj.scheme.linear_class == linear_class
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
        g1 = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        g2 = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)
    quantload.save(ours, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == tensors.keys() and all(torch.equal(saved[k], tensors[k]) for k in tensors)
    sd = quantload.read_state_dict(d)
    qt = sd["model.layers.1.self_attn.o_proj.weight"]
    assert qt.shape == (64, 64) and qt.scheme.name.startswith("bitnet")


def test_bad_input_and_unsupported_variants():
    scheme = BitNetScheme()
    w = torch.randn(16, 32)
    enc = scheme.quantize(w).encode()
    with pytest.raises(ShapeMismatchError, match=r"expected \[8, 32\]"):
        scheme.decode(enc, shape=(32, 32), file="f", prefix="m")
    with pytest.raises(ShapeMismatchError, match="multiple of 4"):
        scheme.quantize(torch.randn(6, 32))
    for bad in ({"quantization_mode": "online"}, {"use_rms_norm": True}, {"linear_class": "ternary"}):
        with pytest.raises(UnsupportedError, match="supported: packed offline") as e:
            spec_from_dict({"quant_method": "bitnet", **bad})
        assert "bitlinear" in str(e.value)
