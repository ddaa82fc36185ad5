"""compressed-tensors: golden fixtures, and every other layout against compressed-tensors 0.20.0 itself on
CPU (its compressors for 1..8 bits, tensor/channel/group, asym, int8 and FP8; its pack helper for g_idx)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantload.errors import ConfigError, MissingTensorError, QuantStateError, ShapeMismatchError, UnsupportedError
from quantload.schemes.compressed import CTNaiveScheme, CTPackedScheme
from quantload.schemes.intpack import pack_padded
from quantload.schemes.registry import spec_from_dict

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

FIXTURES = ["ct_pack_b2_group64_sym", "ct_pack_b4_group128_sym", "ct_pack_b4_group32_asym", "ct_pack_b8_channel_sym"]


def _fixture(fixtures_dir, name):
    cfg = json.loads((fixtures_dir / f"{name}.json").read_text())["quantization_config"]
    sd = load_file(fixtures_dir / f"{name}.safetensors")
    exp = load_file(fixtures_dir / f"{name}.expected.safetensors")
    return cfg, {k.removeprefix("layer."): v for k, v in sd.items()}, exp


def _decode(scheme, sd, shape=None):
    keys = (*scheme.required_keys(), *scheme.optional_keys())
    return scheme.decode({k: v for k, v in sd.items() if k in keys}, shape=shape, file="f.safetensors",
                         prefix="layer")


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_decodes_exactly_and_encodes_back(fixtures_dir, name):
    cfg, sd, exp = _fixture(fixtures_dir, name)
    scheme = spec_from_dict(cfg).scheme_for("layer", None)
    assert isinstance(scheme, CTPackedScheme) and scheme.present(set(sd))
    for shape in (None, (96, 256)):
        qt = _decode(scheme, sd, shape)
        w = qt.dequantize()
        assert w.dtype == torch.bfloat16 and torch.equal(w, exp["layer.weight.dequantized"])
    enc = qt.encode()
    assert enc.keys() == sd.keys() and all(torch.equal(enc[k], sd[k]) and enc[k].dtype == sd[k].dtype for k in sd)
    assert scheme.nbytes_for((96, 256), torch.bfloat16) == qt.nbytes


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_requantizes_to_the_same_bytes(fixtures_dir, name):
    """The fixtures were written by compressed-tensors' compressor with min-max qparams: quantizing the
    original weight reproduces every byte."""
    cfg, sd, exp = _fixture(fixtures_dir, name)
    qt = spec_from_dict(cfg).scheme_for("layer", None).quantize(exp["layer.weight.original"])
    enc = qt.encode()
    assert enc.keys() == sd.keys()
    for k in sd:
        assert enc[k].dtype == sd[k].dtype and torch.equal(enc[k], sd[k]), k


# --- against compressed-tensors on CPU ---------------------------------------------------------
def _ct_reference(w, args_kw, compressor=PackedQuantizationCompressor):
    """compressed-tensors' own path: min-max observation, calculate_qparams, compress (the zero-point is
    initialized for symmetric schemes too, as compressed-tensors' initialize does). This is also how the
    golden fixtures were made (test_fixture_requantizes_to_the_same_bytes)."""
    args = QuantizationArgs(**args_kw)
    if args.strategy == "group":
        g = w.unflatten(-1, (-1, args.group_size))
        lo, hi = torch.amin(g, dim=-1), torch.amax(g, dim=-1)
    elif args.strategy == "channel":
        lo, hi = torch.amin(w, dim=-1, keepdim=True), torch.amax(w, dim=-1, keepdim=True)
    elif args.strategy == "tensor":
        lo, hi = torch.aminmax(w)
    else:
        bh, bw = args.block_structure
        p = F.pad(w, (0, -w.shape[1] % bw, 0, -w.shape[0] % bh)).unflatten(1, (-1, bw)).unflatten(0, (-1, bh))
        lo, hi = torch.amin(p, dim=(1, 3)), torch.amax(p, dim=(1, 3))
    scale, zp = calculate_qparams(lo.float(), hi.float(), args)   # llm-compressor keeps float32 statistics
    scale = scale.to(w.dtype)                                       # ... in a weight-dtype weight_scale
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    dense = compressor.decompress(dict(out), scheme)["weight"]
    return dict(out), dense


def _cfg(weights, fmt="pack-quantized"):
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


PACK_CASES = [dict(num_bits=b, symmetric=s, strategy=st, **({"group_size": 32} if st == "group" else {}))
              for b in range(2, 9) for s in (True, False) for st in ("group", "channel", "tensor")
              if not (b in (5, 6, 7) and st == "tensor")] + [dict(num_bits=1, symmetric=False, strategy="channel")]


def _case_id(a):
    return f"b{a['num_bits']}-{a['strategy']}-{'sym' if a['symmetric'] else 'asym'}"


@pytest.mark.parametrize("args", PACK_CASES, ids=_case_id)
def test_pack_quantized_matches_compressed_tensors(args):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(args["num_bits"])).to(torch.bfloat16)
    ref, ref_dense = _ct_reference(w, args)
    scheme = spec_from_dict(_cfg(args)).scheme_for("x", None)
    qt = scheme.quantize(w)
    enc = qt.encode()
    assert enc.keys() == ref.keys()
    for k in ref:
        assert enc[k].dtype == ref[k].dtype and torch.equal(enc[k], ref[k]), k
    back = _decode(scheme, ref, (40, 96))
    assert torch.equal(back.dequantize(), ref_dense)
    assert torch.equal(qt.dequantize(), ref_dense)


def test_ct_decompress_reads_our_runtime_int4(fixtures_dir):
    """quantize="int4" -> what compressed-tensors (hence transformers and vLLM) would load."""
    from quantload.config import resolve_quantize
    spec = resolve_quantize("int4")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    qt = spec.scheme_for("m.q_proj", torch.nn.Linear(256, 64)).quantize(w)
    weights = QuantizationArgs(**spec.to_dict()["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    dense = PackedQuantizationCompressor.decompress(qt.encode(), scheme)
    assert torch.equal(dense["weight"], qt.dequantize())


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_padded_odd_width_layout(bits):
    """compressed-tensors before the dense change kept 32//bits whole values per word."""
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (8, 64), generator=g)
    zp = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (8, 2), generator=g)
    scale = torch.rand(8, 2, generator=g).to(torch.bfloat16) + 0.1
    off = 1 << (bits - 1)
    sd = {"weight_packed": pack_padded(q + off, bits, dim=1), "weight_scale": scale,
          "weight_shape": torch.tensor([8, 64]), "weight_zero_point": pack_padded(zp + off, bits, dim=0)}
    scheme = spec_from_dict(_cfg(dict(num_bits=bits, symmetric=False, group_size=32))).scheme_for("x", None)
    qt = _decode(scheme, sd)
    assert qt.meta["layout"] == "padded"
    want = (q.to(torch.bfloat16) - zp.repeat_interleave(32, 1).to(torch.bfloat16)) * scale.repeat_interleave(32, 1)
    assert torch.equal(qt.dequantize(), want)


def test_g_idx_from_actorder_group_checkpoints():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (16, 64), generator=g, dtype=torch.int8)
    zp = torch.randint(-8, 8, (16, 4), generator=g, dtype=torch.int8)
    scale = (torch.rand(16, 4, generator=g) + 0.1).to(torch.bfloat16)
    g_idx = torch.randperm(64, generator=g).to(torch.int32) // 16
    sd = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale, "weight_shape": torch.tensor([16, 64]),
          "weight_zero_point": pack_to_int32(zp, 4, packed_dim=0), "weight_g_idx": g_idx}
    cfg = _cfg(dict(num_bits=4, symmetric=False, group_size=16, actorder="group"))
    scheme = spec_from_dict(cfg).scheme_for("x", None)
    qt = _decode(scheme, sd)
    gi = g_idx.long()
    want = (q.to(torch.bfloat16) - zp[:, gi].to(torch.bfloat16)) * scale[:, gi]
    assert torch.equal(qt.dequantize(), want)
    assert torch.equal(qt.encode()["weight_g_idx"], g_idx)
    bad = dict(sd, weight_g_idx=g_idx.clone().index_fill_(0, torch.tensor([3]), 4))
    with pytest.raises(QuantStateError, match=r"expected values in \[0, 3\]") as e:
        _decode(scheme, bad)
    assert e.value.key == "layer.weight_g_idx"


@pytest.mark.parametrize("args", [dict(num_bits=8, symmetric=True, strategy="channel"),
                                  dict(num_bits=8, symmetric=False, strategy="channel"),
                                  dict(num_bits=8, symmetric=True, strategy="tensor"),
                                  dict(num_bits=8, symmetric=False, strategy="group", group_size=32)],
                         ids=["channel-sym", "channel-asym", "tensor", "group-asym"])
def test_int_quantized_matches_compressed_tensors(args):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref, ref_dense = _ct_reference(w, args, NaiveQuantizationCompressor)
    scheme = spec_from_dict(_cfg(args, "int-quantized")).scheme_for("x", None)
    assert isinstance(scheme, CTNaiveScheme)
    enc = scheme.quantize(w).encode()
    assert enc.keys() == ref.keys() and all(torch.equal(enc[k], ref[k]) and enc[k].dtype == ref[k].dtype for k in ref)
    assert torch.equal(_decode(scheme, ref, (24, 64)).dequantize(), ref_dense)


@pytest.mark.parametrize("args", [dict(strategy="tensor"), dict(strategy="channel"),
                                  dict(strategy="block", block_structure=[16, 32])], ids=["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float8_matches_compressed_tensors(args, dtype):
    args = dict(num_bits=8, type="float", symmetric=True, **args)
    w = torch.randn(40, 80, generator=torch.Generator().manual_seed(4)).to(dtype)   # block: partial edge blocks
    w[0, 0] = -0.0
    ref, ref_dense = _ct_reference(w, args, NaiveQuantizationCompressor)
    assert ref["weight"].dtype == torch.float8_e4m3fn
    scheme = spec_from_dict(_cfg(args, "float-quantized")).scheme_for("x", None)
    enc = scheme.quantize(w).encode()
    assert enc.keys() == ref.keys()
    assert torch.equal(enc["weight"].view(torch.uint8), ref["weight"].view(torch.uint8))
    assert torch.equal(enc["weight_scale"], ref["weight_scale"])
    qt = _decode(scheme, ref, (40, 80))
    assert torch.equal(qt.dequantize(), ref_dense)
    x = torch.randn(3, 80, dtype=dtype)
    assert torch.equal(scheme.linear(x, qt, None), F.linear(x, qt.dequantize(dtype)))


def test_static_input_scales_are_kept_for_saving():
    args = dict(num_bits=8, symmetric=True, strategy="channel")
    w = torch.randn(8, 32)
    ref, _ = _ct_reference(w, args, NaiveQuantizationCompressor)
    ref["input_scale"] = torch.tensor([0.5])
    qt = _decode(spec_from_dict(_cfg(args, "int-quantized")).scheme_for("x", None), ref)
    assert torch.equal(qt.encode()["input_scale"], ref["input_scale"])


# --- forward ------------------------------------------------------------------------------------
def test_forward_equals_linear_on_dequantized(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir, "ct_pack_b4_group32_asym")
    scheme = spec_from_dict(cfg).scheme_for("layer", None)
    qt = _decode(scheme, sd)
    x, b = torch.randn(2, 5, 256, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(scheme.linear(x, qt, b), F.linear(x, qt.dequantize(torch.bfloat16), b))


# --- config_groups, targets, ignore ---------------------------------------------------------------
def test_targets_precedence_and_ignore():
    cfg = {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
           "ignore": ["lm_head", "re:.*gate_proj$"],
           "config_groups": {
               "by_class": {"targets": ["Linear"], "format": "pack-quantized",
                            "weights": {"num_bits": 4, "symmetric": True, "group_size": 128, "strategy": "group"}},
               "by_regex": {"targets": ["re:.*mlp\\..*"], "format": "pack-quantized",
                            "weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"}},
               "by_name": {"targets": ["model.layers.0.mlp.down_proj"], "format": "float-quantized",
                           "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}},
               "acts_only": {"targets": ["Embedding"], "weights": None}}}
    spec = spec_from_dict(cfg)
    lin = torch.nn.Linear(256, 64)
    assert spec.scheme_for("model.layers.0.self_attn.q_proj", lin).args.num_bits == 4
    assert spec.scheme_for("model.layers.0.mlp.up_proj", lin).args.strategy == "channel"
    assert isinstance(spec.scheme_for("model.layers.0.mlp.down_proj", None), CTNaiveScheme)
    assert spec.scheme_for("model.layers.0.mlp.gate_proj", lin) is None
    assert spec.scheme_for("lm_head", lin) is None
    assert spec.scheme_for("model.embed_tokens", torch.nn.Embedding(10, 4)) is None
    assert spec.to_dict()["ignore"] == ["lm_head", "re:.*gate_proj$"]


def test_dense_format_and_uncompressed_status_load_as_dense():
    w = {"num_bits": 4, "symmetric": True, "group_size": 128, "strategy": "group"}
    assert spec_from_dict(_cfg(w, "dense")).scheme_for("x", None) is None
    frozen = dict(_cfg(w), quantization_status="frozen")
    assert spec_from_dict(frozen).scheme_for("x", None) is None


# --- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def b4_asym(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir, "ct_pack_b4_group32_asym")
    return spec_from_dict(cfg).scheme_for("layer", None), sd


def test_packed_width_must_match_bits(b4_asym):
    scheme, sd = b4_asym
    with pytest.raises(ShapeMismatchError, match=r"31 words per line, expected 32 for 256 4-bit") as e:
        _decode(scheme, dict(sd, weight_packed=sd["weight_packed"][:, :31]))
    assert e.value.key == "layer.weight_packed" and e.value.file == "f.safetensors"


def test_scale_shape_must_match_group_size(b4_asym):
    scheme, sd = b4_asym
    with pytest.raises(ShapeMismatchError, match=r"shape \[96, 4\], expected \[96, 8\]") as e:
        _decode(scheme, dict(sd, weight_scale=sd["weight_scale"][:, :4]))
    assert e.value.key == "layer.weight_scale"


def test_zero_point_shape_and_presence(b4_asym):
    scheme, sd = b4_asym
    with pytest.raises(ShapeMismatchError, match=r"expected \[12, 8\]"):
        _decode(scheme, dict(sd, weight_zero_point=sd["weight_zero_point"][:11]))
    with pytest.raises(MissingTensorError, match="weight_zero_point"):
        _decode(scheme, {k: v for k, v in sd.items() if k != "weight_zero_point"})


def test_model_shape_must_match_weight_shape(b4_asym):
    scheme, sd = b4_asym
    with pytest.raises(ShapeMismatchError, match=r"holds \[96, 256\], but the model expects \[96, 512\]") as e:
        _decode(scheme, sd, (96, 512))
    assert e.value.key == "layer.weight_shape"


def test_config_contradicting_the_tensors(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir, "ct_pack_b4_group32_asym")
    sym = json.loads(json.dumps(cfg))
    sym["config_groups"]["group_0"]["weights"]["symmetric"] = True
    sym_scheme = spec_from_dict(sym).scheme_for("layer", None)
    with pytest.raises(ConfigError, match="symmetric weights, but the checkpoint stores a non-zero") as e:
        _decode(sym_scheme, sd)
    assert e.value.key == "layer.weight_zero_point"
    # older compressed-tensors saved all-zero zero-points for symmetric schemes: accepted, kept, ignored
    zero = pack_to_int32(torch.zeros(96, 8, dtype=torch.int8), 4, packed_dim=0)
    qt = _decode(sym_scheme, dict(sd, weight_zero_point=zero))
    assert torch.equal(qt.encode()["weight_zero_point"], zero)
    without = _decode(sym_scheme, {k: v for k, v in sd.items() if k != "weight_zero_point"})
    assert torch.equal(qt.dequantize(), without.dequantize())
    as_int = json.loads(json.dumps(cfg))
    as_int["format"] = "int-quantized"
    with pytest.raises(ConfigError, match="stores 'weight_packed'"):
        spec_from_dict(as_int).scheme_for("layer", None).present(set(sd))
    with pytest.raises(ConfigError, match="format 'pack-quantized', but this module stores 'weight'"):
        spec_from_dict(cfg).scheme_for("layer", None).present({"weight", "weight_scale"})
    b8 = json.loads(json.dumps(cfg))
    b8["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    with pytest.raises(ShapeMismatchError, match="expected 64 for 256 8-bit values"):
        _decode(spec_from_dict(b8).scheme_for("layer", None), sd)


@pytest.mark.parametrize("patch,err,frag", [
    ({"format": "nvfp4-pack-quantized"}, UnsupportedError, "nvfp4-pack-quantized"),
    ({"weights": {"num_bits": 4, "type": "float"}}, UnsupportedError, "num_bits=4"),
    ({"weights": {"num_bits": 16, "type": "int"}}, UnsupportedError, "num_bits=16"),
    ({"weights": {"num_bits": 4, "strategy": "group"}}, ConfigError, "needs a positive group_size"),
    ({"weights": {"num_bits": 4, "strategy": "token", "dynamic": True}}, UnsupportedError, "strategy 'token'"),
    ({"transform_config": {"config_groups": {"u": {}}}}, UnsupportedError, "transform_config"),
])
def test_unsupported_and_invalid_configs(patch, err, frag):
    cfg = _cfg({"num_bits": 4, "symmetric": True, "group_size": 128, "strategy": "group"})
    if "weights" in patch:
        cfg["config_groups"]["g"]["weights"] = patch["weights"]
    else:
        cfg.update(patch)
    with pytest.raises(err, match=frag):
        spec_from_dict(cfg)


def test_quantize_needs_whole_groups():
    scheme = spec_from_dict(_cfg({"num_bits": 4, "group_size": 128, "strategy": "group"})).scheme_for("x", None)
    with pytest.raises(ShapeMismatchError, match="200 input columns, not a multiple of group_size 128"):
        scheme.quantize(torch.randn(8, 200))
