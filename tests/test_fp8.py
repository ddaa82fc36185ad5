"""Fine-grained FP8 (quant_method "fp8") and FBGEMM FP8, against transformers' own code run here on CPU:
Fp8Dequantize / Fp8Quantize (finegrained_fp8.py) are the functions transformers runs on a CPU; a tiny llama
checkpoint written by Fp8Quantize loads in transformers (it dequantizes on CPU) and in quantload to the same
logits and greedy tokens, and saves back to the same bytes."""
import json
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import ShapeMismatchError, UnsupportedError
from quantload.schemes.fp8_block import FP8BlockScheme
from quantload.schemes.registry import spec_from_dict

transformers = pytest.importorskip("transformers")
from transformers import FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.finegrained_fp8 import (  # noqa: E402
    Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight)


def _tool(block=(128, 128), scale_fmt="float"):
    cfg = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    return types.SimpleNamespace(quantization_config=cfg)


def _tool_quantize(w, block, scale_fmt="float"):
    out = Fp8Quantize(_tool(block, scale_fmt))._quantize_one("m.weight", w)
    return out["m.weight"], out["m.weight_scale_inv"]


def _cfg(block=(32, 32), scale_fmt="float", **kw):
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block),
            "scale_fmt": scale_fmt, **kw}


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("shape", [(64, 96), (3, 64, 64)], ids=["2d", "3d-experts"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_and_decode_match_transformers(scale_fmt, shape, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    w[..., :32, :32] = 0                                     # an all-zero block keeps scale 1
    ref_q, ref_s = _tool_quantize(w, (32, 32), scale_fmt)
    scheme = spec_from_dict(_cfg(scale_fmt=scale_fmt)).scheme_for("x", None)
    qt = scheme.quantize(w)
    enc = qt.encode()
    assert enc["weight"].dtype == torch.float8_e4m3fn and enc["weight_scale_inv"].dtype == ref_s.dtype
    assert torch.equal(enc["weight"].view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(enc["weight_scale_inv"].view(torch.uint8), ref_s.view(torch.uint8))
    back = scheme.decode(enc, shape=shape, file="f", prefix="m")
    assert scheme.nbytes_for(shape, dtype) == back.nbytes             # what placement plans with
    for out in (torch.bfloat16, torch.float32):
        want = Fp8Dequantize(None)._dequantize_one(ref_q, ref_s, output_dtype=out)
        assert torch.equal(back.dequantize(out), want)


def test_ue8m0_scales_stored_as_bytes():
    """MXFP8-style checkpoints keep the E8M0 exponents as uint8; transformers reads 2 ** (b - 127)."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    q, s = _tool_quantize(w, (32, 32), "ue8m0")
    scheme = FP8BlockScheme((32, 32), "ue8m0")
    qt = scheme.decode({"weight": q, "weight_scale_inv": s.view(torch.uint8)})
    want = Fp8Dequantize(None)._dequantize_one(q, s.view(torch.uint8), output_dtype=torch.bfloat16)
    assert torch.equal(qt.dequantize(torch.bfloat16), want)
    assert qt.encode()["weight_scale_inv"].dtype == torch.uint8


def test_partial_edge_blocks_and_per_tensor():
    """FP8Linear allocates ceil(O/bh) x ceil(I/bw) scales; transformers' own block dequantizer for those
    shapes (_dequantize_fp8_weight, float32) gives the same values."""
    g = torch.Generator().manual_seed(2)
    q = (torch.randn(40, 80, generator=g) * 20).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.01
    qt = FP8BlockScheme((32, 32)).decode({"weight": q, "weight_scale_inv": s})
    assert torch.equal(qt.dequantize(torch.float32), _dequantize_fp8_weight(q, s, [32, 32], torch.float32))
    one = torch.tensor(0.125)
    act = torch.tensor(0.5)                                   # activation_scheme "static": kept for saving
    qt = FP8BlockScheme(None, activation_scheme="static").decode({"weight": q, "weight_scale_inv": one,
                                                                  "activation_scale": act})
    assert torch.equal(qt.dequantize(torch.float32), q.float() * 0.125)
    assert qt.encode()["activation_scale"] is act
    with pytest.raises(ShapeMismatchError, match=r"expected \[2, 3\]"):
        FP8BlockScheme((32, 32)).decode({"weight": q, "weight_scale_inv": s[:, :2]}, file="f", prefix="m")


def test_select_expert_is_a_view():
    w = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(3))
    scheme = FP8BlockScheme((32, 32))
    qt = scheme.quantize(w)
    e = scheme.select_expert(qt, 2)
    assert e.shape == (64, 64) and e.data["weight"].data_ptr() == qt.data["weight"][2].data_ptr()
    assert torch.equal(e.dequantize(torch.float32), qt.dequantize(torch.float32)[2])
    x = torch.randn(3, 64)
    assert torch.equal(scheme.linear(x, e, None), F.linear(x, qt.dequantize(torch.float32)[2]))


def test_config_parsing_and_unsupported_variants():
    spec = spec_from_dict(_cfg((128, 128), modules_to_not_convert=["model.layers.0.mlp"]))
    lin = torch.nn.Linear(256, 128)
    assert spec.scheme_for("model.layers.1.mlp.up_proj", lin).name == "fp8-block128x128-float"
    assert spec.scheme_for("model.layers.0.mlp.up_proj", lin) is None
    assert spec.scheme_for("lm_head", lin) is None
    assert spec.scheme_for("model.layers.1.self_attn.k_proj", torch.nn.Linear(256, 64)) is None  # not whole blocks
    assert spec_from_dict({"quant_method": "fp8", "ignored_layers": ["gate"]}).skip_modules == ["gate", "lm_head"]
    for bad, what in [(dict(expert_dtype="fp4"), "expert_dtype"), (dict(modules_to_convert=["embed"]), "modules_to_convert"),
                      (dict(scale_fmt="e5m2"), "scale_fmt"), (dict(activation_scheme="per-token"), "activation_scheme")]:
        with pytest.raises(UnsupportedError, match=what) as e:
            spec_from_dict({**_cfg(), **bad})
        assert "supported" in str(e.value)
    with pytest.raises(UnsupportedError, match=r"'fp9' is not supported; supported: .*'fp8'"):
        spec_from_dict({"quant_method": "fp9"})


# --- a tiny llama checkpoint, written by transformers' Fp8Quantize ----------------------------------------
def _tiny_float(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = tmp_path / "float"
    model.save_pretrained(d)
    return d, model


def _write_fp8(float_dir, out, qcfg, scale_fmt="float"):
    """The checkpoint layout transformers saves: every Linear but lm_head quantized by Fp8Quantize."""
    sd = load_file(float_dir / "model.safetensors")
    tool = _tool(qcfg["weight_block_size"], scale_fmt)
    tensors = {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            tensors.update(Fp8Quantize(tool)._quantize_one(k, v))
        else:
            tensors[k] = v
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg))
    return tensors


def _greedy(model, n=6):
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_tiny_llama_matches_transformers_and_round_trips(tmp_path, scale_fmt):
    float_dir, _ = _tiny_float(tmp_path)
    qdir = tmp_path / "fp8"
    tensors = _write_fp8(float_dir, qdir, _cfg(scale_fmt=scale_fmt), scale_fmt)
    ref = LlamaForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16)       # CPU: transformers dequantizes
    ours = quantload.load(qdir, progress=False)
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "QLinear" and q_proj.scheme.name == f"fp8-block32x32-{scale_fmt}"
    assert torch.equal(q_proj.weight.dequantize(torch.bfloat16), ref.model.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert _greedy(ours) == _greedy(ref)
    sd = quantload.read_state_dict(qdir)
    assert sd["model.layers.1.mlp.down_proj.weight"].scheme.name == f"fp8-block32x32-{scale_fmt}"
    out = tmp_path / "saved"
    quantload.save(ours, out)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == tensors.keys()
    for k, v in tensors.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k].view(torch.uint8), v.view(torch.uint8)), k
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_quantize_while_loading_gives_transformers_bytes(tmp_path):
    float_dir, _ = _tiny_float(tmp_path)
    model = quantload.load(float_dir, quantize=_cfg((32, 32)), dtype="bfloat16", progress=False)
    sd = load_file(float_dir / "model.safetensors")
    n = 0
    for name, mod in model.named_modules():
        if type(mod).__name__ != "QLinear":
            continue
        q, s = _tool_quantize(sd[name + ".weight"], (32, 32))
        enc = mod.weight.encode()
        assert torch.equal(enc["weight"].view(torch.uint8), q.view(torch.uint8)) and torch.equal(enc["weight_scale_inv"], s)
        n += 1
    assert n == 14 and type(model.lm_head).__name__ == "Linear"
    quantload.save(model, tmp_path / "saved")                  # what transformers reads back
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert quantload.load(float_dir, quantize="fp8", progress=False).model.layers[0].mlp.up_proj.__class__.__name__ == "Linear"


# --- FBGEMM FP8 (per output channel) ----------------------------------------------------------------------
def _fbgemm_row_quantize_ref(x):
    """fbgemm-gpu's own reference for its row-wise FP8 quantizer (fbgemm_gpu/experimental/gen_ai/test/quantize/
    quantize_test.py, fp8_row_quantize_ref, "match kernel logics"), fed float32 as the CUDA kernel computes;
    fbgemm-gpu itself is CUDA-only."""
    x = x.float()
    x_row_max = torch.max(torch.abs(x), dim=1).values
    scale = torch.Tensor(448.0 / x_row_max).clamp(max=448.0 * 512.0)
    return (x * scale.unsqueeze(1)).to(torch.float8_e4m3fn), scale.reciprocal().to(torch.float32)


def test_fbgemm_fp8_quantize_decode_and_transformers_layout():
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    w[7] = 0
    spec = spec_from_dict({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0})
    scheme = spec.scheme_for("m", torch.nn.Linear(64, 48))
    assert spec.scheme_for("lm_head", torch.nn.Linear(64, 48)) is None
    enc = scheme.quantize(w).encode()
    q, s = _fbgemm_row_quantize_ref(w)
    assert torch.equal(enc["weight"].view(torch.uint8), q.view(torch.uint8)) and torch.equal(enc["weight_scale"][:, 0], s)
    # the module transformers builds for this checkpoint takes these tensors as they are
    ref = FbgemmFp8Linear(64, 48, bias=False)
    assert {k: (v.shape, v.dtype) for k, v in ref.state_dict().items()} == {k: (v.shape, v.dtype) for k, v in enc.items()}
    qt = scheme.decode(enc, shape=(48, 64), file="f", prefix="m")
    assert torch.equal(qt.dequantize(torch.float32), q.float() * s[:, None])
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(scheme.linear(x, qt, None), F.linear(x, (q.float() * s[:, None]).to(torch.bfloat16)))
    with pytest.raises(ShapeMismatchError, match="one scale per output row"):
        scheme.decode({**enc, "weight_scale": enc["weight_scale"][:4]}, file="f", prefix="m")


def test_fbgemm_fp8_tiny_llama_round_trip(tmp_path):
    float_dir, float_model = _tiny_float(tmp_path)
    qdir = tmp_path / "fbgemm"
    sd = load_file(float_dir / "model.safetensors")
    tensors = {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            q, s = _fbgemm_row_quantize_ref(v)
            tensors[k], tensors[k[:-6] + "weight_scale"] = q, s.reshape(-1, 1)
        else:
            tensors[k] = v
    qdir.mkdir()
    save_file(tensors, qdir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": None}
    (qdir / "config.json").write_text(json.dumps(cfg))
    ours = quantload.load(qdir, progress=False)
    with torch.no_grad():                     # the reference: weight-only dequantization into the float model
        for name, mod in float_model.named_modules():
            if name.endswith("proj"):
                mod.weight.copy_((tensors[name + ".weight"].float() * tensors[name + ".weight_scale"]).to(torch.bfloat16))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, float_model(ids).logits)
    quantload.save(ours, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == tensors.keys()
    assert all(torch.equal(saved[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)


def test_every_fp8_code_decodes_like_a_cast():
    """The shift-based fp8 -> float32 path against q.to(float32) for all 256 codes (NaN codes take the cast)."""
    from quantload.schemes.fp8_block import FP8_TO_FP16_SHIFT, fp8_scaled_down
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = q[(q.view(torch.uint8) & 0x7F) != 0x7F]
    assert torch.equal(fp8_scaled_down(finite) * FP8_TO_FP16_SHIFT, finite.to(torch.float32))
    assert fp8_scaled_down(q) is None
    qt = FP8BlockScheme(None).decode({"weight": q.reshape(16, 16), "weight_scale_inv": torch.tensor(3.0)})
    assert torch.allclose(qt.dequantize(torch.float32), q.reshape(16, 16).float() * 3.0, equal_nan=True, rtol=0, atol=0)


def test_release_configs_and_the_fp8_short_name_on_128_blocks():
    """The quantization_config DeepSeek-V3 and Qwen3-FP8 ship (with their extra 'fmt' key), and
    quantize="fp8" (128x128 blocks) on layers of whole blocks, against transformers' Fp8Quantize defaults."""
    spec = spec_from_dict({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]})
    assert spec.scheme_for("model.layers.0.mlp.experts.0.up_proj", torch.nn.Linear(256, 128)).name == "fp8-block128x128-float"
    from quantload.config import resolve_quantize
    scheme = resolve_quantize("fp8").scheme_for("m", torch.nn.Linear(256, 384))
    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    q, s = _tool_quantize(w, (128, 128))
    enc = scheme.quantize(w).encode()
    assert torch.equal(enc["weight"].view(torch.uint8), q.view(torch.uint8)) and torch.equal(enc["weight_scale_inv"], s)
    assert resolve_quantize("fp8-ue8m0").scheme_for("m", torch.nn.Linear(256, 384)).scale_fmt == "ue8m0"


def test_compressed_tensors_fp8_block_tiny_llama_matches_transformers(tmp_path):
    """The compressed-tensors spelling of block FP8 (float-quantized, strategy block: llm-compressor's
    FP8_BLOCK), quantized while loading, saved, and read back by transformers on CPU."""
    float_dir, _ = _tiny_float(tmp_path)
    cfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
               "num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "block_structure": [32, 32],
               "dynamic": False}}}, "ignore": ["lm_head"]}
    # exact=True: compressed.py's schemes may otherwise take a packed kernel (bfloat16 numerics)
    ours = quantload.load(float_dir, quantize=cfg, dtype="bfloat16", progress=False, exact=True)
    assert ours.model.layers[0].mlp.up_proj.scheme.name == "ct-float-float8-block32x32-sym"
    quantload.save(ours, tmp_path / "ct")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    again = quantload.load(tmp_path / "ct", progress=False, exact=True)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, ref(ids).logits)
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert _greedy(again) == _greedy(ref)


def test_modules_to_not_convert_follow_transformers_rule():
    """transformers' should_convert_module: a regex from the start up to a module boundary, or a suffix."""
    from transformers.quantizers.quantizers_utils import should_convert_module
    patterns = ["model.layers.*.mlp.gate", "lm_head", "model.layers.1", "self_attn.o_proj"]
    for method in ("fp8", "fbgemm_fp8", "bitnet"):
        spec = spec_from_dict({"quant_method": method, "modules_to_not_convert": patterns, "weight_block_size": None})
        for name in ("model.layers.3.mlp.gate", "model.layers.3.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                     "model.layers.11.mlp.up_proj", "model.layers.2.self_attn.o_proj", "lm_head"):
            lin = torch.nn.Linear(128, 128)
            assert (spec.scheme_for(name, lin) is not None) == should_convert_module(name, patterns), (method, name)


def test_per_tensor_quantize_round_trips():
    """weight_block_size null: one scale for the whole weight (1 / (448 / amax), transformers'
    op order), 0-d as per-tensor FP8
    checkpoints store it; decoding the written pieces gives back the same values."""
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(5))
    scheme = FP8BlockScheme(None)
    qt = scheme.quantize(w)
    pieces = qt.encode()
    assert pieces["weight"].dtype == torch.float8_e4m3fn and pieces["weight_scale_inv"].shape == ()
    assert torch.equal(pieces["weight_scale_inv"], 1.0 / (448.0 / w.abs().amax().to(torch.float32)))
    back = scheme.decode(pieces)
    assert torch.equal(back.dequantize(torch.float32),
                       pieces["weight"].to(torch.float32) * pieces["weight_scale_inv"])
    assert torch.allclose(back.dequantize(torch.float32), w, rtol=0.07, atol=1e-3)
