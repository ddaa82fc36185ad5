"""GGUF block types as schemes: bit-exact against gguf-py 0.19 (dequantize and quantize), the QTensor
contract (row layout, embedding, linear, encode), and the errors for bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType as GT  # noqa: E402

from quantload.errors import MissingTensorError, ShapeMismatchError, UnsupportedError  # noqa: E402
from quantload.ggml_types import GGML_TYPES, GGML_TYPES_BY_NAME  # noqa: E402
from quantload.schemes.base import QTensor  # noqa: E402
from quantload.schemes.gguf import (GGUFScheme, dequantize_blocks, gguf_scheme,  # noqa: E402
                                    quantize_blocks, supported_types)
from quantload.schemes.gguf import grids  # noqa: E402
from quantload.schemes.gguf.samples import random_blocks  # noqa: E402

#: every type gguf-py 0.19 dequantizes (the issue's list, plus NVFP4 which gguf-py also decodes)
GGUF_PY_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                 "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"]
QUANTIZE_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tid(name: str) -> int:
    return GGML_TYPES_BY_NAME[name].id


def make(name: str, rows: int, blocks_per_row: int, seed: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] of random valid blocks."""
    return random_blocks(tid(name), rows * blocks_per_row, seed).reshape(rows, -1)


def gguf_py(name: str, raw: torch.Tensor) -> torch.Tensor:
    ref = gguf_quants.dequantize(raw.numpy(), GT[name])
    assert not np.isnan(ref).any() and np.isfinite(ref).all()
    return torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))


# --- dequantize == gguf-py -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_dequantize_matches_gguf_py(name, device):
    t = GGML_TYPES_BY_NAME[name]
    scheme = gguf_scheme(t.id)
    for seed, (rows, per_row) in enumerate([(1, 1), (3, 2), (7, 5)]):
        raw = make(name, rows, per_row, seed)
        shape = (rows, per_row * t.block_size)
        ref = gguf_py(name, raw).reshape(shape)
        qt = scheme.decode({"weight": raw.reshape(-1).to(device)}, shape=shape, file="m.gguf", prefix="w")
        got = qt.dequantize()
        assert got.dtype == torch.float32 and got.device.type == device
        assert torch.equal(got.cpu(), ref), f"{name} rows={rows}"


@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_chunked_dequantize_matches(name):
    """Many blocks, decoded in several chunks (and scale windows) with a ragged last one, into another
    dtype and 3-D."""
    t = GGML_TYPES_BY_NAME[name]
    raw = make(name, 6, 7, seed=11)
    ref = gguf_py(name, raw)
    got = dequantize_blocks(t.id, raw, chunk_elems=5 * t.block_size)
    assert torch.equal(got, ref)
    # one block per chunk: per-block scales come in windows of SCALE_WINDOW chunks, the last one ragged
    assert torch.equal(dequantize_blocks(t.id, raw, chunk_elems=t.block_size), ref)
    bf = dequantize_blocks(t.id, raw.view(2, 3, -1), torch.bfloat16, chunk_elems=4 * t.block_size)
    assert bf.shape == (2, 3, 7 * t.block_size)
    assert torch.equal(bf.reshape(ref.shape), ref.to(torch.bfloat16))


def test_grids_equal_gguf_py():
    cpu = torch.device("cpu")
    q = gguf_quants
    for name, cls in [("iq2xxs", q.IQ2_XXS), ("iq2xs", q.IQ2_XS), ("iq2s", q.IQ2_S), ("iq3xxs", q.IQ3_XXS),
                      ("iq3s", q.IQ3_S), ("iq1s", q.IQ1_S)]:
        cls.init_grid()
        assert torch.equal(grids.grid(name, cpu), torch.from_numpy(cls.grid.reshape(cls.grid_shape))), name
    assert bytes(grids.ksigns_iq2xs(i) for i in range(128)) == gguf_quants.IQ2_XXS.ksigns
    assert grids.KVALUES_IQ4NL == gguf_quants.IQ4_NL.kvalues
    assert grids.KVALUES_FP4 == gguf_quants.MXFP4.kvalues


def test_mxfp4_e8m0_denormal_and_extreme_exponents():
    raw = random_blocks(tid("MXFP4"), 6, seed=3)
    raw[:, 0] = torch.tensor([0, 1, 2, 127, 128, 200], dtype=torch.uint8)
    assert torch.equal(dequantize_blocks(tid("MXFP4"), raw), gguf_py("MXFP4", raw))


def test_fp4_scale_codes_all_256_values():
    from quantload.schemes.gguf.ternary_fp4 import e8m0_to_fp32_half, ue4m3_to_fp32_half
    codes = np.arange(256, dtype=np.uint8)
    want_e8m0 = gguf_quants.MXFP4.e8m0_to_fp32_half(codes).astype(np.float32)
    want_ue4m3 = gguf_quants.NVFP4.ue4m3_to_fp32(codes).astype(np.float32)
    t = torch.from_numpy(codes)
    assert torch.equal(e8m0_to_fp32_half(t), torch.from_numpy(want_e8m0))
    assert torch.equal(ue4m3_to_fp32_half(t), torch.from_numpy(want_ue4m3))


# --- types gguf-py cannot decode: against the numpy reference of docs/gguf.md 2.3 (checked there vs ggml C) --
def _f16(b):
    return b.copy().view(np.float16).astype(np.float32)


def ref_q8_k(b):
    return b[:, 0:4].copy().view(np.float32) * b[:, 4:260].view(np.int8)


def ref_q8_1(b):
    return _f16(b[:, 0:2]) * b[:, 4:36].view(np.int8)


def ref_q1_0(b):
    s = (b[:, 2:18, None] >> np.arange(8, dtype=np.uint8)) & 1
    d = _f16(b[:, 0:2])
    return np.where(s.reshape(-1, 128) == 1, d, -d)


def ref_q2_0(b):
    q = (b[:, 2:18, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3
    return _f16(b[:, 0:2]) * (q.reshape(-1, 64).astype(np.float32) - 1)


@pytest.mark.parametrize("name,ref", [("Q8_K", ref_q8_k), ("Q8_1", ref_q8_1), ("Q1_0", ref_q1_0),
                                      ("Q2_0", ref_q2_0)])
def test_types_gguf_py_lacks(name, ref):
    raw = random_blocks(tid(name), 13, seed=5)
    want = torch.from_numpy(ref(raw.numpy()).astype(np.float32))
    assert torch.equal(dequantize_blocks(tid(name), raw), want)


# --- quantize == gguf-py ---------------------------------------------------------------------------------
def quant_inputs() -> np.ndarray:
    """Rows of 256 float32: random at many scales, plus zeros, ties and sign/extreme cases."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((40, 256)) * np.exp2(rng.uniform(-12, 8, (40, 1)))).astype(np.float32)
    x[0] = 0                                                      # all-zero blocks (d = 0 path)
    x[1, :32] = 1.0                                               # constant block (max == min)
    x[1, 32:64] = -1.0
    x[2, :32] = np.tile([1.0, -1.0], 16)                          # |max| tie with opposite signs
    x[2, 32:64] = np.tile([-2.0, 2.0], 16)
    x[3, :32] = np.arange(32, dtype=np.float32) / 4 - 4           # x * id lands on .5 ties
    x[3, 32:64] = np.r_[127, np.arange(-15, 16) + 0.5]            # Q8_0: d = 1, x * id = k + .5 exactly
    x[4, :32] = np.float32(-0.0)
    x[4, 32:64] = 1e-30                                           # tiny blocks (fp16 d underflows)
    x[5, :64] = 60000.0 * rng.standard_normal(64)                 # fp16 overflow of d/min
    x[6, :32] = np.float32(1e-8) * rng.standard_normal(32)        # fp16 subnormal d
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")   # gguf-py on the fp16-overflow rows
@pytest.mark.parametrize("name", QUANTIZE_TYPES)
def test_quantize_matches_gguf_py(name):
    x = quant_inputs()
    if name in ("F16", "BF16"):                                  # non-finite values: rounding and NaN rules
        x[7, :4] = [np.inf, -np.inf, np.nan, -np.nan]
        x[7, 4:8] = [3.4e38, -3.4e38, 65520.0, 1.00048828125]
    ref = gguf_quants.quantize(x, GT[name])
    ref_bytes = torch.from_numpy(np.ascontiguousarray(ref).view(np.uint8).reshape(x.shape[0], -1))
    scheme = gguf_scheme(tid(name))
    qt = scheme.quantize(torch.from_numpy(x))
    assert qt.shape == x.shape and qt.dtype == torch.float32
    assert torch.equal(qt.data["blocks"], ref_bytes)
    assert torch.equal(scheme.encode(qt)["weight"], ref_bytes.reshape(-1))
    # chunking and input dtype: bf16 input quantizes like its float32 value
    xb = torch.from_numpy(x[8:20]).to(torch.bfloat16)
    want = gguf_quants.quantize(xb.float().numpy(), GT[name])
    got = quantize_blocks(tid(name), xb)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want).view(np.uint8).reshape(12, -1)))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantize_then_dequantize_round_trip(name):
    x = torch.from_numpy(quant_inputs()[8:16]).reshape(4, 2, 256)
    qt = gguf_scheme(tid(name)).quantize(x)
    want = gguf_py(name, qt.data["blocks"]).reshape(x.shape)
    assert torch.equal(qt.dequantize(), want)


# --- the QTensor contract ----------------------------------------------------------------------------------
def test_scheme_identity_and_sizes():
    s = gguf_scheme(tid("Q4_K"))
    assert isinstance(s, GGUFScheme) and s is gguf_scheme(tid("Q4_K"))
    assert (s.name, s.type_id, s.block_size, s.type_size) == ("gguf-q4_k", 12, 256, 144)
    assert s.required_keys() == ("weight",) and s.keys("blk.0.ffn_up") == ["blk.0.ffn_up.weight"]
    assert s.nbytes_for((3, 512), torch.float16) == 3 * 2 * 144
    assert gguf_scheme(tid("IQ2_XXS")).name == "gguf-iq2_xxs"
    assert {GGML_TYPES[i].name for i in supported_types()} >= set(GGUF_PY_TYPES) | {"Q8_K"}


def test_decode_meta_and_encode_round_trip():
    s = gguf_scheme(tid("Q6_K"))
    raw = make("Q6_K", 4, 2, seed=1)
    qt = s.decode({"weight": raw.reshape(-1)}, shape=(4, 512))
    assert isinstance(qt, QTensor) and qt.data["blocks"].shape == (4, 420) and qt.meta == {"ggml_type": 14}
    assert qt.nbytes == raw.numel() and qt.dtype == torch.float32
    assert torch.equal(s.encode(qt)["weight"], raw.reshape(-1))
    meta = s.decode({"weight": torch.empty(raw.numel(), dtype=torch.uint8, device="meta")}, shape=(4, 512))
    assert meta.is_meta and meta.data["blocks"].shape == (4, 420)
    typed = gguf_scheme(tid("F16")).decode({"weight": torch.tensor([[1.5, -2.0]], dtype=torch.float16)},
                                           shape=(1, 2))
    assert torch.equal(typed.dequantize(), torch.tensor([[1.5, -2.0]]))


def test_rows_are_whole_blocks():
    """Permuting or gathering rows of "blocks" permutes / gathers rows of the weight."""
    s = gguf_scheme(tid("IQ3_S"))
    raw = make("IQ3_S", 6, 2, seed=2)
    qt = s.decode({"weight": raw.reshape(-1)}, shape=(6, 512))
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    moved = QTensor(s, {"blocks": qt.data["blocks"][perm]}, qt.shape, qt.dtype, qt.meta)
    assert torch.equal(moved.dequantize(), qt.dequantize()[perm])


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "IQ2_XS", "BF16", "F32"])
def test_embedding_gathers_rows(name, monkeypatch):
    t = GGML_TYPES_BY_NAME[name]
    s = gguf_scheme(t.id)
    raw = make(name, 50, 2, seed=4)
    qt = s.decode({"weight": raw.reshape(-1)}, shape=(50, 2 * t.block_size))
    ids = torch.tensor([[3, 49, 3], [0, 7, 12]])
    seen = []
    import quantload.schemes.gguf.scheme as scheme_mod
    real = scheme_mod.dequantize_blocks
    monkeypatch.setattr(scheme_mod, "dequantize_blocks",
                        lambda type_id, blocks, dtype=torch.float32: seen.append(blocks.shape[0]) or
                        real(type_id, blocks, dtype))
    got = s.embedding(ids, qt, torch.float16)
    assert seen == [6]                                            # only the 6 looked-up rows were decoded
    assert got.shape == (2, 3, 2 * t.block_size) and got.dtype == torch.float16
    assert torch.equal(got, real(t.id, raw, torch.float32)[ids].to(torch.float16))


@pytest.mark.parametrize("name", ["Q5_K", "F16", "F32"])
def test_linear_dequantizes_per_forward(name):
    t = GGML_TYPES_BY_NAME[name]
    s = gguf_scheme(t.id)
    raw = make(name, 5, 1, seed=6) if t.block_size > 1 else make(name, 5, 256, seed=6)
    qt = s.decode({"weight": raw.reshape(-1)}, shape=(5, 256))
    x, bias = torch.randn(3, 256), torch.randn(5)
    w = qt.dequantize()
    assert torch.equal(s.linear(x, qt, bias), F.linear(x, w, bias))
    xh = x.half()
    assert torch.equal(s.linear(xh, qt, None), F.linear(xh, qt.dequantize(torch.float16)))


# --- bad input ------------------------------------------------------------------------------------------
def test_wrong_byte_count_names_file_and_key():
    s = gguf_scheme(tid("Q4_0"))
    raw = make("Q4_0", 2, 2, seed=0).reshape(-1)
    with pytest.raises(ShapeMismatchError, match=r"m\.gguf.*blk\.3\.attn_k\.weight.*needs 72 bytes.*found 71"):
        s.decode({"weight": raw[:-1]}, shape=(2, 64), file="m.gguf", prefix="blk.3.attn_k")
    with pytest.raises(ShapeMismatchError, match="needs 108 bytes"):
        s.decode({"weight": raw}, shape=(3, 64), file="m.gguf", prefix="x")


def test_row_not_multiple_of_block():
    s = gguf_scheme(tid("Q4_K"))
    with pytest.raises(ShapeMismatchError, match=r"row length 300 .*not a multiple of its block size 256"):
        s.decode({"weight": torch.zeros(288, dtype=torch.uint8)}, shape=(1, 300), file="f.gguf", prefix="p")
    with pytest.raises(ShapeMismatchError, match="not a multiple of the block size 32"):
        gguf_scheme(tid("Q8_0")).quantize(torch.zeros(2, 48))
    with pytest.raises(ShapeMismatchError, match="not a multiple of the 144-byte block"):
        dequantize_blocks(tid("Q4_K"), torch.zeros(2, 150, dtype=torch.uint8))


def test_unknown_and_unsupported_types():
    with pytest.raises(UnsupportedError, match="unknown ggml type id 4"):
        gguf_scheme(4)
    with pytest.raises(UnsupportedError, match="unknown ggml type id 99"):
        gguf_scheme(99)
    with pytest.raises(UnsupportedError, match=r"cannot dequantize I32 \(id 26\)"):
        gguf_scheme(26)
    with pytest.raises(UnsupportedError, match="cannot dequantize F64"):
        dequantize_blocks(28, torch.zeros(1, 8, dtype=torch.uint8))
    with pytest.raises(UnsupportedError, match="cannot quantize to Q4_K"):
        gguf_scheme(tid("Q4_K")).quantize(torch.zeros(1, 256))


def test_missing_weight_piece():
    with pytest.raises(MissingTensorError, match=r"blk\.0\.ffn_down\.weight"):
        gguf_scheme(tid("Q8_0")).decode({}, shape=(1, 32), file="f.gguf", prefix="blk.0.ffn_down")


def test_a_row_order_acts_like_the_permuted_rows():
    """llama q/k: the model's rows are a permutation of the file's; the blocks stay in file order and every
    use (linear, dequantize, encode, embedding, packed kernel weights) sees the permuted weight."""
    from quantload.schemes.base import QTensor
    from quantload.schemes.gguf.scheme import ROW_ORDER, gguf_scheme
    scheme = gguf_scheme(3)  # Q4_1
    blocks = random_blocks(3, 8 * 4, seed=5).reshape(8, -1)  # 8 rows of 4 blocks = 128 columns
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    lazy = QTensor(scheme, {"blocks": blocks}, (8, 128), torch.float32, {ROW_ORDER: order})
    moved = QTensor(scheme, {"blocks": blocks[order]}, (8, 128), torch.float32, {})
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(8)
    assert torch.equal(lazy.dequantize(torch.float32), moved.dequantize(torch.float32))
    assert torch.equal(scheme.encode(lazy)["weight"], scheme.encode(moved)["weight"])
    assert torch.allclose(scheme.linear(x, lazy, bias), scheme.linear(x, moved, bias), atol=1e-5)
    ids = torch.tensor([[0, 7, 3], [2, 2, 5]])
    assert torch.equal(scheme.embedding(ids, lazy, torch.float32), scheme.embedding(ids, moved, torch.float32))
    assert torch.equal(scheme.affine_weight(lazy).codes, scheme.affine_weight(moved).codes)
