"""Block dequantization of every supported ggml type: one vectorized decoder per type, run over chunks
of blocks so temporaries stay small (a few MB on CPU, where they then live in cache) whatever the
tensor size. No loop over blocks or rows: a chunk holds thousands of blocks.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ...errors import ShapeMismatchError, UnsupportedError
from ...ggml_types import GGML_TYPES
from . import iquants, kquants, legacy, ternary_fp4
from ._bits import chunks

#: fn(blocks, out, *per-block scales): see _bits.with_scales
Decoder = Callable[..., None]

DECODERS: dict[int, Decoder] = {**legacy.DECODERS, **kquants.DECODERS, **iquants.DECODERS,
                                **ternary_fp4.DECODERS}

#: elements decoded per step. CPU: ~1M floats keeps each temporary in cache (measured best on a 2-core
#: VM; 4x more was 2x slower). CUDA: large steps amortize kernel launches, 64 MiB of float32 per step.
CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 24}
#: chunks whose per-block scales are computed together (at most ~1/8 of their float32 output, ~8 MB on CPU)
SCALE_WINDOW = 16


#: numpy twins of the output dtypes we allocate through numpy (bfloat16: same-size stand-in, viewed back)
_NP_STANDIN = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16,
               torch.float64: np.float64}
_HUGE_MIN_BYTES = 4 << 20


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, except for CPU tensors of 4 MB and more, which numpy allocates: numpy asks the kernel
    for transparent huge pages (madvise) and torch's allocator does not (unless THP_MEM_ALLOC_ENABLE=1).
    Writing a fresh 16 MB output was 4.5x slower with 4 KB pages on our VM, more than the decode itself.
    The tensor owns the numpy buffer (torch.from_numpy keeps it alive); it is an ordinary tensor."""
    n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or n_bytes < _HUGE_MIN_BYTES or dtype not in _NP_STANDIN:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NP_STANDIN[dtype])).view(dtype)


def supported_types() -> list[int]:
    return sorted(DECODERS)


def type_name(type_id: int) -> str:
    t = GGML_TYPES.get(type_id)
    return t.name if t is not None else f"unknown ggml type {type_id}"


def decoder(type_id: int) -> Decoder:
    fn = DECODERS.get(type_id)
    if fn is None:
        raise UnsupportedError(
            f"cannot dequantize {type_name(type_id)} (id {type_id}); supported: "
            f"{', '.join(GGML_TYPES[t].name for t in supported_types())}")
    return fn


def dequantize_blocks(type_id: int, blocks: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                      chunk_elems: int | None = None) -> torch.Tensor:
    """Dequantize raw ggml blocks: uint8 [..., k * type_size] -> dtype [..., k * block_size].

    Typical inputs are [n_blocks, type_size] or [rows, row_bytes]. The math is gguf-py's, in float32;
    a different `dtype` is a final cast of each chunk.
    """
    fn = decoder(type_id)
    t = GGML_TYPES[type_id]
    if blocks.dtype != torch.uint8:
        raise ShapeMismatchError(f"{t.name} blocks must be uint8, got {blocks.dtype}")
    last = blocks.shape[-1] if blocks.dim() else 0
    if blocks.dim() == 0 or last % t.type_size:
        raise ShapeMismatchError(f"{t.name} blocks: last dimension {last} is not a multiple of the "
                                 f"{t.type_size}-byte block (shape {tuple(blocks.shape)})")
    out_shape = (*blocks.shape[:-1], last // t.type_size * t.block_size)
    flat = blocks.reshape(-1, t.type_size)
    if not flat.is_contiguous() or flat.storage_offset() % 8:
        flat = flat.clone(memory_format=torch.contiguous_format)   # decoders view rows as 2/4/8-byte words
    n = flat.shape[0]
    out = empty_output((n, t.block_size), dtype, blocks.device)
    if n == 0 or blocks.is_meta:
        return out.reshape(out_shape)
    if chunk_elems is None:
        chunk_elems = CHUNK_ELEMS.get(blocks.device.type, CHUNK_ELEMS["cuda"])
    step = max(1, chunk_elems // t.block_size)
    scratch = None if dtype == torch.float32 else torch.empty((min(n, step), t.block_size),
                                                                device=blocks.device)
    # Per-block scales, where the decoder has that step (_bits.with_scales), for a window of
    # SCALE_WINDOW chunks at once: fewer small ops than per chunk, bounded memory for huge tensors.
    window = step * SCALE_WINDOW
    for ws, we in chunks(n, window):
        scales = fn.scales(flat[ws:we]) if hasattr(fn, "scales") else ()
        for s, e in chunks(we - ws, step):
            dst = out[ws + s:ws + e] if scratch is None else scratch[:e - s]
            fn(flat[ws + s:ws + e], dst, *(scale[s:e] for scale in scales))
            if scratch is not None:
                out[ws + s:ws + e].copy_(dst)
    return out.reshape(out_shape)
