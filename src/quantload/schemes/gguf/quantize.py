"""The writer side: float weights -> ggml blocks, byte for byte what gguf-py 0.19's quantize() writes
(which for Q8_0 .. Q5_1 is ggml's `quantize_row_*_ref`, see docs/gguf.md 3.1), for F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0 and Q5_1. Float32 arithmetic in gguf-py's order; rounding spelled out where torch's
defaults differ (C roundf rounds half away from zero, torch.round to even).
"""
from __future__ import annotations

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from ...ggml_types import GGML_TYPES
from ._bits import chunks, const


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> its fp16 (round to nearest even, like numpy's astype) as uint8 [n, 2]."""
    return x.half().view(torch.uint8)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero) exactly as gguf-py's np_roundf: floor(|x|) + floor(2 * frac)."""
    a = x.abs()
    fl = a.floor()
    return x.sign() * (fl + (2 * (a - fl)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude of each row, sign kept (the first one on ties, as numpy argmax)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, 32] -> 16 bytes: element j in the low nibble of byte j, element j + 16 in the high."""
    return (q[:, :16] & 15) | (q[:, 16:] << 4)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, 32] (5 bits) -> qh, 4 bytes of a little-endian u32 whose bit j is bit 4 of q[j]."""
    bits = ((q >> 4) & 1).view(-1, 4, 8).int() << const(tuple(range(8)), torch.int32, q.device)
    return bits.sum(-1).to(torch.uint8)


def q8_0(x):
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1)


def q4_0(x):
    d = _signed_absmax(x) / -8
    q = (x * _inverse(d) + 8.5).trunc().to(torch.uint8).clamp_(max=15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def q4_1(x):
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 15
    q = ((x - mn) * _inverse(d) + 0.5).trunc().to(torch.uint8).clamp_(max=15)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], dim=1)


def q5_0(x):
    d = _signed_absmax(x) / -16
    q = (x * _inverse(d) + 16.5).trunc().to(torch.uint8).clamp_(max=31)
    return torch.cat([_f16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], dim=1)


def q5_1(x):
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 31
    q = ((x - mn) * _inverse(d) + 0.5).trunc().to(torch.uint8).clamp_(max=31)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_fifth_bits(q), _pack_nibbles(q)], dim=1)


def f32(x):
    return x.contiguous().view(torch.uint8)


def f16(x):
    return x.half().view(torch.uint8)


def bf16(x):
    """ggml_compute_fp32_to_bf16 as gguf-py writes it: NaN forced quiet (sign and top bits kept), else
    round to nearest even on the 16 dropped bits (torch's own cast canonicalizes NaN instead)."""
    n = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return torch.where(n >= 0x8000, n - 0x10000, n).to(torch.int16).view(torch.uint8)


#: type id -> quantizer of float32 blocks [n, block_size] -> uint8 [n, type_size]
QUANTIZERS = {0: f32, 1: f16, 30: bf16, 8: q8_0, 2: q4_0, 3: q4_1, 6: q5_0, 7: q5_1}

#: elements per step: the quantizers make several float32 temporaries of the step's size
CHUNK_ELEMS = 1 << 20


def quantize_blocks(type_id: int, w: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Float tensor [..., ne0] -> uint8 [rows, ne0 / block_size * type_size] of ggml blocks (rows =
    prod of the leading dims; a 1-D tensor is one row). Math in float32 whatever w's dtype."""
    fn = QUANTIZERS.get(type_id)
    t = GGML_TYPES.get(type_id)
    if fn is None:
        what = t.name if t is not None else f"unknown ggml type {type_id}"
        raise UnsupportedError(f"cannot quantize to {what}; supported: "
                               f"{', '.join(GGML_TYPES[i].name for i in sorted(QUANTIZERS))}", key=name)
    if not w.is_floating_point():
        raise UnsupportedError(f"cannot quantize a {w.dtype} tensor to {t.name}", key=name)
    ne0 = w.shape[-1] if w.dim() else 1
    if ne0 % t.block_size:
        raise ShapeMismatchError(f"cannot quantize shape {tuple(w.shape)} to {t.name}: the last dimension "
                                 f"{ne0} is not a multiple of the block size {t.block_size}", key=name)
    rows = w.numel() // ne0 if ne0 else 0
    blocks = w.reshape(-1, t.block_size)
    out = torch.empty((blocks.shape[0], t.type_size), dtype=torch.uint8, device=w.device)
    step = max(1, CHUNK_ELEMS // t.block_size)
    for s, e in chunks(blocks.shape[0], step):
        out[s:e] = fn(blocks[s:e].float())
    return out.view(rows, ne0 // t.block_size * t.type_size)
