"""Decoders of the i-quants: grid codebooks (IQ1_*, IQ2_*, IQ3_*) and the non-linear 4-bit IQ4_NL/IQ4_XS.

Same contract as legacy.py. Per group of 4 or 8 values we build one int32 row index into a codebook
(with the signs folded into the table where it stays small, grids.signed_grid), gather the rows straight
into `out`, then scale in place. gguf-py computes (scale * grid) * sign; we compute (grid * sign) * scale,
the same float: multiplying by -1 is exact and IEEE rounding is symmetric. Narrow bit fields are
unpacked by 1-D gathers from byte-indexed tables (grids.lane_table) rather than by per-element shifts.
"""
from __future__ import annotations

import torch

from . import grids
from ._bits import as_bytes, field, half, nibble_words, spread_bits, words


def gather_rows(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out viewed as [k, width] <- table[idx] (idx: any int tensor of k entries, in element order)."""
    torch.index_select(table, 0, idx.reshape(-1).int(), out=out.view(-1, table.shape[1]))


def four_bit_scales(sc: torch.Tensor) -> torch.Tensor:
    """[n, m] bytes of two 4-bit scales -> float32 [n, 2m] (low nibble first)."""
    return grids.lanes("nibbles", sc).float()


def iq2_xxs(b, out):
    n = b.shape[0]
    aux = words(b, 2, 66, torch.int32).view(-1, 2)   # per 32 values: 4 grid bytes | 4 x 7 sign bits, scale
    a0, a1 = aux[:, 0].contiguous(), aux[:, 1].contiguous()
    idx = torch.stack([(((a0 >> (8 * k)) & 255) << 7) | ((a1 >> (7 * k)) & 127) for k in range(4)], dim=-1)
    gather_rows(grids.signed_grid("iq2xxs", b.device), idx, out)
    db = half(b, 0) * (0.5 + ((a1 >> 28) & 15).float().view(n, 8)) * 0.25
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


def iq2_xs(b, out):
    n = b.shape[0]
    qs = words(b, 2, 66, torch.int16).int() & 0xFFFF      # 9-bit grid index | 7-bit sign index << 9
    gather_rows(grids.signed_grid("iq2xs", b.device), qs, out)
    db = half(b, 0) * (0.5 + four_bit_scales(field(b, 66, 74))) * 0.25
    out.view(n, 16, 16).mul_(db.unsqueeze(-1))


def iq2_s(b, out):
    n = b.shape[0]
    hi = grids.lanes("crumbs", field(b, 66, 74)).int()          # 2 high index bits per 8 values
    gather_rows(grids.grid("iq2s", b.device), field(b, 2, 34).int() | (hi << 8), out)
    out.view(-1, 8).mul_(torch.index_select(grids.byte_signs(b.device), 0, field(b, 34, 66).reshape(-1).int()))
    db = half(b, 0) * (0.5 + four_bit_scales(field(b, 74, 82))) * 0.25
    out.view(n, 16, 16).mul_(db.unsqueeze(-1))


def iq3_xxs(b, out):
    n = b.shape[0]
    aux = words(b, 66, 98, torch.int32)                  # per 32 values: 4 x 7-bit sign index, 4-bit scale
    sign_idx = torch.stack([(aux >> (7 * k)) & 127 for k in range(4)], dim=-1)
    sign_nib = grids.lanes("ksign_nibbles", sign_idx)           # [n, 64]: the sign bits of each 4-value entry
    gather_rows(grids.signed_grid("iq3xxs", b.device), (field(b, 2, 66).int() << 4) | sign_nib.int(), out)
    db = half(b, 0) * (0.5 + ((aux >> 28) & 15).float()) * 0.5
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


def iq3_s(b, out):
    n = b.shape[0]
    hi = spread_bits(field(b, 66, 74), 1)                # 9th index bit: bit j of qh[ib] -> entry 8 ib + j
    idx = (field(b, 2, 66).int() | (hi.int() << 8)) << 4
    gather_rows(grids.signed_grid("iq3s", b.device), idx | grids.lanes("nibbles", field(b, 74, 106)).int(), out)
    db = half(b, 0) * (1 + 2 * grids.lanes("nibbles", field(b, 106, 110))).float()
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


def iq1_s(b, out):
    n = b.shape[0]
    qh = words(b, 34, 50, torch.int16).int() & 0xFFFF    # per 32 values: 4 x 3 index bits, scale, delta sign
    idx = field(b, 2, 34).short() | grids.lanes("iq1s_qh", qh)
    gather_rows(grids.iq1_grid_with_delta(b.device), idx, out)
    dl = half(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()
    out.view(n, 8, 32).mul_(dl.unsqueeze(-1))


def iq1_m(b, out):
    n = b.shape[0]
    sc = words(b, 48, 56, torch.int16).int() & 0xFFFF    # 4 words: 3-bit scales, fp16 d in the top nibbles
    d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = torch.where(d_bits >= 0x8000, d_bits - 0x10000, d_bits).to(torch.int16).view(torch.float16).float()
    idx = field(b, 0, 32).short() | grids.lanes("iq1m_qh", field(b, 32, 48))
    gather_rows(grids.iq1_grid_with_delta(b.device), idx, out)
    dl = d.unsqueeze(-1) * (2 * grids.lanes("iq1m_scales", sc) + 1).float()
    out.view(n, 16, 16).mul_(dl.unsqueeze(-1))


def iq4_nl(b, out):
    lo, hi = b & 15, b >> 4
    codes = torch.stack([lo[:, 2:18], hi[:, 2:18]], dim=1)
    torch.index_select(grids.kvalues("iq4nl", b.device), 0, codes.view(-1).int(), out=out.view(-1))
    out.mul_(half(b, 0))


def iq4_xs(b, out):
    n = b.shape[0]
    low4 = grids.lanes("nibbles", field(b, 4, 8))               # scale low nibbles, 2 per byte
    high2 = grids.lanes("crumbs", field(b, 2, 4))               # scale high bits, 4 per byte of the u16
    dl = half(b, 0) * ((low4 | (high2 << 4)).float() - 32)
    codes = as_bytes(torch.stack(nibble_words(words(b, 8, 136).view(n, 8, 2)), dim=2), n)
    torch.index_select(grids.kvalues("iq4nl", b.device), 0, codes.view(-1).int(), out=out.view(-1))
    out.view(n, 8, 32).mul_(dl.unsqueeze(-1))


DECODERS = {16: iq2_xxs, 17: iq2_xs, 22: iq2_s, 18: iq3_xxs, 21: iq3_s, 19: iq1_s, 29: iq1_m,
            20: iq4_nl, 23: iq4_xs}
