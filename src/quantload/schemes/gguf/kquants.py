"""Decoders of the K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.

Same contract as legacy.py: fill float32 `out` [n, 256] from uint8 `b` [n, type_size], in gguf-py's
order of float32 operations (sub-block scale = d * sc first, then scale * q, then - d_min * m).

The per-block scales (a few dozen small ops) run once per window of chunks (`_bits.with_scales`):
run per chunk their fixed cost was about a third of the decode time on a busy 2-core VM.

Layout work (see _bits.py), two patterns, each kept where it measured faster:
- Q4_K, Q5_K, Q6_K: bit fields are cut from int words of each block with scalar masks and written
  plane by plane straight into element-ordered integer codes (`out=` slices), then one flat cast;
- Q2_K, Q3_K: each code field is copied once into plane-major order (`planar`), bit planes are cut 8
  bytes at a time from int64 words with broadcast shifts (`cut`), planes of different fields are
  combined there (no carries: each byte stays below 256), and one copy puts the codes in element order
  while casting to float (`to_elements`).
"""
from __future__ import annotations

import torch

from ._bits import (as_bytes, cut, field, half, nibble_words, planar, rep, scalar, to_elements, with_scales,
                    words)


def q2_k_scales(b):
    n = b.shape[0]
    sc_lo, sc_hi = nibble_words(words(b, 0, 16))
    dl = half(b, 80) * as_bytes(sc_lo, n).float()
    ml = half(b, 82) * as_bytes(sc_hi, n).float()
    return dl.unsqueeze(-1), ml.unsqueeze(-1)


@with_scales(q2_k_scales)
def q2_k(b, out, dl, ml):
    q = cut(planar(b, 16, (2, 32)).view(torch.int64), (0, 2, 4, 6), rep(3), dim=1)   # [half, plane, n, 4]
    to_elements(out, q.view(torch.uint8))
    out.view(b.shape[0], 16, 16).mul_(dl).sub_(ml)


def q3_k_scales(b: torch.Tensor) -> torch.Tensor:
    """The 16 six-bit Q3_K scales minus 32, float32 [n, 16]: low nibbles from bytes 0..7 (values 0..7 from
    the low nibbles, 8..15 from the high ones), 2 high bits from bytes 8..11 (shift 2i gives values 4i..)."""
    n = b.shape[0]
    lo, hi = nibble_words(words(b, 96, 104)[:, 0])                             # [n] int64 each
    high2 = cut(words(b, 104, 108, torch.int32)[:, 0], (0, 2, 4, 6), 0x03030303, dim=1)   # [n, 4]
    return (as_bytes(torch.stack([lo, hi], dim=1), n) | (as_bytes(high2, n) << 4)).float() - 32


@with_scales(lambda b: ((half(b, 108) * q3_k_scales(b)).unsqueeze(-1),))
def q3_k(b, out, dl):
    q = cut(planar(b, 32, (2, 32)).view(torch.int64), (0, 2, 4, 6), rep(3), dim=1)   # [half, j, n, 4]
    h = cut(words(b, 0, 32).unsqueeze(0), tuple(range(8)), rep(1), dim=0)          # [8 = 4 half + j, 1, n, 4]
    codes = (q + (h.view(q.shape) << 2)).view(torch.uint8) - 4      # q - 4 * (1 - hbit), in 0..7 before -4
    to_elements(out, codes.view(torch.int8))
    out.view(b.shape[0], 16, 16).mul_(dl)


def scale_min_k4(b: torch.Tensor, at: int = 4):
    """get_scale_min_k4 over the 12 bytes at `at`: (8 six-bit scales, 8 six-bit mins), float32 [n, 8] each,
    computed 4 at a time on int32 words."""
    n = b.shape[0]
    w = words(b, at, at + 12, torch.int32)                     # [n, 3]: d, m, m_d words
    d, m, md = w[:, 0], w[:, 1], w[:, 2]
    sc = torch.stack([d & 0x3F3F3F3F, (md & 0x0F0F0F0F) | ((d >> 2) & 0x30303030)], dim=1)
    mn = torch.stack([m & 0x3F3F3F3F, ((md >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)], dim=1)
    return as_bytes(sc, n).float(), as_bytes(mn, n).float()


def k4_scales(b):
    """(d * scale, dmin * min) of Q4_K / Q5_K, float32 [n, 8, 1] each."""
    sc, mn = scale_min_k4(b)
    return (half(b, 0) * sc).unsqueeze(-1), (half(b, 2) * mn).unsqueeze(-1)


@with_scales(k4_scales)
def q4_k(b, out, dl, ml):
    # element 64 c + 32 nib + l = nibble nib of qs[32 c + l]; written in element order by the masks
    n = b.shape[0]
    qs = b.view(torch.int64)[:, 2:18].view(n, 4, 4)
    codes = torch.empty((n, 4, 2, 4), dtype=torch.int64, device=b.device)
    torch.bitwise_and(qs, rep(15), out=codes[:, :, 0])
    torch.bitwise_and(qs >> 4, rep(15), out=codes[:, :, 1])
    out.copy_(codes.view(torch.uint8).view(n, 256))
    out.view(n, 8, 32).mul_(dl).sub_(ml)


@with_scales(k4_scales)
def q5_k(b, out, dl, ml):
    # as Q4_K, plus bit 2 c + nib of qh[l] as bit 4 of element 64 c + 32 nib + l
    n = b.shape[0]
    w = b.view(torch.int64)                                                        # [n, 22]
    qs = w[:, 6:22].view(n, 4, 4)
    h = (cut(w[:, 2:6], tuple(range(8)), rep(1), dim=0) << 4).view(4, 2, n, 4)     # [chunk, nib, n, 4]
    codes = torch.empty((n, 4, 2, 4), dtype=torch.int64, device=b.device)
    for nib in range(2):
        nibbles = (qs >> 4 * nib if nib else qs) & rep(15)
        torch.bitwise_or(nibbles, h[:, nib].movedim(1, 0), out=codes[:, :, nib])
    out.copy_(codes.view(torch.uint8).view(n, 256))
    out.view(n, 8, 32).mul_(dl).sub_(ml)


@with_scales(lambda b: ((half(b, 208) * field(b, 192, 208).view(torch.int8).float()).unsqueeze(-1),))
def q6_k(b, out, dl):
    # element 128 h + 32 j + l: nibble j // 2 of ql[64 h + 32 (j % 2) + l] | crumb j of qh[32 h + l] << 4.
    # Fields are cut from int16 words of each block (one row per block per op), the crumbs straight into
    # bits 4-5; one OR per j writes the codes in element order, so the cast to float is one flat pass.
    n = b.shape[0]
    w = b.view(torch.int16)                                      # [n, 105]
    ql, qh = w[:, 0:64], w[:, 64:96]
    nib = [(x & 0x0F0F).view(torch.uint8).view(n, 2, 2, 32) for x in (ql, ql >> 4)]
    crumbs = [(qh << 4) & 0x3030, (qh << 2) & 0x3030, qh & 0x3030, (qh >> 2) & 0x3030]
    codes = torch.empty((n, 2, 4, 32), dtype=torch.uint8, device=b.device)
    for j in range(4):
        high = crumbs[j].view(torch.uint8).view(n, 2, 32)
        torch.bitwise_or(nib[j // 2][:, :, j % 2], high, out=codes[:, :, j])
    out.copy_(codes.view(n, 256).sub_(32).view(torch.int8))
    out.view(n, 16, 16).mul_(dl)


def q8_k(b, out):
    """Not in gguf-py: d (float32) * q (int8); the 16 int16 bsums at 260:292 are not needed."""
    out.copy_(b[:, 4:260].view(torch.int8))
    out.mul_(scalar(b, 0, torch.float32).unsqueeze(-1))


DECODERS = {10: q2_k, 11: q3_k, 12: q4_k, 13: q5_k, 14: q6_k, 15: q8_k}


# --- the fast runtime path (runtime/kernels.py): Q4_K / Q5_K as affine integer codes ----------------------
# Both are exactly W = q * (d * sc) - dmin * m per 32-element sub-block (the decoders above compute this
# very float32 arithmetic), so they map onto the int4 kernel at group 32 with the checkpoint's own codes.
def q4_k_codes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 256] codes of Q4_K blocks in element order (the q4_k decoder's bit layout)."""
    n = b.shape[0]
    qs = b.view(torch.int64)[:, 2:18].view(n, 4, 4)
    codes = torch.empty((n, 4, 2, 4), dtype=torch.int64, device=b.device)
    torch.bitwise_and(qs, rep(15), out=codes[:, :, 0])
    torch.bitwise_and(qs >> 4, rep(15), out=codes[:, :, 1])
    return codes.view(torch.uint8).view(n, 256)


def q5_k_codes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 256] codes (0..31) of Q5_K blocks in element order (the q5_k decoder's bit layout)."""
    n = b.shape[0]
    w = b.view(torch.int64)
    qs = w[:, 6:22].view(n, 4, 4)
    h = (cut(w[:, 2:6], tuple(range(8)), rep(1), dim=0) << 4).view(4, 2, n, 4)
    codes = torch.empty((n, 4, 2, 4), dtype=torch.int64, device=b.device)
    for nib in range(2):
        nibbles = (qs >> 4 * nib if nib else qs) & rep(15)
        torch.bitwise_or(nibbles, h[:, nib].movedim(1, 0), out=codes[:, :, nib])
    return codes.view(torch.uint8).view(n, 256)


def affine_k(type_id: int, b: torch.Tensor):
    """(codes uint8 [n, 256], bits, scale [n, 8], bias [n, 8]) with W = codes * scale + bias for Q4_K
    (12) and Q5_K (13); None for the other K-quants (16-element sub-blocks: no int4 kernel group)."""
    if type_id not in (12, 13):
        return None
    b = b.contiguous()
    dl, ml = k4_scales(b)
    codes = q4_k_codes(b) if type_id == 12 else q5_k_codes(b)
    return codes, 4 if type_id == 12 else 5, dl.squeeze(-1), -ml.squeeze(-1)
