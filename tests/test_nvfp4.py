"""NVFP4: compressed-tensors nvfp4-pack-quantized (and mxfp4-pack-quantized) against compressed-tensors 0.20
itself on CPU (its qparams, compressor and decompressor), and NVIDIA ModelOpt's layout. ModelOpt is not
installable here: its NVFP4QTensor.dequantize math is re-implemented below from its source
(modelopt/torch/quantization/qtensor/nvfp4_tensor.py), and the layout is cross-checked against
compressed-tensors' own ModelOpt converter."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantload
from quantload.errors import ShapeMismatchError, UnsupportedError
from quantload.schemes.nvfp4 import FP4Scheme
from quantload.schemes.registry import spec_from_dict

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter  # noqa: E402
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _ct_nvfp4(w):
    """compressed-tensors' own NVFP4 weight path: tensor min/max -> generate_gparam, group min/max ->
    calculate_qparams with that global scale, then NVFP4PackedCompressor.compress."""
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    lo, hi = torch.aminmax(w)
    gscale = generate_gparam(lo.float(), hi.float())
    g = w.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(g.amin(-1).float(), g.amax(-1).float(), scheme.weights, global_scale=gscale)
    out = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gscale}, scheme)
    return dict(out), scheme


def _ct_mxfp4(w):
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    g = w.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(g.amin(-1).float(), g.amax(-1).float(), scheme.weights)
    return dict(MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)), scheme


def _ct_cfg(fmt="nvfp4-pack-quantized"):
    preset = "NVFP4A16" if fmt.startswith("nv") else "MXFP4A16"
    weights = json.loads(preset_name_to_scheme(preset, ["Linear"]).weights.model_dump_json())
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def _modelopt_dequantize(weight, weight_scale, weight_scale_2, dtype):
    """NVFP4QTensor.dequantize (fast=False), op for op."""
    unpacked = torch.empty(*weight.shape[:-1], weight.shape[-1] * 2, dtype=dtype)
    unpacked[..., 1::2] = weight >> 4
    unpacked[..., 0::2] = weight & 0x0F
    v = E2M1[unpacked.reshape(-1).long()].reshape(unpacked.shape)
    s = weight_scale.to(torch.float32) * weight_scale_2
    return (v.view(*v.shape[:-1], -1, 16) * s.unsqueeze(-1)).reshape(v.shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_ct_nvfp4_quantize_and_decode_match_compressed_tensors(dtype):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    w[3, :16] = 0                                            # a zero group: scale 0 -> 0.125
    w[5, 0] = -1e-6                                          # a negative that rounds to -0
    ref, scheme_ct = _ct_nvfp4(w)
    scheme = spec_from_dict(_ct_cfg()).scheme_for("x", None)
    assert isinstance(scheme, FP4Scheme) and scheme.name == "ct-nvfp4"
    enc = scheme.quantize(w).encode()
    assert enc.keys() == ref.keys()
    for k in ref:
        assert enc[k].dtype == ref[k].dtype and torch.equal(enc[k].view(torch.uint8), ref[k].view(torch.uint8)), k
    dense = NVFP4PackedCompressor.decompress(dict(ref), scheme_ct)["weight"]
    qt = scheme.decode(ref, shape=(48, 128), file="f", prefix="m")
    assert scheme.nbytes_for((48, 128), dtype) == qt.nbytes
    assert torch.equal(qt.dequantize(torch.bfloat16), dense)
    assert torch.equal(qt.dequantize(torch.float32), dense.float())


def test_ct_mxfp4_decodes_like_compressed_tensors():
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref, scheme_ct = _ct_mxfp4(w)
    assert ref["weight_scale"].dtype == torch.uint8
    scheme = spec_from_dict(_ct_cfg("mxfp4-pack-quantized")).scheme_for("x", None)
    qt = scheme.decode(ref, shape=(24, 128))
    assert torch.equal(qt.dequantize(torch.bfloat16), MXFP4PackedCompressor.decompress(dict(ref), scheme_ct)["weight"])
    with pytest.raises(UnsupportedError, match="supported: ct-nvfp4"):
        scheme.quantize(w)


def test_modelopt_layout_matches_modelopt_math_and_the_converter():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref, scheme_ct = _ct_nvfp4(w)
    s2 = torch.tensor(2.0 ** -9)                              # a power of two: 1 / s2 is exact
    mo = {"m.weight": ref["weight_packed"], "m.weight_scale": ref["weight_scale"], "m.weight_scale_2": s2,
          "m.input_scale": torch.tensor(0.5)}
    spec = spec_from_dict({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                           "exclude_modules": ["lm_head"]})
    scheme = spec.scheme_for("m", None)
    qt = scheme.decode({k[2:]: v for k, v in mo.items()}, shape=(32, 64))
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(qt.dequantize(dtype), _modelopt_dequantize(mo["m.weight"], mo["m.weight_scale"], s2, dtype))
    converted = ModelOptNvfp4Converter(targets=["re:.*"]).process(dict(mo))
    dense = NVFP4PackedCompressor.decompress({k[2:]: v for k, v in converted.items()}, scheme_ct)["weight"]
    assert torch.equal(qt.dequantize(torch.bfloat16), dense)
    assert {k: v for k, v in qt.encode().items()}.keys() == {"weight", "weight_scale", "weight_scale_2", "input_scale"}


def test_nested_hf_quant_config_exclusions_and_unsupported():
    spec = spec_from_dict({"quant_method": "modelopt", "producer": {"name": "modelopt"},
                           "quantization": {"quant_algo": "NVFP4", "exclude_modules": ["lm_head", "model.layers.0.*"]}})
    lin = torch.nn.Linear(64, 64)
    assert spec.scheme_for("model.layers.1.mlp.up_proj", lin) is not None
    assert spec.scheme_for("model.layers.0.mlp.up_proj", lin) is None and spec.scheme_for("lm_head", lin) is None
    with pytest.raises(UnsupportedError, match=r"quant_algo 'W4A8_AWQ' is not supported; supported: \['NVFP4', 'FP8', 'MIXED_PRECISION'\]"):
        spec_from_dict({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"})
    bad = _ct_cfg()
    bad["config_groups"]["group_0"]["weights"]["group_size"] = 32
    with pytest.raises(UnsupportedError, match="groups of 16"):
        spec_from_dict(bad)
    scheme = FP4Scheme()
    good, _ = _ct_nvfp4(torch.randn(8, 32))
    with pytest.raises(ShapeMismatchError, match=r"expected \[8, 2\]"):
        scheme.decode({**good, "weight_scale": good["weight_scale"][:, :1]}, file="f", prefix="m")
    with pytest.raises(ShapeMismatchError, match="model expects"):
        scheme.decode(good, shape=(8, 64))


# --- tiny llama ---------------------------------------------------------------------------------------------
def _tiny(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = tmp_path / "float"
    model.save_pretrained(d)
    return d


def _write(float_dir, out, convert, qcfg, extra_files=None):
    tensors = {}
    for k, v in load_file(float_dir / "model.safetensors").items():
        if k.endswith("proj.weight"):
            tensors.update({f"{k[:-7]}.{s}": t for s, t in convert(v).items()})
        else:
            tensors[k] = v
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((float_dir / "config.json").read_text())
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg))
    for name, body in (extra_files or {}).items():
        (out / name).write_text(json.dumps(body))
    return tensors


def _greedy(model):
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:].tolist()


def _same_bytes(saved, tensors):
    assert saved.keys() == tensors.keys()
    for k, v in tensors.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_tiny_llama_ct_nvfp4_matches_transformers_and_round_trips(tmp_path):
    float_dir = _tiny(tmp_path)
    qdir = tmp_path / "nvfp4"
    tensors = _write(float_dir, qdir, lambda w: _ct_nvfp4(w)[0], _ct_cfg())
    ref = LlamaForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16)     # compressed-tensors on CPU
    ours = quantload.load(qdir, progress=False)
    assert ours.model.layers[0].mlp.down_proj.scheme.name == "ct-nvfp4"
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert _greedy(ours) == _greedy(ref)
    assert quantload.read_state_dict(qdir)["model.layers.0.self_attn.q_proj.weight"].scheme.name == "ct-nvfp4"
    quantload.save(ours, tmp_path / "saved")
    _same_bytes(load_file(tmp_path / "saved" / "model.safetensors"), tensors)


def test_quantize_while_loading_to_nvfp4_gives_compressed_tensors_bytes(tmp_path):
    float_dir = _tiny(tmp_path)
    ours = quantload.load(float_dir, quantize="nvfp4", dtype="bfloat16", progress=False)
    quantload.save(ours, tmp_path / "q")
    saved = load_file(tmp_path / "q" / "model.safetensors")
    sd = load_file(float_dir / "model.safetensors")
    n = 0
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            ref, _ = _ct_nvfp4(v)
            for s, t in ref.items():
                assert torch.equal(saved[f"{k[:-7]}.{s}"].view(torch.uint8), t.view(torch.uint8)), (k, s)
            n += 1
    assert n == 14 and "lm_head.weight" in saved
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)   # what transformers reads back
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_tiny_llama_modelopt_layout(tmp_path):
    """A ModelOpt NVFP4 export (hf_quant_config.json beside the weights, no quantization_config): the
    model equals the float model whose Linear weights are ModelOpt's own dequantization."""
    float_dir = _tiny(tmp_path)

    def modelopt(w):
        ref, _ = _ct_nvfp4(w)
        return {"weight": ref["weight_packed"], "weight_scale": ref["weight_scale"],
                "weight_scale_2": (1.0 / ref["weight_global_scale"]).reshape(()), "input_scale": torch.tensor(0.02)}

    qdir = tmp_path / "modelopt"
    hf_quant = {"producer": {"name": "modelopt", "version": "0.29.0"},
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                 "exclude_modules": ["lm_head"]}}
    tensors = _write(float_dir, qdir, modelopt, None, {"hf_quant_config.json": hf_quant})
    ours = quantload.load(qdir, progress=False)
    ref = LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name.endswith("proj"):
                mod.weight.copy_(_modelopt_dequantize(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"],
                                                      tensors[f"{name}.weight_scale_2"], torch.bfloat16))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert _greedy(ours) == _greedy(ref)
    quantload.save(ours, tmp_path / "saved")
    _same_bytes(load_file(tmp_path / "saved" / "model.safetensors"), tensors)
    again = quantload.load(tmp_path / "saved", progress=False)             # config.json now says modelopt
    assert again.model.layers[1].mlp.gate_proj.scheme.name == "modelopt-nvfp4"


def test_tiny_llama_modelopt_mixed_precision_fp8_and_nvfp4(tmp_path):
    """MIXED_PRECISION: attention NVFP4, MLP per-tensor FP8 (ModelOpt's FP8QTensor: weight.to(dtype) *
    scale.to(dtype)), the rest dense."""
    float_dir = _tiny(tmp_path)
    layers = {}

    def convert(name, w):
        if "self_attn" in name:
            ref, _ = _ct_nvfp4(w)
            layers[name] = {"quant_algo": "NVFP4", "group_size": 16}
            return {"weight": ref["weight_packed"], "weight_scale": ref["weight_scale"],
                    "weight_scale_2": (1.0 / ref["weight_global_scale"]).reshape(())}
        scale = w.float().abs().amax() / 448.0
        layers[name] = {"quant_algo": "FP8"}
        return {"weight": (w.float() / scale).to(torch.float8_e4m3fn), "weight_scale": scale.reshape(()),
                "input_scale": torch.tensor(0.03)}

    tensors = {}
    for k, v in load_file(float_dir / "model.safetensors").items():
        if k.endswith("proj.weight"):
            tensors.update({f"{k[:-7]}.{s}": t for s, t in convert(k[:-7], v).items()})
        else:
            tensors[k] = v
    qdir = tmp_path / "mixed"
    qdir.mkdir()
    save_file(tensors, qdir / "model.safetensors", metadata={"format": "pt"})
    (qdir / "config.json").write_text((float_dir / "config.json").read_text())
    (qdir / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8", "quantized_layers": layers,
        "exclude_modules": ["lm_head"]}}))
    ours = quantload.load(qdir, progress=False)
    assert ours.model.layers[0].self_attn.q_proj.scheme.name == "modelopt-nvfp4"
    assert ours.model.layers[0].mlp.up_proj.scheme.name == "modelopt-fp8"
    ref = LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not name.endswith("proj"):
                continue
            t = {s: tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2") if f"{name}.{s}" in tensors}
            if "weight_scale_2" in t:
                w = _modelopt_dequantize(t["weight"], t["weight_scale"], t["weight_scale_2"], torch.bfloat16)
            else:
                w = t["weight"].to(torch.bfloat16) * t["weight_scale"].to(torch.bfloat16)
            mod.weight.copy_(w)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert _greedy(ours) == _greedy(ref)
    quantload.save(ours, tmp_path / "saved")
    _same_bytes(load_file(tmp_path / "saved" / "model.safetensors"), tensors)
    with pytest.raises(UnsupportedError, match=r"quantized_layers\['m'\].quant_algo 'INT8_SQ'"):
        spec_from_dict({"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                        "quantized_layers": {"m": {"quant_algo": "INT8_SQ"}}})


def test_nvfp4_leaves_partial_groups_dense():
    spec = spec_from_dict(_ct_cfg())
    assert spec.scheme_for("a", torch.nn.Linear(40, 8)) is None and "a" in spec.to_dict()["ignore"]
    assert spec.scheme_for("b", torch.nn.Linear(48, 8)) is not None


def test_e2m1_by_shifts_equals_the_table_for_every_byte():
    from quantload.schemes.fp4 import E2M1_TO_FP16_SHIFT, E2M1_VALUES, e2m1_scaled_down
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = e2m1_scaled_down(b).float() * E2M1_TO_FP16_SHIFT
    want = torch.tensor(E2M1_VALUES)[torch.stack((b & 15, b >> 4), -1).flatten().long()]
    assert torch.equal(v, want) and torch.equal(v.signbit(), want.signbit())


@pytest.mark.parametrize("gscale", [1.0, 3.7e3, 1e-30])
def test_every_code_and_fp8_scale_like_compressed_tensors(gscale):
    """All 256 FP8 scale bytes (NaN and subnormals included) times all 256 byte pairs of codes."""
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(256, 1)            # [256, 256]
    scale = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    scale = scale.reshape(256, 1).expand(256, 32).contiguous()
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": torch.tensor([gscale])}
    want = NVFP4PackedCompressor.decompress(dict(sd), preset_name_to_scheme("NVFP4A16", ["Linear"]))["weight"]
    got = FP4Scheme("ct-nvfp4").decode(sd).dequantize(torch.bfloat16)
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True) and torch.equal(got.signbit(), want.signbit())
