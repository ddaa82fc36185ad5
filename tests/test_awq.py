"""AWQ: the AutoAWQ GEMM fixture, and GEMV / zero_point=False layouts made with packers written here from
AutoAWQ's WQLinear_GEMM/GEMV.from_linear loops (docs/formats.md §4), cross-checked against the fixture's bytes."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantload.errors import MissingTensorError, ShapeMismatchError, UnsupportedError
from quantload.schemes.awq import AWQScheme, calculate_zeros_width, unpack_awq_gemm
from quantload.schemes.registry import spec_from_dict

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _fixture(fixtures_dir):
    name = "awq_gemm_b4_g128"
    cfg = json.loads((fixtures_dir / f"{name}.json").read_text())["quantization_config"]
    sd = {k.removeprefix("layer."): v for k, v in load_file(fixtures_dir / f"{name}.safetensors").items()}
    return cfg, sd, load_file(fixtures_dir / f"{name}.expected.safetensors")["layer.weight.dequantized"]


def _decode(scheme, sd, shape=None):
    keys = (*scheme.required_keys(), *scheme.optional_keys())
    return scheme.decode({k: v for k, v in sd.items() if k in keys}, shape=shape, file="a.safetensors",
                         prefix="model.layers.1.self_attn.o_proj")


def _i32(a):
    return torch.from_numpy(np.ascontiguousarray(a.astype(np.uint32)).view(np.int32))


def pack_gemm(cols: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM: [R, C] codes -> [R, C/8]; nibble i of word c holds column 8c + ORDER[i]."""
    out = np.zeros((cols.shape[0], cols.shape[1] // 8), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= cols[:, c * 8 + ORDER[i]].astype(np.uint32) << (i * 4)
    return out


def pack_gemv(cols: np.ndarray, width: int) -> np.ndarray:
    """AutoAWQ GEMV: [R, C] codes -> [R, width], sequential nibbles, zero words past the data."""
    out = np.zeros((cols.shape[0], width), dtype=np.uint32)
    for c in range(-(-cols.shape[1] // 8)):
        for i in range(8):
            if c * 8 + i < cols.shape[1]:
                out[:, c] |= cols[:, c * 8 + i].astype(np.uint32) << (i * 4)
    return out


def _random(n_in, n_out, gs, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 16, (n_in // gs, n_out), generator=g)
    s = (torch.rand(n_in // gs, n_out, generator=g) * 0.01 + 1e-3).to(torch.float16)
    return q, z, s


def _reference(q, z, s, gs):
    """[I, O] codes, [ng, O] zeros and scales -> nn.Linear weight [O, I] in float16."""
    return ((q - z.repeat_interleave(gs, 0)).to(s.dtype) * s.repeat_interleave(gs, 0)).t()


# --- fixture ------------------------------------------------------------------------------------
def test_fixture_decodes_exactly_and_encodes_back(fixtures_dir):
    cfg, sd, exp = _fixture(fixtures_dir)
    scheme = spec_from_dict(cfg).scheme_for("model.layers.1.self_attn.o_proj", None)
    for shape in (None, (96, 256)):
        qt = _decode(scheme, sd, shape)
        w = qt.dequantize()
        assert w.dtype == torch.float16 and torch.equal(w, exp)
    enc = qt.encode()
    assert enc.keys() == {"qweight", "qzeros", "scales"}
    assert all(torch.equal(enc[k], sd[k]) for k in enc)
    assert scheme.nbytes_for((96, 256), torch.float16) == qt.nbytes
    x, b = torch.randn(4, 256, dtype=torch.float16), sd["bias"]
    assert torch.equal(scheme.linear(x, qt, b), F.linear(x, exp, b))


def test_worked_example_word():
    """docs/formats.md §4.1: columns 0..7 = [8,0,5,2,7,1,4,13] pack to 0xd1204758."""
    word = torch.tensor([[0xD1204758 - (1 << 32)]], dtype=torch.int32)
    assert unpack_awq_gemm(word, 8).tolist() == [[8, 0, 5, 2, 7, 1, 4, 13]]


def test_test_packer_reproduces_the_fixture_bytes(fixtures_dir):
    _, sd, _ = _fixture(fixtures_dir)
    for k in ("qweight", "qzeros"):
        codes = unpack_awq_gemm(sd[k], 96).numpy()
        assert torch.equal(_i32(pack_gemm(codes)), sd[k])


# --- GEMV and zero_point=False ---------------------------------------------------------------------
@pytest.mark.parametrize("n_in,gs", [(256, 128), (256, 64), (128, 32), (192, -1)])
def test_gemv_layout(n_in, gs):
    n_out = 48
    g = n_in if gs == -1 else gs
    q, z, s = _random(n_in, n_out, g, n_in + g)
    width = calculate_zeros_width(n_in, g)
    ng = n_in // g
    scales = torch.zeros(n_out, width * 8, dtype=torch.float16)
    scales[:, :ng] = s.t()
    sd = {"qweight": _i32(pack_gemv(q.t().numpy(), n_in // 8)), "qzeros": _i32(pack_gemv(z.t().numpy(), width)),
          "scales": scales}
    scheme = spec_from_dict({"quant_method": "awq", "version": "GEMV", "bits": 4, "group_size": gs,
                             "zero_point": True}).scheme_for("x", None)
    qt = _decode(scheme, sd)
    assert qt.shape == (n_out, n_in)
    assert torch.equal(qt.dequantize(), _reference(q, z, s, g))
    gemm = AWQScheme(gs, version="gemm")
    same = _decode(gemm, {"qweight": _i32(pack_gemm(q.numpy())), "qzeros": _i32(pack_gemm(z.numpy())), "scales": s})
    assert torch.equal(same.dequantize(), qt.dequantize())


def test_zero_point_off_uses_the_implicit_midpoint():
    q, _, s = _random(128, 32, 64, 9)
    scheme = spec_from_dict({"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64,
                             "zero_point": False}).scheme_for("x", None)
    assert scheme.required_keys() == ("qweight", "scales")
    qt = _decode(scheme, {"qweight": _i32(pack_gemm(q.numpy())), "scales": s})
    assert torch.equal(qt.dequantize(), _reference(q, torch.full((2, 32), 8), s, 64))
    assert qt.encode().keys() == {"qweight", "scales"}


def test_exllama_and_ipex_versions_read_the_gemm_layout(fixtures_dir):
    cfg, sd, exp = _fixture(fixtures_dir)
    for v in ("exllama", "IPEX"):
        assert torch.equal(_decode(spec_from_dict(dict(cfg, version=v)).scheme_for("x", None), sd).dequantize(), exp)


# --- bad input ----------------------------------------------------------------------------------
def test_scales_and_zeros_shapes(fixtures_dir):
    cfg, sd, _ = _fixture(fixtures_dir)
    scheme = spec_from_dict(cfg).scheme_for("x", None)
    with pytest.raises(ShapeMismatchError, match=r"shape \[1, 96\], expected \[2, 96\]") as e:
        _decode(scheme, dict(sd, scales=sd["scales"][:1]))
    assert (e.value.key, e.value.file) == ("model.layers.1.self_attn.o_proj.scales", "a.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"shape \[2, 11\], expected \[2, 12\]"):
        _decode(scheme, dict(sd, qzeros=sd["qzeros"][:, :11]))
    with pytest.raises(MissingTensorError, match="qzeros"):
        _decode(scheme, {k: v for k, v in sd.items() if k != "qzeros"})


def test_a_gptq_layout_is_not_awq():
    scheme = AWQScheme(128)
    gptq_like = {"qweight": torch.zeros(32, 96, dtype=torch.int32), "qzeros": torch.zeros(2, 12, dtype=torch.int32),
                 "scales": torch.zeros(2, 96, dtype=torch.float16)}
    with pytest.raises(ShapeMismatchError, match=r"expected \[256, 12\].*GPTQ-style") as e:
        _decode(scheme, gptq_like, (96, 256))
    assert e.value.key == "model.layers.1.self_attn.o_proj.qweight"


@pytest.mark.parametrize("cfg,frag", [({"bits": 8}, "bits=8"), ({"version": "gemv_fast"}, "gemv_fast"),
                                      ({"version": "marlin"}, "marlin"), ({"backend": "llm-awq"}, "llm-awq")])
def test_unsupported_configs(cfg, frag):
    with pytest.raises(UnsupportedError, match=frag):
        spec_from_dict({"quant_method": "awq", "bits": 4, "group_size": 128, **cfg})
