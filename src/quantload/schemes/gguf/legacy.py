"""Decoders of the plain float types and the legacy 32-element blocks (Q4_0 ... Q8_1).

Each decoder fills `out` (float32 [n, block_size], contiguous) from `b` (uint8 [n, type_size]). The
arithmetic follows gguf-py 0.19 step by step, in float32, so the results are bit for bit the same:
small integer codes are built in 1-byte dtypes, cast into `out` once, then scaled in place.

These 17-24 byte blocks are eager torch's worst case (many short rows, see _bits.py), so nibbles are
split over the whole contiguous chunk at once (the bytes of other fields included: cheaper than slicing
first), then one copy per half (j, j + 16) puts them in element order. Measured on the 2-core CI VM, per
million Q4_0 values: nibble split 80 us, the two half copies 240 us, cast to float 190 us, scale 195 us;
the cast and the scale pass are the floor of any eager decoder (see bench/gguf_kernels.py).
"""
from __future__ import annotations

import torch

from . import grids
from ._bits import copy_planes, half, spread_bits, with_scales


def f32_type(b, out):
    out.copy_(b.view(torch.float32))


def f16_type(b, out):
    out.copy_(b.view(torch.float16))


def bf16_type(b, out):
    out.copy_(b.view(torch.bfloat16))   # bf16 -> f32 is a 16-bit shift, exact


def nibble_planes(b: torch.Tensor, start: int) -> list[torch.Tensor]:
    """[lo, hi]: the low / high nibbles of qs = b[:, start:start + 16], each a strided uint8 view [n, 16]
    (elements 0..15 and 16..31). Nibbles are cut over the whole chunk at once (other fields included:
    one long row, cheaper than slicing first)."""
    lo, hi = b & 15, b >> 4
    return [lo[:, start:start + 16], hi[:, start:start + 16]]


def five_bit_codes(b: torch.Tensor, qs_at: int, qh_at: int, one: int, zero: int) -> torch.Tensor:
    """Q5_x codes uint8 [n, 32] (contiguous): nibble of qs (j / j + 16 order) + (`one` if bit j of the
    little-endian u32 qh is set else `zero`), in wrapping uint8."""
    n = b.shape[0]
    codes = torch.empty((n, 32), dtype=torch.uint8, device=b.device)
    copy_planes(codes, nibble_planes(b, qs_at))
    return codes.add_(spread_bits(b[:, qh_at:qh_at + 4], one, zero))


def nibble_codes(b: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 nibble codes of qs = b[:, start:start + 16] in element order, uint8 [n, 32] contiguous
    (so the cast to float that follows is one flat pass)."""
    codes = torch.empty((b.shape[0], 32), dtype=torch.uint8, device=b.device)
    copy_planes(codes, nibble_planes(b, start))
    return codes


@with_scales(lambda b: (half(b, 0),))
def q4_0(b, out, d):
    out.copy_(nibble_codes(b, 2).sub_(8).view(torch.int8))      # q - 8, wrapping in uint8
    out.mul_(d)


@with_scales(lambda b: (half(b, 0), half(b, 2)))
def q4_1(b, out, d, m):
    copy_planes(out, nibble_planes(b, 4))
    out.mul_(d).add_(m)


@with_scales(lambda b: (half(b, 0),))
def q5_0(b, out, d):
    # (nibble | bit << 4) - 16 == nibble + (bit ? 0 : -16)
    out.copy_(five_bit_codes(b, 6, 2, one=0, zero=0xF0).view(torch.int8))
    out.mul_(d)


@with_scales(lambda b: (half(b, 0), half(b, 2)))
def q5_1(b, out, d, m):
    out.copy_(five_bit_codes(b, 8, 4, one=16, zero=0))
    out.mul_(d).add_(m)


@with_scales(lambda b: (half(b, 0),))
def q8_0(b, out, d):
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(d)


def q8_1(b, out):
    """Not in gguf-py; ggml has no dequantizer either. d * q; bytes 2:4 hold s = d * sum(q), unused."""
    out.copy_(b[:, 4:36].view(torch.int8))
    out.mul_(half(b, 0))


DECODERS = {0: f32_type, 1: f16_type, 30: bf16_type, 2: q4_0, 3: q4_1, 6: q5_0, 7: q5_1, 8: q8_0, 9: q8_1}


def q1_0(b, out):
    """Not in gguf-py 0.19 (reference: docs/gguf.md 2.3, checked there against ggml's C): 128 signs, bit j of
    qs -> element j, value +d or -d."""
    out.copy_(spread_bits(b[:, 2:18], 1, 0xFF).view(torch.int8))
    out.mul_(half(b, 0))


def q2_0(b, out):
    """Not in gguf-py 0.19 (reference: docs/gguf.md 2.3): 64 values of 2 bits, least significant first,
    (q - 1) * d."""
    out.copy_((grids.lanes("crumbs", b[:, 2:18]) - 1).view(torch.int8))
    out.mul_(half(b, 0))


DECODERS.update({41: q1_0, 42: q2_0})


# --- the fast runtime path (runtime/kernels.py): legacy blocks as affine integer codes --------------------
def _nibble_codes(b: torch.Tensor, start: int) -> torch.Tensor:
    """uint8 [n, 32] codes in element order: low nibbles of qs = elements 0..15, high nibbles 16..31."""
    qs = b[:, start:start + 16]
    return torch.cat([qs & 15, qs >> 4], dim=1)


def affine_codes(type_id: int, b: torch.Tensor):
    """(codes uint8 [n, 32], bits, scale [n, 1], zero [n, 1] or None, bias [n, 1] or None) with
    W = (codes - zero) * scale or codes * scale + bias, the same values the decoders above compute;
    None for a type that is not affine in this sense."""
    if type_id == 2:                                    # Q4_0: (q - 8) * d
        return _nibble_codes(b, 2), 4, half(b, 0), torch.full_like(half(b, 0), 8.0), None
    if type_id == 3:                                    # Q4_1: q * d + m
        return _nibble_codes(b, 4), 4, half(b, 0), None, half(b, 2)
    if type_id == 6:                                    # Q5_0: (q - 16) * d, q = nibble | bit << 4
        return five_bit_codes(b, 6, 2, one=16, zero=0), 5, half(b, 0), torch.full_like(half(b, 0), 16.0), None
    if type_id == 7:                                    # Q5_1: q * d + m
        return five_bit_codes(b, 8, 4, one=16, zero=0), 5, half(b, 0), None, half(b, 2)
    if type_id == 8:                                    # Q8_0: signed q * d = (q + 128 - 128) * d
        return b[:, 2:34] ^ 0x80, 8, half(b, 0), torch.full_like(half(b, 0), 128.0), None
    return None
