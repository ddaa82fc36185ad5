"""GPTQ: the AutoGPTQ fixtures, and 3-bit / gptq_v2 / desc_act layouts made with a packer written here from
AutoGPTQ's QuantLinear.pack (docs/formats.md §3.2), itself checked against the fixtures' bytes."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantload.errors import ConfigError, QuantStateError, ShapeMismatchError, UnsupportedError
from quantload.schemes.gptq import GPTQScheme, normalize_gptq_config
from quantload.schemes.intpack import unpack_stream
from quantload.schemes.registry import spec_from_dict

FIXTURES = ["gptq_v1_b4_g128_sym", "gptq_v1_b4_g128_asym", "gptq_v1_b8_g-1_sym",
            "gptq_v1_b2_g64_asym_descact_ZERO0_OVERFLOW"]


def _fixture(fixtures_dir, name):
    cfg = json.loads((fixtures_dir / f"{name}.json").read_text())["quantize_config"]
    sd = {k.removeprefix("layer."): v for k, v in load_file(fixtures_dir / f"{name}.safetensors").items()}
    return cfg, sd, load_file(fixtures_dir / f"{name}.expected.safetensors")


def _pieces(sd):
    return {k: v for k, v in sd.items() if k in ("qweight", "qzeros", "scales", "g_idx")}


def _decode(scheme, pieces, shape=None):
    return scheme.decode(pieces, shape=shape, file="m.safetensors", prefix="model.layers.0.mlp.up_proj")


# --- an AutoGPTQ-style packer (QuantLinear.pack's loops, numpy uint32) ----------------------------
def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """Pack [I, O] codes down the input dim, 32 inputs at a time, exactly as AutoGPTQ's pack loop."""
    iw = intweight.astype(np.uint32)
    out = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:                                   # 3 bits: 32 values in 3 words, two straddling
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i))
            i += 10
            out[row] |= iw[i] << 30
            row += 1
            out[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= iw[i] << 31
            row += 1
            out[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return out


def autogptq_pack(q, z, scales, g_idx, bits, v1=True):
    """q [I, O] and z [ng, O] true values -> qweight, qzeros (v1 stores z - 1) as int32 tensors."""
    qweight = autogptq_pack_rows(q.numpy(), bits)
    zs = (z.numpy() - (1 if v1 else 0)).astype(np.int64) & 0xFFFFFFFF
    qzeros = autogptq_pack_rows(zs.T, bits).T                   # same scheme along the output dim
    as_i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.int32))  # noqa: E731
    return {"qweight": as_i32(qweight), "qzeros": as_i32(qzeros), "scales": scales, "g_idx": g_idx}


def reference_weight(q, z, scales, g_idx):
    """docs/formats.md §3.4 in one line, computed in the scales' dtype like AutoGPTQ's torch path."""
    g = g_idx.long()
    return (scales[g] * (q - z[g]).to(scales.dtype)).t()


# --- fixtures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_matches_autogptq_forward(fixtures_dir, name):
    """The expected tensor is AutoGPTQ's forward on an identity input minus the bias, all in float16:
    adding and removing the fp16 bias to our dequantized weight reproduces it bit for bit."""
    cfg, sd, exp = _fixture(fixtures_dir, name)
    scheme = spec_from_dict(cfg).scheme_for("model.layers.0.mlp.up_proj", None)
    for shape in (None, (96, 256)):
        qt = _decode(scheme, _pieces(sd), shape)
        w = qt.dequantize()
        b = sd["bias"][:, None]
        assert w.dtype == torch.float16 and w.shape == (96, 256)
        assert torch.equal((w + b) - b, exp["layer.weight.dequantized"])
    enc = qt.encode()
    assert enc.keys() == _pieces(sd).keys()
    assert all(torch.equal(enc[k], sd[k]) and enc[k].dtype == sd[k].dtype for k in enc)
    assert scheme.nbytes_for((96, 256), torch.float16) == qt.nbytes


def test_v1_zero_point_overflow_decodes_like_autogptq_and_warns(fixtures_dir):
    cfg, sd, exp = _fixture(fixtures_dir, "gptq_v1_b2_g64_asym_descact_ZERO0_OVERFLOW")
    qt = _decode(spec_from_dict(cfg).scheme_for("x", None), _pieces(sd))
    (warning,) = qt.meta["warnings"]
    assert "model.layers.0.mlp.up_proj" in warning and "13 field(s) equal to 3" in warning
    # AutoGPTQ reads an overflowed field as 3 + 1 = 4; the masked (z + 1) & 3 reading would give 0
    q = unpack_stream(sd["qweight"], 2, 256, dim=0)
    z = unpack_stream(sd["qzeros"], 2, 96, dim=1)
    masked = reference_weight(q, (z + 1) & 3, sd["scales"], sd["g_idx"])
    b = sd["bias"][:, None]
    assert not torch.equal((masked + b) - b, exp["layer.weight.dequantized"])
    assert torch.equal(qt.dequantize(), reference_weight(q, z + 1, sd["scales"], sd["g_idx"]))
    clean = _decode(spec_from_dict(_fixture(fixtures_dir, "gptq_v1_b4_g128_asym")[0]).scheme_for("x", None),
                    _pieces(_fixture(fixtures_dir, "gptq_v1_b4_g128_asym")[1]))
    assert clean.meta["warnings"] == []


@pytest.mark.parametrize("name,bits", [("gptq_v1_b4_g128_sym", 4), ("gptq_v1_b4_g128_asym", 4),
                                       ("gptq_v1_b8_g-1_sym", 8), ("gptq_v1_b2_g64_asym_descact_ZERO0_OVERFLOW", 2)])
def test_test_packer_reproduces_the_fixture_bytes(fixtures_dir, name, bits):
    """Cross-check of the packer below against AutoGPTQ's own output (qweight; qzeros where no overflow)."""
    _, sd, _ = _fixture(fixtures_dir, name)
    q = unpack_stream(sd["qweight"], bits, 256, dim=0)
    z = unpack_stream(sd["qzeros"], bits, 96, dim=1) + 1
    packed = autogptq_pack(q, z, sd["scales"], sd["g_idx"], bits)
    assert torch.equal(packed["qweight"], sd["qweight"])
    if "OVERFLOW" not in name:
        assert torch.equal(packed["qzeros"], sd["qzeros"])


# --- layouts the fixtures do not cover ------------------------------------------------------------
def _random_layer(bits, n_in, n_out, gs, seed, desc_act=False, sym=False):
    g = torch.Generator().manual_seed(seed)
    ng = -(-n_in // gs)
    q = torch.randint(0, 1 << bits, (n_in, n_out), generator=g)
    z = torch.full((ng, n_out), 1 << (bits - 1)) if sym else torch.randint(1, 1 << bits, (ng, n_out), generator=g)
    scales = (torch.rand(ng, n_out, generator=g) * 0.01 + 0.001).to(torch.float16)
    g_idx = torch.arange(n_in, dtype=torch.int32) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(n_in, generator=g)]
    return q, z, scales, g_idx


@pytest.mark.parametrize("bits,gs,desc_act,v1", [(3, 32, False, True), (3, 64, True, True), (3, -1, False, False),
                                                  (2, 32, True, False), (4, 64, True, False), (8, 128, False, False)])
def test_packed_layers_decode(bits, gs, desc_act, v1):
    n_in, n_out = 128, 64
    q, z, scales, g_idx = _random_layer(bits, n_in, n_out, n_in if gs == -1 else gs, bits, desc_act)
    pieces = autogptq_pack(q, z, scales, g_idx, bits, v1=v1)
    scheme = GPTQScheme(bits, gs, sym=False, checkpoint_format="gptq" if v1 else "gptq_v2", desc_act=desc_act)
    qt = _decode(scheme, pieces)
    assert qt.shape == (n_out, n_in) and qt.meta["warnings"] == []
    assert torch.equal(qt.dequantize(), reference_weight(q, z, scales, g_idx))
    x = torch.randn(3, n_in, dtype=torch.float16)
    b = torch.randn(n_out, dtype=torch.float16)
    assert torch.equal(scheme.linear(x, qt, b), F.linear(x, qt.dequantize(torch.float16), b))


def test_three_bit_sym_v1_zeros_are_the_reference_words():
    """docs/formats.md §3.3: v1 symmetric 3-bit qzeros words are 0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D."""
    q, z, scales, g_idx = _random_layer(3, 64, 32, 32, 0, sym=True)
    pieces = autogptq_pack(q, z, scales, g_idx, 3)
    assert [w & 0xFFFFFFFF for w in pieces["qzeros"][0].tolist()] == [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]
    qt = _decode(GPTQScheme(3, 32, sym=True), pieces)
    assert torch.equal(qt.dequantize(), reference_weight(q, z, scales, g_idx))


def test_v2_is_v1_plus_one_per_field(fixtures_dir):
    """GPTQModel's v1 -> v2 conversion adds 0x11111111 to every 4-bit qzeros word; both decode alike."""
    cfg, sd, _ = _fixture(fixtures_dir, "gptq_v1_b4_g128_asym")
    v1 = _decode(spec_from_dict(cfg).scheme_for("x", None), _pieces(sd))
    words = (sd["qzeros"].to(torch.int64) & 0xFFFFFFFF) + 0x11111111
    v2_zeros = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    v2 = _decode(spec_from_dict(dict(cfg, checkpoint_format="gptq_v2")).scheme_for("x", None),
                 dict(_pieces(sd), qzeros=v2_zeros))
    assert torch.equal(v1.dequantize(), v2.dequantize())


def test_missing_g_idx_means_contiguous_groups():
    q, z, scales, g_idx = _random_layer(4, 128, 32, 32, 5)
    pieces = autogptq_pack(q, z, scales, g_idx, 4)
    del pieces["g_idx"]
    qt = _decode(GPTQScheme(4, 32, sym=False), pieces)
    assert "g_idx" not in qt.encode()
    assert torch.equal(qt.dequantize(), reference_weight(q, z, scales, g_idx))


# --- configs ------------------------------------------------------------------------------------
def test_quantize_config_json_spellings_and_to_dict():
    d = normalize_gptq_config({"w_bit": 4, "q_group_size": 64, "desc_act": True})
    got = (d["bits"], d["group_size"], d["quant_method"], d["checkpoint_format"], d["sym"])
    assert got == (4, 64, "gptq", "gptq", True)
    spec = spec_from_dict({"quant_method": "gptq", "bits": 3, "group_size": 32, "format": "gptq_v2", "sym": False})
    s = spec.scheme_for("model.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
    assert (s.bits, s.group_size, s.checkpoint_format, s.sym) == (3, 32, "gptq_v2", False)
    assert spec.to_dict()["checkpoint_format"] == "gptq_v2"
    assert spec.scheme_for("lm_head", None) is None


def test_dynamic_overrides():
    spec = spec_from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True, "dynamic": {
        "-:.*\\.down_proj": {}, "+:.*\\.up_proj": {"bits": 8, "group_size": 32}}})
    assert spec.scheme_for("model.layers.0.mlp.down_proj", None) is None
    up = spec.scheme_for("model.layers.0.mlp.up_proj", None)
    assert (up.bits, up.group_size) == (8, 32)
    assert spec.scheme_for("model.layers.0.mlp.gate_proj", None).bits == 4
    assert spec.scheme_for("lm_head", None) is not None
    assert spec.scheme_for("model.embed_tokens", torch.nn.Embedding(4, 4)) is None


@pytest.mark.parametrize("cfg,err,frag", [
    ({"quant_method": "gptq", "bits": 5}, UnsupportedError, "bits=5"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, UnsupportedError, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, UnsupportedError, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_p"}, UnsupportedError, "'gptq_p'"),
    ({"quant_method": "gptq", "group_size": 128}, ConfigError, "no 'bits'"),
])
def test_bad_configs(cfg, err, frag):
    with pytest.raises(err, match=frag):
        spec_from_dict(cfg)


# --- bad tensors --------------------------------------------------------------------------------
@pytest.fixture
def b4(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir, "gptq_v1_b4_g128_asym")
    return spec_from_dict(cfg).scheme_for("x", None), _pieces(sd)


def test_g_idx_outside_the_groups(b4):
    scheme, p = b4
    bad = p["g_idx"].clone()
    bad[7] = 2
    with pytest.raises(QuantStateError, match=r"span \[0, 2\], expected values in \[0, 1\]") as e:
        _decode(scheme, dict(p, g_idx=bad))
    assert (e.value.key, e.value.file) == ("model.layers.0.mlp.up_proj.g_idx", "m.safetensors")


def test_scales_disagreeing_with_group_size(b4):
    scheme, p = b4
    with pytest.raises(ShapeMismatchError, match=r"shape \[1, 96\], expected \[2, 96\]") as e:
        _decode(scheme, dict(p, scales=p["scales"][:1]))
    assert e.value.key == "model.layers.0.mlp.up_proj.scales"
    with pytest.raises(ShapeMismatchError, match=r"shape \[2, 11\], expected \[2, 12\]") as e:
        _decode(scheme, dict(p, qzeros=p["qzeros"][:, :11]))
    assert e.value.key == "model.layers.0.mlp.up_proj.qzeros"


def test_qweight_size_must_match_bits_and_shape(b4):
    scheme, p = b4
    with pytest.raises(ShapeMismatchError, match=r"shape \[32, 96\], expected \[64, 96\]") as e:
        _decode(scheme, p, (96, 512))
    assert e.value.key == "model.layers.0.mlp.up_proj.qweight"
    b8 = GPTQScheme(8, 128, sym=False)
    with pytest.raises(ShapeMismatchError, match=r"expected \[64, 96\]"):
        _decode(b8, p)                 # 256 inputs (from g_idx) at 8 bits need 64 rows
    with pytest.raises(ShapeMismatchError, match="dtype float16, expected int32"):
        _decode(scheme, dict(p, qweight=p["qweight"].to(torch.float16)))
    with pytest.raises(UnsupportedError, match="bits=6"):
        GPTQScheme(6)


def test_format_the_tensors_contradict(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir, "gptq_v1_b4_g128_sym")
    v2 = spec_from_dict(dict(cfg, checkpoint_format="gptq_v2")).scheme_for("x", None)
    with pytest.raises(ConfigError, match=r"every stored zero-point field is 7, which is the gptq \(v1\) layout") as e:
        _decode(v2, _pieces(sd))
    assert e.value.key == "model.layers.0.mlp.up_proj.qzeros"


def test_runtime_quantization_to_gptq_is_refused():
    with pytest.raises(UnsupportedError, match="GPTQ needs calibration data"):
        GPTQScheme(4, 128).quantize(torch.randn(8, 128))
