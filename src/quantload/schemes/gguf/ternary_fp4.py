"""Decoders of the ternary types (TQ1_0, TQ2_0) and the FP4 types (MXFP4, NVFP4).

Same contract as legacy.py, same float32 steps as gguf-py 0.19.
"""
from __future__ import annotations

import torch

from . import grids
from ._bits import as_bytes, cut, field, half, nibble_words, planar, rep, to_elements, words


def tq1_0(b, out):
    """5 trits per byte in qs (4 per byte in qh), stored as a base-3 fixed-point fraction: trit k of byte x
    is ((uint8)(x * 3^k) * 3) >> 8, the uint8 product wrapping on purpose. Elements: trit k of qs[0:32]
    for k = 0..4, then of qs[32:48], then of qh[0:4] for k = 0..3. The products are written straight
    in element order into int16 codes (one multiply per trit), the trit math runs in place over the
    whole contiguous buffer, and one flat cast and one scale pass fill `out`."""
    n = b.shape[0]
    x = b[:, 0:52].to(torch.int16)
    codes = torch.empty((n, 256), dtype=torch.int16, device=b.device)
    for at, width, trits in ((0, 32, 5), (32, 16, 5), (48, 4, 4)):
        dst = codes[:, at * 5:at * 5 + trits * width].view(n, trits, width)
        for k in range(trits):      # a scalar factor: a broadcast tensor of powers measured 3x slower
            torch.mul(x[:, at:at + width], 3 ** k, out=dst[:, k])
    codes.bitwise_and_(255).mul_(3).bitwise_right_shift_(8).sub_(1)   # wrap to uint8, then the trit - 1
    out.copy_(codes)
    out.mul_(half(b, 52))


def tq2_0(b, out):
    q = cut(planar(b, 0, (2, 32)).view(torch.int64), (0, 2, 4, 6), rep(3), dim=1)   # [half, plane, n, 4]
    to_elements(out, (q.view(torch.uint8) - 1).view(torch.int8))
    out.mul_(half(b, 64))


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: uint8 exponent -> float32 2^(e-128); e < 2 gives the denormals 0x200000 << e."""
    e = e.int()
    return torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)


def mxfp4(b, out):
    lo, hi = b & 15, b >> 4
    codes = torch.stack([lo[:, 1:17], hi[:, 1:17]], dim=1)
    torch.index_select(grids.kvalues("fp4", b.device), 0, codes.view(-1).int(), out=out.view(-1))
    out.mul_(e8m0_to_fp32_half(b[:, 0:1]))


def ue4m3_to_fp32_half(x: torch.Tensor) -> torch.Tensor:
    """gguf-py NVFP4.ue4m3_to_fp32: unsigned E4M3 (bias 7) times 0.5; 0x00 and 0x7F decode to 0.
    Every value is a short dyadic number, so this float32 arithmetic is exact."""
    e = ((x >> 3) & 15).int()
    m = (x & 7).float()
    pow2 = ((e + 120) << 23).view(torch.float32)          # 2^(e - 7) built from its bits (exp2 may round)
    raw = torch.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * pow2)
    return torch.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)


def nvfp4(b, out):
    """64 values in 4 sub-blocks of 16, each with its own UE4M3 scale; 8 nibble bytes (one int64 word)
    per sub-block: low nibbles first, then high."""
    n = b.shape[0]
    codes = as_bytes(torch.stack(nibble_words(words(b, 4, 36)), dim=2), n)
    torch.index_select(grids.kvalues("fp4", b.device), 0, codes.view(-1).int(), out=out.view(-1))
    out.view(n, 4, 16).mul_(ue4m3_to_fp32_half(field(b, 0, 4)).unsqueeze(-1))


DECODERS = {34: tq1_0, 35: tq2_0, 39: mxfp4, 40: nvfp4}
