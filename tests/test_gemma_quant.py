"""The Gemma quantization config transformers 5.25 added (quant_method "gemma"): against its own
integrations/gemma_quant.py run here on CPU (the unpackers, QuantizedLinear with SRQ activation rounding,
QuantizedEmbedding) and a tiny llama checkpoint transformers loads with GemmaQuantizer. transformers ships
no packer for this format (the checkpoints come calibrated), so the test packs in the documented layout and
checks the bytes through transformers' own unpackers."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import ShapeMismatchError, UnsupportedError
from quantload.schemes.gemma_quant import GemmaLinearScheme, apply_srq, unpack_ints
from quantload.schemes.registry import spec_from_dict

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations import gemma_quant as hf  # noqa: E402


def pack_ints(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ints [O, I] -> the stored bytes (the inverse of transformers' _unpack_int4 / _unpack_int2)."""
    if bits == 8:
        return q.to(torch.int8)
    per = 8 // bits
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, -u.shape[1] % per)).unflatten(-1, (-1, per))
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out


def _ints(shape, bits, seed):
    lo = -(1 << (bits - 1))
    return torch.randint(lo, -lo, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_matches_transformers(bits):
    q = _ints((6, 37), bits, bits)                      # an odd width: the last byte is padded
    packed = pack_ints(q, bits)
    ref = {2: hf._unpack_int2, 4: hf._unpack_int4}.get(bits)
    assert torch.equal(unpack_ints(packed, bits, 37), q)
    if ref is not None:
        assert torch.equal(ref(packed, 37), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("srq", [(0.0, 0.0), (0.02, 0.05)], ids=["uncalibrated", "srq"])
def test_linear_equals_quantized_linear(bits, srq):
    q = _ints((24, 40), bits, 7)
    scale = torch.rand(24, 1, generator=torch.Generator().manual_seed(1)) * 0.01
    pieces = {"weight": pack_ints(q, bits), "weight_scale": scale,
              "input_activation_scale": torch.tensor(srq[0]), "output_activation_scale": torch.tensor(srq[1])}
    ref = hf.QuantizedLinear(40, 24, bias=True, num_bits=bits)
    bias = torch.randn(24)
    ref.load_state_dict({**pieces, "bias": bias})
    scheme = GemmaLinearScheme(bits)
    qt = scheme.decode(pieces, shape=(24, 40), file="f", prefix="m")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 40).to(dtype)
        r = ref.to(dtype) if dtype != torch.float32 else ref
        with torch.no_grad():
            want = hf.QuantizedLinear.forward(r, x)
        assert torch.equal(scheme.linear(x, qt, bias.to(dtype)), want)
        assert torch.equal(qt.dequantize(dtype), r._dequantize_weights(dtype))
    assert torch.equal(apply_srq(torch.tensor([0.33, -9.0]), torch.tensor(0.1)), hf.apply_srq(torch.tensor([0.33, -9.0]), torch.tensor(0.1)))


def test_config_bits_per_module_and_unsupported():
    spec = spec_from_dict({"quant_method": "gemma", "num_bits": 4,
                           "module_quant_configs": {r"mlp\.down_proj": {"num_bits": 8}, r"self_attn": {"num_bits": 2}},
                           "modules_to_not_convert": ["lm_head", "model.layers.1.mlp"]})
    lin = torch.nn.Linear(8, 8)
    assert spec.scheme_for("model.layers.0.mlp.down_proj", lin).bits == 8
    assert spec.scheme_for("model.layers.0.self_attn.q_proj", lin).bits == 2
    assert spec.scheme_for("model.layers.0.mlp.up_proj", lin).bits == 4
    assert spec.scheme_for("model.layers.1.mlp.up_proj", lin) is None
    assert spec.scheme_for("model.layers.11.mlp.up_proj", lin) is not None     # module boundary, as transformers
    assert spec.scheme_for("model.embed_tokens", torch.nn.Embedding(4, 8)) is None
    with pytest.raises(UnsupportedError, match=r"num_bits=3 .*supported: \[2, 4, 8\]"):
        spec_from_dict({"quant_method": "gemma", "num_bits": 3})
    with pytest.raises(UnsupportedError, match="group_size"):
        spec_from_dict({"quant_method": "gemma", "module_quant_configs": {"x": {"group_size": 32}}})
    with pytest.raises(ShapeMismatchError, match=r"expected \[4, 10\]"):
        GemmaLinearScheme(4).decode({"weight": torch.zeros(4, 9, dtype=torch.uint8), "weight_scale": torch.ones(4, 1)},
                                    shape=(4, 20), file="f", prefix="m")


def test_tiny_llama_matches_transformers_and_round_trips(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    qcfg = {"quant_method": "gemma", "num_bits": 4, "quantize_embeddings": True,
            "module_quant_configs": {r"mlp\.down_proj": {"num_bits": 8}, r"self_attn\.[qk]_proj": {"num_bits": 2},
                                     r"embed_tokens": {"num_bits": 8}},
            "modules_to_not_convert": ["lm_head"]}
    spec = spec_from_dict(qcfg)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tensors = {}
    for k, v in model.state_dict().items():
        name = k.removesuffix(".weight")
        if k.endswith("proj.weight"):
            bits = spec.scheme_for(name, torch.nn.Linear(v.shape[1], v.shape[0])).bits
            hi = (1 << (bits - 1)) - 1
            scale = v.float().abs().amax(1, keepdim=True) / hi
            q = torch.clamp(torch.round(v.float() / scale), -hi - 1, hi)
            tensors[k], tensors[name + ".weight_scale"] = pack_ints(q, bits), scale
            tensors[name + ".input_activation_scale"] = torch.tensor(0.01 if "mlp" in k else 0.0)
            tensors[name + ".output_activation_scale"] = torch.tensor(0.0)
        elif k == "model.embed_tokens.weight":
            scale = v.float().unflatten(1, (4, 16)).abs().amax(-1) / 127              # 4 blocks a row
            q = torch.round(v.float() / scale.repeat_interleave(16, 1)).clamp(-128, 127)
            tensors[name + ".embedding_quantized"], tensors[name + ".embedding_scale"] = pack_ints(q, 8), scale
        else:
            tensors[k] = v
    tensors["model.layers.0.self_attn.k_cache_scale"] = torch.rand(1, generator=g)   # read by other tools only
    d = tmp_path / "gemma"
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    body = json.loads(cfg.to_json_string())
    body.update(architectures=["LlamaForCausalLM"], dtype="bfloat16", quantization_config=qcfg)
    (d / "config.json").write_text(json.dumps(body))

    ref = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert type(ref.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert float(ref.model.layers[0].mlp.up_proj.input_activation_scale.detach()) == pytest.approx(0.01)   # SRQ loaded
    ours = quantload.load(d, progress=False)
    assert ours.model.layers[0].self_attn.q_proj.scheme.name == "gemma-int2"
    assert ours.model.embed_tokens.scheme.name == "gemma-embedding-int8"
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
        g1 = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        g2 = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)
    quantload.save(ours, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    want = {k: v for k, v in tensors.items() if not k.endswith("cache_scale")}
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    sd = quantload.read_state_dict(d)
    emb = sd["model.embed_tokens.embedding_quantized"]
    assert emb.scheme.name == "gemma-embedding-int8" and torch.equal(emb.dequantize(torch.bfloat16),
                                                                     ref.model.embed_tokens.weight)
    assert sd["model.layers.1.mlp.down_proj.weight"].scheme.name == "gemma-int8"
