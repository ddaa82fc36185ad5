"""Byte-level helpers shared by the GGUF block decoders.

Everything takes uint8 blocks `b` [n, type_size] (contiguous rows of one chunk) and works the same on
CPU and CUDA. Multi-byte fields are little-endian (GGUF is LE and so is every host torch runs on).

Why the code looks the way it does (measured on CPU, where eager torch is weakest):
- an op over a narrow slice such as b[:, 2:18] pays a per-row cost larger than its arithmetic, and an op
  that broadcasts a small tensor operand (x >> tensor([0, 2, 4, 6])) is ~10x slower than with a scalar;
- so each byte array is copied out once (`field`), reinterpreted as int64 words, and bit-sliced with
  scalar shifts and byte-replicated masks: (w >> s) & (m * 0x0101010101010101) extracts the same bits of
  8 bytes at once and never mixes neighbouring bytes as long as m < 2**(8 - s);
- per-block scalars (fp16 d, ...) are read through a strided 1-element view, which loops without
  per-row cost.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

#: byte-replicated masks for 8-bytes-at-a-time bit slicing of int64 words
REP = 0x0101010101010101


def rep(mask: int) -> int:
    """`mask` replicated in the 8 bytes of an int64 (mask < 0x80)."""
    return mask * REP


@functools.lru_cache(maxsize=None)
def const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table, built once per device."""
    return torch.tensor(values, dtype=dtype, device=device)


def field(b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The bytes start:stop of every block, as a compact uint8 [n, stop - start] (one copy, always: a
    one-row slice counts as contiguous but keeps the block stride, which wider views refuse)."""
    return b[:, start:stop].clone(memory_format=torch.contiguous_format)


def words(b: torch.Tensor, start: int, stop: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The bytes start:stop of every block as little-endian words of `dtype`, [n, (stop - start) / size]."""
    return field(b, start, stop).view(dtype)


def _viewable(b: torch.Tensor, size: int) -> bool:
    """Whether the byte slice `b` can be reinterpreted in place as `size`-byte words (aligned strides)."""
    return (b.stride(-1) == 1 and b.storage_offset() % size == 0
            and all(st % size == 0 for st in b.stride()[:-1]))


def scalar(b: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """The `dtype` field at byte `offset` of each block, as a 1-D [n] tensor (a strided view when aligned,
    else a copy of those bytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    f = b[:, offset:offset + size]
    return (f if _viewable(f, size) else f.contiguous()).view(dtype)[:, 0]


def half(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of each block, as float32 [n, 1] (exact). Few ops on purpose: on a
    busy CPU each eager op costs microseconds, and this runs once or twice per chunk."""
    f = b[:, offset:offset + 2]
    if b.stride(0) % 2 or (b.storage_offset() + offset) % 2:
        f = f.contiguous()
    return f.view(torch.float16).float()


def nibble_words(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int words -> (low nibbles, high nibbles) of each of their bytes, in place of the byte."""
    m = rep(15) if w.dtype == torch.int64 else 0x0F0F0F0F
    return w & m, (w >> 4) & m


def as_bytes(words_: torch.Tensor, n: int) -> torch.Tensor:
    """Reinterpret (stacked) int words of n blocks as uint8 [n, -1], in memory order."""
    return words_.contiguous().view(torch.uint8).view(n, -1)


@functools.lru_cache(maxsize=None)
def spread_bits_lut(one: int, zero: int, device: torch.device) -> torch.Tensor:
    """int64 [256]: entry v, read as 8 little-endian bytes, has byte i = `one` if bit i of v is set, else
    `zero`."""
    v = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
    per_byte = torch.where((v >> torch.arange(8)) & 1 == 1, one, zero).to(torch.uint8)
    return per_byte.contiguous().view(torch.int64).reshape(256).to(device)


def spread_bits(bytes_: torch.Tensor, one: int, zero: int = 0) -> torch.Tensor:
    """uint8 [n, m] bit-flag bytes -> uint8 [n, 8m]: element 8k+i is `one` if bit i of byte k is set, else
    `zero` (so bit j of a little-endian bit field lands on element j). One 1-D gather per byte."""
    n = bytes_.shape[0]
    idx = bytes_.int().reshape(-1)
    return torch.index_select(spread_bits_lut(one, zero, bytes_.device), 0, idx).view(torch.uint8).view(n, -1)


def planar(b: torch.Tensor, start: int, shape: tuple) -> torch.Tensor:
    """The bytes from `start` of each block, seen as `shape` (e.g. (2, 32) for two halves of 32 bytes),
    copied once into plane-major order [*shape[:-1], n, shape[-1]]. Work on that layout runs over long
    contiguous rows; see `cut` and `to_elements`."""
    n, size = b.shape[0], 1
    for s in shape:
        size *= s
    field_ = b[:, start:start + size].view(n, *shape)
    return field_.movedim(0, -2).clone(memory_format=torch.contiguous_format)


def cut(w: torch.Tensor, shifts: tuple, mask: int, dim: int = 0) -> torch.Tensor:
    """Bit planes (w >> s) & mask for each s, stacked along a new dimension `dim` placed before the
    block dimension, so each op runs as a few long rows (the shifts broadcast along outer dims only)."""
    shape = [1] * (w.dim() + 1)
    shape[dim] = len(shifts)
    sh = const(shifts, w.dtype, w.device).view(shape)
    return (w.unsqueeze(dim) >> sh) & mask


def copy_planes(out: torch.Tensor, planes) -> None:
    """out [n, ...] viewed as [n, len(planes), m] <- planes (each [n, m], any strides, any int dtype),
    casting on the way. One copy per plane: for these 16-element rows a single copy of a stacked,
    permuted view picks a loop order that measured ~2x slower (for the K-quants' 32-element rows of
    `to_elements` the single copy measured faster)."""
    dst = out.view(out.shape[0], len(planes), -1)
    for p, plane in enumerate(planes):
        dst[:, p].copy_(plane)


def to_elements(out: torch.Tensor, codes: torch.Tensor) -> None:
    """Copy plane-major codes [*planes, n, m] (any int dtype, any number of plane dims) into `out` [n, ...]
    in element order [n, *planes, m], casting to float on the way: the one rearranging pass."""
    n = out.shape[0]
    out.view(n, *codes.shape[:-2], codes.shape[-1]).copy_(codes.movedim(-2, 0))


def chunks(n: int, step: int):
    """(start, stop) ranges covering 0..n in steps of `step`."""
    return ((s, min(n, s + step)) for s in range(0, n, step))


def with_scales(scales: Callable[[torch.Tensor], tuple]):
    """Give a decoder its per-block scale step: `scales(b)` -> tensors with the block dimension first,
    computed by dequantize_blocks once per window of chunks and sliced per chunk, then passed after
    `out`. These are small ops whose fixed cost is the point: for the K-quants ~30 of them, run per
    chunk they were about a third of the decode time on a busy 2-core VM."""
    def attach(fn):
        fn.scales = scales
        return fn
    return attach
