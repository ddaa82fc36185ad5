"""Bit (un)packing of small unsigned integer codes, shared by every integer scheme.

Two families of layout exist in the wild (docs/formats.md §8):

* **streams**: codes laid end to end in little-endian int32 words, field k at bit k*bits, least
  significant bits first (GPTQ, compressed-tensors pack-quantized, AWQ). With 2/4/8 bits a word holds
  32/bits whole fields; with 3/5/6/7 bits fields straddle words. The "padded" variant (old
  compressed-tensors odd widths) puts 32//bits fields in each word and leaves the top bits unused.
* **planes**: a tensor is cut into slices along dim 0 and the slices are stacked into the bits of one
  container element (HQQ, optimum-quanto).

Everything here is vectorized torch and runs unchanged on CPU and CUDA. Unpacked codes are unsigned
(values 0..2^bits-1), int32 unless asked for uint8; packed words are int32 holding the bit pattern (the
file's signed int32). Widths that divide 8 (1/2/4/8 bits, nearly every checkpoint) are handled a byte at a
time: a little-endian int32 word is 4 bytes holding fields in order, so unpacking never widens the
weight beyond one byte per code.
"""
from __future__ import annotations

import sys

import torch

# a little-endian word's bytes are its fields in order (CUDA devices are little-endian; only a
# big-endian CPU host takes the int32 path)
_BYTES_OK = sys.byteorder == "little"

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


def _bytewise(t: torch.Tensor, bits: int) -> bool:
    return 8 % bits == 0 and (_BYTES_OK or t.device.type != "cpu")


def _word_fields(words: torch.Tensor, bits: int, per: int, dim: int, out_dtype) -> torch.Tensor:
    """The first `per` fields (at bits 0, bits, 2*bits, ...) of every word, the new axis merged into
    `dim` right after each word's position: [R, O] words packed down dim 0 become [R * per, O]."""
    mask = (1 << bits) - 1
    if _bytewise(words, bits) and per * bits == 32:
        w = words.to(torch.int32).contiguous()
        # through 1-d: a size-1 last dim may carry any stride, which view(uint8) refuses
        b = w.view(-1).view(torch.uint8).view(*w.shape, 4)                              # [..., W, 4]
        s = torch.arange(0, 8, bits, device=words.device, dtype=torch.uint8)
        f = ((b.unsqueeze(-1) >> s) & mask).flatten(-2)                                  # [..., W, per]
        if dim != words.ndim - 1:
            f = f.movedim(-1, dim + 1)
        return f.flatten(dim, dim + 1).to(out_dtype)
    view = [1] * (words.ndim + 1)
    view[dim + 1] = per
    s = (torch.arange(per, device=words.device, dtype=torch.int32) * bits).view(view)
    # arithmetic shifts are harmless: the mask keeps only bits inside the word
    f = (words.to(torch.int32).unsqueeze(dim + 1) >> s) & mask
    return f.flatten(dim, dim + 1).to(out_dtype)


def unpack_stream(words: torch.Tensor, bits: int, n: int, dim: int = -1, *,
                  dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The first n fields of the little-endian bit stream held by int32 `words` along `dim`, as `dtype`
    codes with `dim` resized to n. Widths dividing 32 split whole words; other widths (3/5/6/7) read each
    field's low part from its word and, for fields straddling a word boundary, OR in the high part from
    the next word (int32, like compressed-tensors' unpacker)."""
    _check_bits(bits)
    dim = dim % words.ndim
    if 32 % bits == 0:
        return _word_fields(words, bits, 32 // bits, dim, dtype).narrow(dim, 0, n)
    w = words.to(torch.int32)
    start = torch.arange(n, device=w.device, dtype=torch.int32) * bits
    idx, off = (start // 32).long(), start % 32
    lo_bits = torch.clamp(32 - off, max=bits)
    view = [1] * w.ndim
    view[dim] = n
    codes = (w.index_select(dim, idx) >> off.view(view)) & ((1 << lo_bits) - 1).view(view)
    straddle = (lo_bits < bits).nonzero().squeeze(1)
    if straddle.numel():
        view[dim] = straddle.numel()
        lo = lo_bits[straddle]
        hi = (w.index_select(dim, idx[straddle] + 1) & ((1 << (bits - lo)) - 1).view(view)) << lo.view(view)
        codes.index_add_(dim, straddle, hi)          # disjoint bits: the add is the OR
    return codes.to(dtype)


def _join_fields(c: torch.Tensor, bits: int, per: int) -> torch.Tensor:
    """[..., m] codes (last dim) -> [..., ceil(m/per)] int32 words of `per` fields, field k at bit k*bits.
    A loop over the few fields of a byte or word, vectorized over everything else."""
    m = c.shape[-1]
    nw = -(-m // per)
    mask = (1 << bits) - 1
    if _bytewise(c, bits) and per * bits == 32:
        pb = 8 // bits
        c = torch.nn.functional.pad(c.to(torch.uint8) & mask, (0, nw * per - m)).unflatten(-1, (-1, pb))
        b = c[..., 0].clone()
        for k in range(1, pb):
            b |= c[..., k] << (k * bits)
        return b.contiguous().view(-1).view(torch.int32).view(*b.shape[:-1], -1)
    c = torch.nn.functional.pad(c.to(torch.int32) & mask, (0, nw * per - m)).unflatten(-1, (nw, per))
    words = c[..., 0].clone()
    for k in range(1, per):
        words |= c[..., k] << (k * bits)             # int32 shifts wrap into the sign bit, as wanted
    return words


def pack_stream(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """The inverse of unpack_stream: codes (0..2^bits-1, any int dtype) along `dim` -> int32 words,
    ceil(n*bits/32) of them; padding bits are 0."""
    _check_bits(bits)
    c = codes.movedim(dim, -1).contiguous()
    if 32 % bits == 0:
        return _join_fields(c, bits, 32 // bits).movedim(-1, dim).contiguous()
    c = c.to(torch.int64) & ((1 << bits) - 1)
    n = c.shape[-1]
    nw = packed_len(n, bits)
    start = torch.arange(n, device=c.device, dtype=torch.int64) * bits
    idx, off = start // 32, start % 32
    words = torch.zeros((*c.shape[:-1], nw + 1), dtype=torch.int64, device=c.device)
    words.index_add_(words.ndim - 1, idx, (c << off) & (_U32 - 1))
    words.index_add_(words.ndim - 1, idx + 1, c >> (32 - off))   # the straddling high part
    return _as_signed_int32(words[..., :nw]).movedim(-1, dim).contiguous()


def unpack_padded(words: torch.Tensor, bits: int, n: int, dim: int = -1, *,
                  dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The padded layout: 32 // bits whole fields per word, low bits first, top bits unused."""
    _check_bits(bits)
    dim = dim % words.ndim
    return _word_fields(words, bits, 32 // bits, dim, dtype).narrow(dim, 0, n)


def pack_padded(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """The inverse of unpack_padded."""
    _check_bits(bits)
    return _join_fields(codes.movedim(dim, -1).contiguous(), bits, 32 // bits).movedim(-1, dim).contiguous()


def unpack_planes(packed: torch.Tensor, bits: int, shifts: list[int]) -> torch.Tensor:
    """Planar layout: slice k of the unpacked tensor (along dim 0) sits at bit `shifts[k]` of every
    packed element, so the result has len(shifts) * packed.shape[0] rows. Integer containers only;
    the codes come back in the container's dtype for uint8 (one byte per code), else int32."""
    work = torch.uint8 if packed.dtype == torch.uint8 else torch.int32
    s = torch.tensor(shifts, device=packed.device, dtype=work).view(-1, *([1] * packed.ndim))
    planes = (packed.to(work).unsqueeze(0) >> s) & ((1 << bits) - 1)
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
