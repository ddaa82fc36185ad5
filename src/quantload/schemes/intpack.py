"""Bit (un)packing of small unsigned integer codes, shared by every integer scheme.

Two families of layout exist in the wild (formats.md §8):

* **streams**: codes laid end to end in little-endian int32 words, field k at bit k*bits, least
  significant bits first (GPTQ, compressed-tensors pack-quantized, AWQ). With 2/4/8 bits a word holds
  32/bits whole fields; with 3/5/6/7 bits fields straddle words. The "padded" variant (old
  compressed-tensors odd widths) puts 32//bits fields in each word and leaves the top bits unused.
* **planes**: a tensor is cut into slices along dim 0 and the slices are stacked into the bits of one
  container element (HQQ, optimum-quanto).

Everything here is vectorized torch and runs unchanged on CPU and CUDA. Unpacked codes are int32
(values 0..2^bits-1); packed words are int32 holding the bit pattern (the file's signed int32).
"""
from __future__ import annotations

import torch

_U32 = 1 << 32


def packed_len(n: int, bits: int) -> int:
    """Words a dense stream of n fields of `bits` bits occupies."""
    return -(-n * bits // 32)


def padded_len(n: int, bits: int) -> int:
    """Words the padded layout (32 // bits whole fields per word) occupies."""
    return -(-n // (32 // bits))


def _as_signed_int32(words64: torch.Tensor) -> torch.Tensor:
    """int64 holding 0..2^32-1 -> the same bit pattern as int32 (what safetensors stores)."""
    return torch.where(words64 >= (1 << 31), words64 - _U32, words64).to(torch.int32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def unpack_stream(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """The first n fields of the little-endian bit stream held by int32 `words` along `dim`.

    Returns int32 codes with `dim` resized to n. Whole-field widths (32 % bits == 0) shift words in
    int32 (arithmetic shifts are harmless: the mask keeps only bits inside the word); other widths
    gather the word below and above each field in int64.
    """
    _check_bits(bits)
    w = words.movedim(dim, -1)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int32)
        codes = ((w.to(torch.int32).unsqueeze(-1) >> shifts) & mask).flatten(-2)[..., :n]
    else:
        w64 = torch.nn.functional.pad(w.to(torch.int64) & (_U32 - 1), (0, 1))
        start = torch.arange(n, device=w.device, dtype=torch.int64) * bits
        idx, off = start // 32, start % 32
        lo = w64[..., idx] >> off
        hi = w64[..., idx + 1] << (32 - off)
        codes = ((lo | hi) & mask).to(torch.int32)
    return codes.movedim(-1, dim)


def pack_stream(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """The inverse of unpack_stream: codes (0..2^bits-1, any int dtype) along `dim` -> int32 words,
    ceil(n*bits/32) of them; padding bits are 0."""
    _check_bits(bits)
    c = codes.movedim(dim, -1).to(torch.int64) & ((1 << bits) - 1)
    n = c.shape[-1]
    nw = packed_len(n, bits)
    if 32 % bits == 0:
        per = 32 // bits
        c = torch.nn.functional.pad(c, (0, nw * per - n)).unflatten(-1, (nw, per))
        shifts = torch.arange(0, 32, bits, device=c.device, dtype=torch.int64)
        words = (c << shifts).sum(-1)           # disjoint fields: the sum is the OR
    else:
        start = torch.arange(n, device=c.device, dtype=torch.int64) * bits
        idx, off = start // 32, start % 32
        words = torch.zeros((*c.shape[:-1], nw + 1), dtype=torch.int64, device=c.device)
        words.index_add_(words.ndim - 1, idx, (c << off) & (_U32 - 1))
        words.index_add_(words.ndim - 1, idx + 1, c >> (32 - off))   # the straddling high part
        words = words[..., :nw]
    return _as_signed_int32(words).movedim(-1, dim).contiguous()


def unpack_padded(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """The padded layout: 32 // bits whole fields per word, low bits first, top bits unused."""
    _check_bits(bits)
    per = 32 // bits
    w = words.movedim(dim, -1).to(torch.int32)
    shifts = torch.arange(per, device=w.device, dtype=torch.int32) * bits
    codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :n]
    return codes.movedim(-1, dim)


def pack_padded(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """The inverse of unpack_padded."""
    _check_bits(bits)
    per = 32 // bits
    c = codes.movedim(dim, -1).to(torch.int64) & ((1 << bits) - 1)
    n = c.shape[-1]
    nw = -(-n // per)
    c = torch.nn.functional.pad(c, (0, nw * per - n)).unflatten(-1, (nw, per))
    shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
    return _as_signed_int32((c << shifts).sum(-1)).movedim(-1, dim).contiguous()


def unpack_planes(packed: torch.Tensor, bits: int, shifts: list[int]) -> torch.Tensor:
    """Planar layout: slice k of the unpacked tensor (along dim 0) sits at bit `shifts[k]` of every
    packed element, so the result has len(shifts) * packed.shape[0] rows. Integer containers only
    (uint8 or int32); the codes come back as int32."""
    s = torch.tensor(shifts, device=packed.device, dtype=torch.int32).view(-1, *([1] * packed.ndim))
    planes = (packed.to(torch.int32).unsqueeze(0) >> s) & ((1 << bits) - 1)
    return planes.flatten(0, 1)


def pack_planes(codes: torch.Tensor, bits: int, shifts: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The inverse of unpack_planes: rows are zero-padded to a multiple of len(shifts)."""
    k = len(shifts)
    rows = codes.shape[0]
    step = -(-rows // k)
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    c = torch.cat([c, c.new_zeros((step * k - rows, *c.shape[1:]))]).unflatten(0, (k, step))
    s = torch.tensor(shifts, device=c.device, dtype=torch.int64).view(-1, *([1] * (c.ndim - 1)))
    words = (c << s).sum(0)
    if dtype == torch.int32:
        return _as_signed_int32(words)
    return words.to(dtype)
