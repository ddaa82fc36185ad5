"""Shared bit packing (schemes/intpack.py), the compressed-tensors-exact affine math (schemes/affine.py)
and the runtime-quantization short names. References: compressed-tensors' own pack/qparams functions,
hqq's BitPack and optimum-quanto's pack_weights, run on CPU."""
import pytest
import torch

import quantload.schemes  # noqa: F401  (registers every family and the short names)
from quantload.config import resolve_quantize
from quantload.errors import ConfigError
from quantload.schemes.affine import IntQuantConfig, WeightArgs, calculate_qparams, ct_config, observe_minmax
from quantload.schemes.compressed import CTPackedScheme
from quantload.schemes.intpack import (pack_padded, pack_planes, pack_stream, packed_len, unpack_padded,
                                       unpack_planes, unpack_stream)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


# --- streams ------------------------------------------------------------------------------------
@pytest.mark.parametrize("values,bits,words", [
    ([[1]], 4, [[9]]), ([[1, 2, 3, 4]], 4, [[52137]]), ([list(range(-8, 0))], 4, [[1985229328]]),
    ([[-8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4]], 4, [[1985229328, 52137]]),
    ([[1]], 8, [[129]]), ([[1, 2, 3, 4]], 8, [[-2071756159]]), ([[-128, -127, -126, -125]], 8, [[50462976]]),
])
def test_compressed_tensors_official_vectors(values, bits, words):
    codes = torch.tensor(values) + (1 << (bits - 1))
    assert pack_stream(codes, bits, dim=1).tolist() == words
    assert unpack_stream(torch.tensor(words, dtype=torch.int32), bits, len(values[0]), dim=1).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [0, 1])
def test_stream_matches_compressed_tensors_pack_to_int32(bits, dim):
    g = torch.Generator().manual_seed(bits)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 45), generator=g, dtype=torch.int8)
    ref = ct_helpers.pack_to_int32(signed, bits, packed_dim=dim)
    ours = pack_stream(signed.to(torch.int32) + (1 << (bits - 1)), bits, dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, ref)
    n = signed.shape[dim]
    back = unpack_stream(ref, bits, n, dim=dim) - (1 << (bits - 1))
    assert torch.equal(back.to(torch.int8), signed)
    assert ref.shape[dim] == packed_len(n, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_stream_uint8_output_matches_int32(bits):
    words = torch.randint(-(1 << 31), (1 << 31) - 1, (6, 9), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.int32)
    for dim in (0, 1):
        n = words.shape[dim] * 32 // bits
        wide = unpack_stream(words, bits, n, dim=dim)
        assert wide.dtype == torch.int32
        assert torch.equal(unpack_stream(words, bits, n, dim=dim, dtype=torch.uint8), wide.to(torch.uint8))
        # field k of the stream = bits [k*bits, k*bits + bits) of the little-endian bit string
        line = words.select(1 - dim, 2).tolist()
        stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(line))
        assert wide.select(1 - dim, 2).tolist() == [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]


def test_gptq_three_bit_reference_words():
    """docs/formats.md §3.3: 32 three-bit fields of value 3 are the words 0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D."""
    words = pack_stream(torch.full((32,), 3), 3)
    assert [w & 0xFFFFFFFF for w in words.tolist()] == [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]
    assert unpack_stream(words, 3, 32).tolist() == [3] * 32


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_padded_layout_roundtrip_and_width(bits):
    codes = torch.randint(0, 1 << bits, (5, 23), generator=torch.Generator().manual_seed(bits))
    words = pack_padded(codes, bits)
    assert words.shape == (5, -(-23 // (32 // bits)))
    assert torch.equal(unpack_padded(words, bits, 23), codes.to(torch.int32))
    # field k of word w sits at bit (k % per) * bits
    per = 32 // bits
    w0 = words[0, 0].item() & 0xFFFFFFFF
    assert [(w0 >> (j * bits)) & ((1 << bits) - 1) for j in range(per)] == codes[0, :per].tolist()


# --- planes (HQQ, quanto) -----------------------------------------------------------------------
@pytest.mark.parametrize("packing,bits,slices", [("4bit_u8", 4, 2), ("2bit_u8", 2, 4), ("1bit_u8", 1, 8),
                                                 ("3bit_32", 3, 10)])
def test_planes_match_hqq_bitpack(packing, bits, slices):
    bitpack = pytest.importorskip("hqq.core.bitpack").BitPack
    codes = torch.randint(0, 1 << bits, (40, 12), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    ref = getattr(bitpack, f"pack_{packing}")(codes)
    shifts = [(slices - 1 - k) * bits for k in range(slices)]
    dtype = torch.int32 if bits == 3 else torch.uint8
    assert torch.equal(pack_planes(codes, bits, shifts, dtype), ref)
    assert torch.equal(unpack_planes(ref, bits, shifts)[:40], codes.to(ref.dtype))


@pytest.mark.parametrize("bits", [2, 4])
def test_planes_match_quanto_pack_weights(bits):
    packed_mod = pytest.importorskip("optimum.quanto.tensor.packed")
    codes = torch.randint(0, 1 << bits, (37, 9), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    ref = packed_mod.pack_weights(codes, bits)
    shifts = [k * bits for k in range(8 // bits)]
    assert torch.equal(pack_planes(codes, bits, shifts, torch.uint8), ref)
    assert torch.equal(unpack_planes(ref, bits, shifts)[:37], codes)


# --- qparams: op for op what compressed-tensors computes ------------------------------------------
def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False), (3, False), (2, True)])
def test_calculate_qparams_equals_compressed_tensors(dtype, bits, sym):
    from compressed_tensors.quantization.utils import calculate_qparams as ct_calc
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)).to(dtype)
    w[3] = 0                                   # an all-zero row: scale falls back to eps
    w[5, :32] = w[5, :32].abs()                # a group with no negative value
    args = WeightArgs(bits, "int", sym, "group", 32)
    lo, hi = observe_minmax(w, args)
    s, z = calculate_qparams(lo, hi, args)
    rs, rz = ct_calc(lo, hi, _ct_args(num_bits=bits, symmetric=sym, strategy="group", group_size=32))
    assert s.dtype == rs.dtype == dtype and torch.equal(s, rs)
    assert z.dtype == rz.dtype == torch.int8 and torch.equal(z, rz)


def test_observe_minmax_shapes():
    w = torch.randn(10, 64)
    assert observe_minmax(w, WeightArgs(4, "int", True, "tensor"))[0].ndim == 0
    assert observe_minmax(w, WeightArgs(4, "int", True, "channel"))[0].shape == (10, 1)
    assert observe_minmax(w, WeightArgs(4, "int", True, "group", 16))[0].shape == (10, 4)
    assert observe_minmax(w, WeightArgs(8, "float", True, "block", block_structure=(4, 32)))[0].shape == (3, 2)


# --- runtime quantization names and configs ------------------------------------------------------
@pytest.mark.parametrize("name,bits,sym,strategy,gs", [
    ("int4", 4, True, "group", 128), ("w4a16", 4, True, "group", 128),
    ("int4-asym", 4, False, "group", 128), ("w4a16-asym", 4, False, "group", 128),
    ("int4-channel", 4, True, "channel", None), ("int8-channel", 8, True, "channel", None),
    ("w8a16", 8, True, "channel", None), ("int8-group", 8, True, "group", 128),
])
def test_short_names_are_compressed_tensors_specs(name, bits, sym, strategy, gs):
    spec = resolve_quantize(name)
    assert spec.method == "compressed-tensors"
    scheme = spec.scheme_for("model.layers.0.mlp.up_proj", torch.nn.Linear(256, 64))
    assert isinstance(scheme, CTPackedScheme)
    assert (scheme.args.num_bits, scheme.args.symmetric, scheme.args.strategy, scheme.args.group_size) == \
        (bits, sym, strategy, gs)
    assert spec.scheme_for("lm_head", torch.nn.Linear(256, 64)) is None
    d = spec.to_dict()
    assert d["format"] == "pack-quantized" and d["quantization_status"] == "compressed"


def test_int8_short_name_stays_bitsandbytes():
    from quantload.config import _SHORT_NAMES
    assert _SHORT_NAMES["int8"]["quant_method"] == "bitsandbytes"
    assert _SHORT_NAMES["llm.int8"]["quant_method"] == "bitsandbytes"


def test_runtime_config_is_valid_for_compressed_tensors_and_transformers():
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig
    configs = (ct_config(4), ct_config(8, group_size=None),
               IntQuantConfig(bits=4, group_size=64, symmetric=False).to_dict())
    for cfg in configs:
        drop = ("quant_method", "sparsity_config", "transform_config")
        qc = QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k not in drop})
        args = qc.config_groups["group_0"].weights
        ours = cfg["config_groups"]["group_0"]["weights"]
        assert (args.num_bits, args.symmetric, args.strategy, args.group_size) == \
            (ours["num_bits"], ours["symmetric"], ours["strategy"], ours["group_size"])
        assert CompressedTensorsConfig.from_dict(cfg).quantization_config is not None


def test_int_quant_config_and_bad_args():
    spec = resolve_quantize(IntQuantConfig(bits=3, group_size=32, symmetric=False))
    scheme = spec.scheme_for("a", None)
    assert (scheme.args.num_bits, scheme.args.group_size, scheme.args.symmetric) == (3, 32, False)
    with pytest.raises(ConfigError, match="bits=1"):
        ct_config(1)
    with pytest.raises(ConfigError, match="group_size=0"):
        ct_config(4, group_size=0)


def test_runtime_spec_leaves_partial_groups_dense_and_says_so():
    spec = resolve_quantize("int4")
    assert spec.scheme_for("model.layers.0.mlp.down_proj", torch.nn.Linear(200, 64)) is None
    assert "model.layers.0.mlp.down_proj" in spec.to_dict()["ignore"]
    assert spec.scheme_for("model.layers.0.mlp.up_proj", torch.nn.Linear(256, 64)) is not None
