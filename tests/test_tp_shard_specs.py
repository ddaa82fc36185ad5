"""Tensor-parallel shard specs on one process: each rank's shard of the stored pieces decodes to exactly
the matching slice of the full decode (bit for bit); splits that cut a word, group or block are refused."""
import numpy as np
import pytest
import torch

from quantload.errors import PlacementError
from quantload.parallel.shard_specs import PieceReader, Split, check_dense, shard_dense, spec_for
from quantload.schemes.awq import AWQScheme
from quantload.schemes.bnb4 import Bnb4Scheme
from quantload.schemes.gptq import GPTQScheme
from test_awq import _i32, _random, pack_gemm
from test_gptq import _random_layer, autogptq_pack


def _expected(w, split):
    return shard_dense(w, split)


def check_all_ranks(scheme, pieces, shape, world, style):
    full = scheme.decode(dict(pieces), shape=shape).dequantize(torch.float32)
    spec = spec_for(scheme, "layer")
    total = 0
    for rank in range(world):
        split = Split(style, rank, world)
        spec.check(scheme, "layer", shape, split)
        reader = PieceReader(lambda s: pieces[s], set(pieces))
        shard = spec.shard(scheme, reader, shape, split, "layer")
        local = spec.scheme_for_shard(scheme, shape, split).decode(shard, shape=split.local_shape(shape))
        assert torch.equal(local.dequantize(torch.float32), _expected(full, split)), (style, rank)
        total += reader.bytes_read
    return total


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
@pytest.mark.parametrize("bits,gs,desc_act", [(4, 32, False), (4, 32, True), (8, 64, False), (4, -1, False),
                                              (3, 32, False)])
def test_gptq(style, bits, gs, desc_act):
    n_in, n_out, world = 128, 64, 2
    q, z, scales, g_idx = _random_layer(bits, n_in, n_out, n_in if gs == -1 else gs, bits, desc_act)
    pieces = autogptq_pack(q, z, scales, g_idx, bits, v1=False)
    scheme = GPTQScheme(bits, gs, sym=False, checkpoint_format="gptq_v2", desc_act=desc_act)
    check_all_ranks(scheme, pieces, (n_out, n_in), world, style)


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_awq(style):
    n_in, n_out, gs = 128, 64, 32
    q, z, s = _random(n_in, n_out, gs, 0)
    pieces = {"qweight": _i32(pack_gemm(q.numpy())), "qzeros": _i32(pack_gemm(z.numpy())), "scales": s}
    check_all_ranks(AWQScheme(gs), pieces, (n_out, n_in), 4 if style == "colwise" else 2, style)


@pytest.mark.parametrize("style,shape,dq", [("colwise", (64, 128), False), ("rowwise", (64, 128), False),
                                            ("colwise", (64, 128), True), ("rowwise", (64, 256), True),
                                            ("colwise", (1024, 256), True)])
def test_bnb4(style, shape, dq):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g).to(torch.bfloat16)
    scheme = Bnb4Scheme("nf4", 64, double_quant=dq)
    pieces = scheme.encode(scheme.quantize(w))
    size = sum(t.numel() * t.element_size() for t in pieces.values())
    read = check_all_ranks(scheme, pieces, shape, 2, style)
    # colwise 1024x256 keeps whole nested blocks (2 x 2048 absmax codes): nothing re-derived, ~the file read once
    if shape == (1024, 256):
        assert read <= size + 2 * 1024


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, None, False), (2, 64, True)])
def test_compressed_pack_quantized(style, bits, group, sym):
    from quantload.schemes.affine import ct_config
    from quantload.schemes.registry import spec_from_dict
    spec = spec_from_dict(ct_config(bits, group_size=group, symmetric=sym))
    scheme = spec.scheme_for("layer", torch.nn.Linear(128, 64))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    pieces = scheme.encode(scheme.quantize(w))
    check_all_ranks(scheme, pieces, (64, 128), 2, style)


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
@pytest.mark.parametrize("block,fmt,shape", [((128, 128), "float", (512, 256)), ((128, 128), "ue8m0", (512, 256)),
                                             (None, "float", (64, 128)), ((128, 128), "float", (320, 256))])
def test_fp8_block(style, block, fmt, shape):
    from quantload.schemes.fp8_block import FP8BlockScheme
    scheme = FP8BlockScheme(block, fmt)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    if block is not None and shape[0] % 128:        # the last rank's last row block is partial: pad to quantize, keep the rows
        qt = scheme.quantize(torch.cat([w, w[: 128 - shape[0] % 128]]))
        pieces = {"weight": qt.data["weight"][: shape[0]].contiguous(), "weight_scale_inv": qt.data["weight_scale_inv"]}
        if style == "colwise":
            with pytest.raises(PlacementError, match="whole 128-row FP8 scale blocks"):
                spec_for(scheme, "x").check(scheme, "x", shape, Split(style, 0, 2))
            return
    elif block is None:       # one scale per tensor (built here: FP8BlockScheme.quantize needs a block)
        pieces = {"weight": w.to(torch.float8_e4m3fn), "weight_scale_inv": torch.tensor(0.0125)}
    else:
        pieces = scheme.encode(scheme.quantize(w))
    check_all_ranks(scheme, pieces, shape, 2, style)


def test_dense_and_refusals():
    check_dense("a", (64, 128), Split("colwise", 0, 4))
    with pytest.raises(PlacementError, match="a: colwise over 3 ranks"):
        check_dense("a", (64, 128), Split("colwise", 0, 3))
    gptq = GPTQScheme(4, 32, sym=False, checkpoint_format="gptq_v2")
    with pytest.raises(PlacementError, match=r"layers.0.o_proj: rowwise over 8 ranks .* multiple of 32"):
        spec_for(gptq, "x").check(gptq, "layers.0.o_proj", (64, 128), Split("rowwise", 0, 8))
    with pytest.raises(PlacementError, match="multiple of 8"):
        spec_for(gptq, "x").check(gptq, "q", (32, 128), Split("colwise", 0, 8))
    bnb = Bnb4Scheme("nf4", 64)
    with pytest.raises(PlacementError, match="whole 64-code blocks"):
        spec_for(bnb, "x").check(bnb, "q", (64, 64), Split("rowwise", 0, 2))
    with pytest.raises(PlacementError, match="no tensor-parallel shard spec"):
        from quantload.schemes.hqq import HQQScheme
        spec_for(HQQScheme.__new__(HQQScheme), "q")


def test_gguf_rowwise_needs_whole_blocks_per_row():
    from types import SimpleNamespace
    from quantload.ggml_types import GGML_TYPES
    from quantload.parallel.gguf_tp import check_gguf
    from quantload.schemes.gguf import gguf_scheme
    q4_k = gguf_scheme(next(t.id for t in GGML_TYPES.values() if t.name == "Q4_K"))
    mm = SimpleNamespace(params={})
    check_gguf(mm, "model.layers.0.mlp.down_proj", q4_k, (128, 512), Split("rowwise", 1, 2))
    with pytest.raises(PlacementError, match=r"down_proj: rowwise over 2 ranks gives 64 inputs .* Q4_K block size 256"):
        check_gguf(mm, "model.layers.0.mlp.down_proj", q4_k, (128, 128), Split("rowwise", 0, 2))
