"""MXFP4 (gpt-oss layout) against transformers' own CPU dequantization (convert_moe_packed_tensors, which
transformers runs when it has no Triton), and a tiny gpt-oss checkpoint whose expert blocks were packed by
compressed-tensors' MXFP4 quantizer (transformers packs MXFP4 only through Triton kernels)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import quantload
from quantload.errors import ShapeMismatchError, UnsupportedError
from quantload.schemes.mxfp4 import MXFP4Scheme
from quantload.schemes.registry import spec_from_dict

transformers = pytest.importorskip("transformers")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402


def _random_blocks(*lead, rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (*lead, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_stacked_experts_decode_like_transformers(dtype):
    blocks, scales = _random_blocks(3, rows=48, cols=64)
    scales[0, 0, 0], scales[1, 2, 1] = 0, 255                 # 2**-127 and 2**128 edge exponents
    scheme = MXFP4Scheme("gate_up_proj")
    qt = scheme.decode({"gate_up_proj_blocks": blocks, "gate_up_proj_scales": scales}, shape=(3, 48, 64))
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)          # [E, in, out]
    assert torch.equal(qt.dequantize(dtype).transpose(1, 2), want)
    enc = qt.encode()
    assert torch.equal(enc["gate_up_proj_blocks"], blocks) and torch.equal(enc["gate_up_proj_scales"], scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_code_and_exponent_like_transformers(dtype):
    """All 256 E8M0 bytes (NaN's 255 and 2**-127 included) times all 256 byte pairs of codes."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 1, 16, 16).expand(1, 256, 16, 16)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256, 1).expand(1, 256, 16)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    qt = MXFP4Scheme("down_proj").decode({"down_proj_blocks": blocks, "down_proj_scales": scales})
    got, want = qt.dequantize(dtype).transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True) and torch.equal(got.signbit(), want.signbit())


def test_select_expert_is_a_view_and_runs_one_expert():
    blocks, scales = _random_blocks(4, rows=32, cols=64, seed=1)
    scheme = MXFP4Scheme("down_proj")
    qt = scheme.decode({"down_proj_blocks": blocks, "down_proj_scales": scales})
    e = scheme.select_expert(qt, 2)
    assert e.shape == (32, 64) and e.data["down_proj_blocks"].data_ptr() == blocks[2].data_ptr()
    param = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # transformers' [E, in, out]
    x = torch.randn(5, 64).to(torch.bfloat16)
    b = torch.randn(32).to(torch.bfloat16)
    assert torch.equal(scheme.linear(x, e, b), F.linear(x, param[2].T, b))
    two_d = scheme.decode({"down_proj_blocks": blocks[2], "down_proj_scales": scales[2]})
    assert torch.equal(two_d.dequantize(torch.float32), qt.dequantize(torch.float32)[2])
    with pytest.raises(ShapeMismatchError, match="select_expert"):
        scheme.linear(x, qt, None)


def test_bad_pieces_and_unsupported_quantize():
    blocks, scales = _random_blocks(2, rows=8, cols=64)
    scheme = MXFP4Scheme("down_proj")
    with pytest.raises(ShapeMismatchError, match="one exponent per 32-value group") as e:
        scheme.decode({"down_proj_blocks": blocks, "down_proj_scales": scales[..., :1]}, file="f", prefix="m")
    assert e.value.key == "m.down_proj_scales"
    with pytest.raises(ShapeMismatchError, match=r"expects \[2, 8, 32\]"):
        scheme.decode({"down_proj_blocks": blocks, "down_proj_scales": scales}, shape=(2, 8, 32))
    with pytest.raises(UnsupportedError, match="nvfp4"):
        scheme.quantize(torch.randn(8, 64))


# --- a tiny gpt-oss ------------------------------------------------------------------------------------
def _pack_mxfp4(w):
    """compressed-tensors' MXFP4 weight quantizer and packer on one [out, in] weight, laid out as gpt-oss
    stores it: blocks [out, in/32, 16], scales [out, in/32] (the same nibble order and E8M0 bias)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    g = w.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(g.amin(-1).float(), g.amax(-1).float(), scheme.weights)
    out = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return out["weight_packed"].reshape(w.shape[0], -1, 16), out["weight_scale"]


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    d = tmp_path_factory.mktemp("gptoss")
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed = [_pack_mxfp4(v[e].T.contiguous()) for e in range(v.shape[0])]  # per expert [out, in]
            tensors[k + "_blocks"] = torch.stack([p[0] for p in packed])
            tensors[k + "_scales"] = torch.stack([p[1] for p in packed])
        else:
            tensors[k] = v.contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    body = json.loads(cfg.to_json_string())
    body["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    body["architectures"] = ["GptOssForCausalLM"]
    (d / "config.json").write_text(json.dumps(body))
    return d, tensors


def test_tiny_gpt_oss_experts_equal_transformers_cpu_load(tiny_gpt_oss):
    d, tensors = tiny_gpt_oss
    from transformers import GptOssForCausalLM
    ref = GptOssForCausalLM.from_pretrained(d, dtype=torch.bfloat16)          # dequantizes on CPU
    sd = quantload.read_state_dict(d)
    for layer in range(2):
        for stem in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{stem}"
            qt = sd[name]
            assert qt.scheme.name == "mxfp4" and qt.ndim == 3
            assert torch.equal(qt.dequantize(torch.bfloat16).transpose(1, 2), ref.get_parameter(name))
            enc = qt.encode()
            assert torch.equal(enc[f"{stem}_blocks"], tensors[name + "_blocks"])
            assert torch.equal(enc[f"{stem}_scales"], tensors[name + "_scales"])
    assert not sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8     # dense as configured


def test_mxfp4_config():
    spec = spec_from_dict({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]})
    assert spec.scheme_for("model.layers.0.self_attn.q_proj", torch.nn.Linear(8, 8)) is None
    assert set(spec.experts_schemes("model.layers.3.mlp.experts")) == {"gate_up_proj", "down_proj"}
    assert spec.experts_schemes("model.layers.3.self_attn") == {}
