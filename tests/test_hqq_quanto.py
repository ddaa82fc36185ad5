"""HQQ and optimum-quanto: the golden fixtures, and other layouts made by hqq 0.2.8 and optimum-quanto 0.2.7
on CPU, each compared with the tool's own dequantized weight."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantload.errors import ConfigError, QuantStateError, ShapeMismatchError, UnsupportedError
from quantload.schemes.hqq import HQQScheme
from quantload.schemes.quanto import QuantoScheme
from quantload.schemes.registry import spec_from_dict


def _load(fixtures_dir, name):
    sd = {k.removeprefix("layer."): v for k, v in load_file(fixtures_dir / f"{name}.safetensors").items()}
    return sd, load_file(fixtures_dir / f"{name}.expected.safetensors")["layer.weight.dequantized"]


def _same(a, b):
    """Same dtype, shape and bytes (W_q viewed as float may hold NaN patterns, which torch.equal rejects)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _decode(scheme, sd, shape=None, hints=()):
    keys = (*scheme.required_keys(), *scheme.optional_keys(), *hints)
    return scheme.decode({k: v for k, v in sd.items() if k in keys}, shape=shape, file="h.safetensors",
                         prefix="model.layers.2.mlp.gate_proj")


# --- HQQ ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hqq_b4_g64_axis1", "hqq_b2_g64_axis0"])
def test_hqq_fixture_exact_and_encodes_back(fixtures_dir, name):
    sd, exp = _load(fixtures_dir, name)
    scheme = spec_from_dict({"quant_method": "hqq"}).scheme_for("model.layers.2.mlp.gate_proj", None)
    assert scheme.present(set(sd))
    for shape in (None, (96, 256)):
        qt = _decode(scheme, sd, shape)
        assert qt.dtype == torch.float16 and torch.equal(qt.dequantize(), exp)
    enc = qt.encode()
    meta_keys = set(sd) - {"bias"}
    assert enc.keys() == meta_keys
    for k in meta_keys:
        assert _same(enc[k], sd[k]), k
    x = torch.randn(2, 256, dtype=torch.float16)
    assert torch.equal(scheme.linear(x, qt, sd["bias"]), F.linear(x, exp, sd["bias"]))


@pytest.fixture(scope="module")
def hqq_linear():
    return pytest.importorskip("hqq.core.quantize")


@pytest.mark.parametrize("nbits,gs,axis,view_as_float", [(3, 64, 0, False), (3, 32, 1, False), (1, 32, 1, False),
                                                         (8, 64, 0, False), (4, 32, 0, True), (2, None, 1, False)])
def test_hqq_layouts_against_hqq(hqq_linear, nbits, gs, axis, view_as_float):
    torch.manual_seed(nbits)
    lin = torch.nn.Linear(128, 48, bias=False).half()
    cfg = hqq_linear.BaseQuantizeConfig(nbits=nbits, group_size=gs, axis=axis, view_as_float=view_as_float)
    h = hqq_linear.HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu")
    sd = {k: v for k, v in h.state_dict().items() if v is not None}
    qt = _decode(HQQScheme(), sd)
    assert qt.shape == (48, 128)
    assert torch.equal(qt.dequantize(), h.dequantize())
    enc = qt.encode()
    assert enc.keys() == sd.keys() and all(_same(enc[k], sd[k]) for k in enc)


def test_hqq_bad_input(fixtures_dir):
    sd, _ = _load(fixtures_dir, "hqq_b4_g64_axis1")
    s = HQQScheme()
    with pytest.raises(ShapeMismatchError, match=r"shape \[191, 64\], expected \[192, 64\]") as e:
        _decode(s, dict(sd, W_q=sd["W_q"][:191]))
    assert (e.value.key, e.value.file) == ("model.layers.2.mlp.gate_proj.W_q", "h.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"shape \[384, 2\], expected \[384, 1\]"):
        _decode(s, dict(sd, scale=sd["scale"].repeat(1, 2)))
    with pytest.raises(UnsupportedError, match="packing '5bit_u8'"):
        _decode(s, dict(sd, packing=torch.tensor([ord(c) for c in "5bit_u8"], dtype=torch.uint8)))
    with pytest.raises(QuantStateError, match="group_size 100 does not divide"):
        _decode(s, dict(sd, group_size=torch.tensor(100, dtype=torch.int32)))
    with pytest.raises(ShapeMismatchError, match=r"holds \[96, 256\], but the model expects \[256, 96\]"):
        _decode(s, sd, (256, 96))
    with pytest.raises(UnsupportedError, match="quant_scale=True"):
        _decode(s, dict(sd, quant_scale=torch.tensor(1, dtype=torch.uint8)))


# --- optimum-quanto -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,weights", [("quanto_qint4", "int4"), ("quanto_qint8", "int8")])
def test_quanto_fixture_exact_and_encodes_back(fixtures_dir, name, weights):
    sd, exp = _load(fixtures_dir, name)
    spec = spec_from_dict({"quant_method": "quanto", "weights": weights})
    scheme = spec.scheme_for("model.layers.2.mlp.gate_proj", None)
    assert scheme.present(set(sd))
    qt = _decode(scheme, sd, (96, 256))
    assert qt.dtype == torch.bfloat16 and torch.equal(qt.dequantize(), exp)
    # without the model, the bias sizes a grouped weight (QuantoScheme.shape_hint_keys)
    assert torch.equal(_decode(scheme, sd, None, hints=scheme.shape_hint_keys).dequantize(), exp)
    enc = qt.encode()
    assert enc.keys() == set(sd) - {"bias"}
    assert all(_same(enc[k], sd[k]) for k in enc)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(scheme.linear(x, qt, sd["bias"]), F.linear(x, exp, sd["bias"]))
    assert spec.to_dict()["quant_method"] == "quanto"


@pytest.fixture(scope="module")
def quanto():
    return pytest.importorskip("optimum.quanto")


@pytest.mark.parametrize("qtype,dtype,n_in", [("qint4", torch.float16, 256), ("qint4", torch.float32, 160),
                                              ("qint2", torch.bfloat16, 384), ("qint2", torch.float16, 96),
                                              ("qint4", torch.bfloat16, 100), ("qint8", torch.float16, 64),
                                              ("qfloat8", torch.bfloat16, 64)])
def test_quanto_layouts_against_quanto(quanto, qtype, dtype, n_in):
    torch.manual_seed(n_in)
    m = torch.nn.Sequential(torch.nn.Linear(n_in, 40).to(dtype))
    quanto.quantize(m, weights=getattr(quanto, qtype))
    quanto.freeze(m)
    sd = {k.removeprefix("0."): v for k, v in m.state_dict().items()}
    scheme = spec_from_dict({"quant_method": "quanto", "weights": qtype}).scheme_for("x", None)
    qt = _decode(scheme, sd, (40, n_in))
    assert torch.equal(qt.dequantize(), m[0].weight.dequantize())
    assert torch.equal(_decode(scheme, sd, None, hints=("bias",)).dequantize(), m[0].weight.dequantize())


def test_quanto_integer_zero_point_shift():
    """A uint8 shift (zero-point mode) gives W = scale * (q - shift)."""
    codes = torch.randint(0, 16, (6, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = codes[:3] | (codes[3:] << 4)
    scale = torch.rand(6, 1, dtype=torch.float16) + 0.1
    shift = torch.full((6, 1), 8, dtype=torch.uint8)
    qt = _decode(QuantoScheme("qint4"), {"weight._data._data": packed, "weight._scale": scale, "weight._shift": shift},
                 (6, 32))
    assert torch.equal(qt.dequantize(), scale * (codes.to(torch.int8) - 8).to(torch.float16))


def test_quanto_bad_input(fixtures_dir):
    sd, _ = _load(fixtures_dir, "quanto_qint4")
    s = QuantoScheme("qint4")
    with pytest.raises(ShapeMismatchError, match="192 groups of 128; optimum-quanto does not store") as e:
        _decode(s, sd)
    assert e.value.key == "model.layers.2.mlp.gate_proj.weight._data._data"
    with pytest.raises(ShapeMismatchError, match=r"do not make a \[96, 200\] weight"):
        _decode(s, sd, (96, 200))
    with pytest.raises(ShapeMismatchError, match=r"shape \[95, 128\], expected \[96, 128\]"):
        _decode(s, dict(sd, **{"weight._data._data": sd["weight._data._data"][:95]}), (96, 256))
    with pytest.raises(ConfigError, match="config says qint8 weights, but the module stores packed"):
        QuantoScheme("int8").present(set(sd))
    sd8, _ = _load(fixtures_dir, "quanto_qint8")
    with pytest.raises(ConfigError, match="config says qint4 weights, but the module stores an unpacked"):
        s.present(set(sd8))
    with pytest.raises(ShapeMismatchError, match="dtype int8, expected float8_e4m3fn"):
        _decode(QuantoScheme("float8"), sd8)


@pytest.mark.parametrize("cfg,frag", [({"weights": "int3"}, "'int3'"), ({"weights": "int8", "activations": "int8"},
                                                                          "activation quantization")])
def test_quanto_unsupported_configs(cfg, frag):
    with pytest.raises(UnsupportedError, match=frag):
        spec_from_dict({"quant_method": "quanto", **cfg})


def test_quanto_qmap_overrides_per_module():
    spec = spec_from_dict({"quant_method": "quanto", "weights": "int8",
                           "quanto_qmap": {"model.layers.0.mlp.up_proj": {"weights": "qint4", "activations": "none"}}})
    assert spec.scheme_for("model.layers.0.mlp.up_proj", None).qtype == "qint4"
    assert spec.scheme_for("model.layers.0.mlp.down_proj", None).qtype == "qint8"
    assert spec.scheme_for("lm_head", None) is None
    assert "quanto_qmap" not in spec.to_dict()


def test_runtime_quantization_to_hqq_or_quanto_is_refused():
    with pytest.raises(UnsupportedError, match="quantize='int4'"):
        HQQScheme().quantize(torch.randn(8, 64))
    with pytest.raises(UnsupportedError, match="optimum-quanto layers are read"):
        QuantoScheme("int4").quantize(torch.randn(8, 64))
