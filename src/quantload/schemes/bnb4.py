"""bitsandbytes 4-bit (NF4 / FP4) as `Linear4bit` / `Params4bit` write it: docs/formats.md §1. Plain torch,
bitsandbytes is never imported.

Per Linear weight of n = O*I elements, blocks of `blocksize` consecutive elements of the flattened weight:
  weight                                 quant_storage [ceil(n/2)/itemsize, 1]  two codes a byte, high nibble first
  weight.absmax                          float32 [nb]  (uint8 codes [nb] with double quant)
  weight.quant_map                       float32 [16]  the NF4 or FP4 table
  weight.nested_absmax                   float32 [ceil(nb/256)]   double quant only
  weight.nested_quant_map                float32 [256]            double quant only: the "dynamic" map
  weight.quant_state.bitsandbytes__nf4   uint8 [len]   UTF-8 JSON: quant_type, blocksize, dtype, shape
                                                       (+ nested_blocksize, nested_dtype, nested_offset)
W = table[code] * absmax[block] in float32, then cast; with double quant
absmax = dynamic[absmax_code] * nested_absmax[block // 256] + nested_offset.

Rounding follows bitsandbytes' pure-torch backend (`backends/default/ops.py`), which is what bnb runs on
CPU for the 4-bit codes and what its CUDA kernels compute for ordinary values (exact nearest, ties to the
lower code). Where the bnb CPU C++ backend rounds differently (the nested absmax codes) see
`_quantize_blockwise_dynamic`.
"""
from __future__ import annotations

import functools
import json
import math
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from ..config import parse_dtype
from ..errors import ConfigError, MissingTensorError, QuantStateError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import full_key

QUANT_TYPES = ("nf4", "fp4")
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # hard-coded in bitsandbytes.functional.quantize_4bit
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QS_PREFIX = "weight.quant_state."
QS_TYPE_PREFIX = "bitsandbytes__"
_COMPANIONS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_JSON_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")

# The two 16-entry tables as float32 bit patterns (docs/formats.md §1.4), index = 4-bit code.
_TABLE_BITS = {
    "nf4": (0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
            0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000),
    "fp4": (0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
            0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000),
}
# Codes in ascending order of value: bucket b of the sorted table -> code. NF4 is sorted already. For FP4
# this is what bnb's `torch.argsort(code)` gives on CPU, ties included: +0.0 (code 0) before the second
# zero (code 8), so 0.0 -> code 0 but (0, 0.0026] -> code 8. Hard-coded so every device agrees.
_BUCKET_TO_CODE = {
    "nf4": tuple(range(16)),
    "fp4": (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3),
}
# Kernels work through the weight in chunks of this many elements: scratch memory stays bounded (about
# 13 bytes an element) and, on CPU, mostly in cache. Measured with one intra-op thread on the shared
# 2-core machine (python -m bench --threads 1): 2^18..2^20 all ~11x/1x bnb, 2^22 ~5x/0.94x. With
# several threads on a busy machine, each op is a parallel region that can stall: smaller chunks pay more.
_CPU_CHUNK = 1 << 20
_GPU_CHUNK = 1 << 24


def _floats(bits) -> torch.Tensor:
    return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 table bitsandbytes writes as `weight.quant_map`."""
    return _floats(_TABLE_BITS[quant_type])


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bnb's 256-entry signed "dynamic" map (`create_dynamic_map()`), the double-quant codebook."""
    text = resources.files(__package__).joinpath("dynamic_map_float32_hex.txt").read_text()
    bits = [int(line.split()[1], 16) for line in text.splitlines() if line.strip()]
    if len(bits) != 256:
        raise RuntimeError(f"dynamic_map_float32_hex.txt has {len(bits)} entries, expected 256")
    return _floats(bits)


# --- lookup tables (built once per quant type and device) -----------------------------------------
class _Tables:
    """pair_lut[byte] = (table[byte >> 4], table[byte & 15]); pair_bits: the same pairs as int64
    (dequantization).

    Quantizing: a float32 s is first located by its top 16 bits p (a run of 65536 adjacent floats). The
    codes are so far apart that each run holds at most one decision threshold t_p (+inf where none), so
    the exact code is code_of[2p + (s > t_p)]. (s > t_p) is read off the sign bit of t_p - s: float
    comparisons are several times slower than a subtraction in torch on CPU, and t_p - s is negative
    exactly when s > t_p (+0 when equal). Where a run holds no threshold both slots hold the same code,
    so NaN differences cannot matter. Tables are indexed by 2p (threshold[2p] = t_p). This is bnb's
    `bucketize(s, midpoints)` bit for bit, NaN and +-inf included, without a binary search."""

    def __init__(self, quant_type: str, device: torch.device):
        table = code_table(quant_type)
        byte = torch.arange(256)
        self.table = table.to(device)
        self.pair_lut = torch.stack([table[byte >> 4], table[byte & 15]], 1).contiguous().to(device)
        # the same float32 pairs, each read as one int64: a gather of 8-byte elements (the fast case)
        self.pair_bits = self.pair_lut.view(torch.int64).view(-1)
        order = torch.tensor(_BUCKET_TO_CODE[quant_type])
        ascending = table[order]
        midpoints = (ascending[:-1] + ascending[1:]) / 2          # float32, as bnb computes them
        bits = np.arange(65536, dtype=np.uint32) << 16
        first = torch.from_numpy(bits.view(np.float32).copy())     # +-(top bits, low bits zero)
        last = torch.from_numpy((bits | 0xFFFF).view(np.float32).copy())
        # the runs starting at +-inf hold +-inf and NaN payloads: take their code from +-inf
        last = torch.where(last.isnan() & first.isinf(), first, last)
        lo, hi = torch.minimum(first, last), torch.maximum(first, last)
        b_lo, b_hi = torch.bucketize(lo, midpoints), torch.bucketize(hi, midpoints)  # NaN -> 15, as bnb
        if int((b_hi - b_lo).max()) > 1:
            raise AssertionError("a 16-bit float run spans two quantization thresholds")
        crosses = b_hi > b_lo
        threshold = torch.where(crosses, midpoints[b_lo.clamp(max=14)], torch.tensor(float("inf")))
        self.threshold = threshold.repeat_interleave(2).contiguous().to(device)
        above = torch.where(crosses, b_lo + 1, b_lo)
        code_of = torch.stack([order[b_lo], order[above]], 1).reshape(-1).to(torch.uint8)
        self.code_of = code_of.to(device)


@functools.cache
def _tables(quant_type: str, device: torch.device) -> _Tables:
    return _Tables(quant_type, device)


@functools.cache
def _dynamic_on(device: torch.device) -> torch.Tensor:
    return dynamic_map().to(device)


def _chunk_elements(x: torch.Tensor, total: int, blocksize: int) -> int:
    """Elements per chunk: a whole number of blocks, at least one block."""
    target = _CPU_CHUNK if x.device.type == "cpu" else _GPU_CHUNK
    return max(1, target // blocksize) * blocksize


# --- kernels ----------------------------------------------------------------------------------------
def _block_absmax(blocks: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """max |x| per row, as float32. Clearing the sign bit and taking an integer max is exact (NaN stays
    NaN) and cheaper than abs() + amax on floats. `scratch`: an int32 buffer of at least as many
    elements, to hold the sign-cleared bits without allocating."""
    bits = torch.int32 if blocks.dtype == torch.float32 else torch.int16
    out = None if scratch is None else scratch.view(bits)[: blocks.numel()].view(blocks.shape)
    magnitude = torch.bitwise_and(blocks.view(bits), 0x7FFFFFFF if bits == torch.int32 else 0x7FFF, out=out)
    return magnitude.amax(1).view(blocks.dtype).float()


class _CodeScratch:
    """Work buffers for `_pack_codes_into`, allocated once per call (with huge pages) and reused by every
    chunk: fresh multi-megabyte temporaries per chunk cost more (page faults) than the arithmetic."""

    def __init__(self, elements: int, device):
        self.scaled = kernels.empty_large(elements, torch.float32, device)
        self.run = kernels.empty_large(elements, torch.int32, device)
        self.threshold = kernels.empty_large(elements, torch.float32, device)
        self.upcast = self.threshold    # the upcast input is consumed before thresholds are gathered
        self.codes = torch.empty(elements, dtype=torch.uint8, device=device)


def _pack_codes_into(scaled: torch.Tensor, t: _Tables, out: torch.Tensor, buf: _CodeScratch) -> None:
    """Exact nearest 4-bit code of each float32 in `scaled` (even length), packed two a byte into `out`,
    the even element in the high nibble."""
    m = scaled.numel()
    slot, diff, codes = buf.run[:m], buf.threshold[:m], buf.codes[:m]
    torch.bitwise_right_shift(scaled.view(torch.int32), 15, out=slot)
    slot.bitwise_and_(0x1FFFE)                                   # 2p
    torch.index_select(t.threshold, 0, slot, out=diff)
    diff.sub_(scaled)                                            # t_p - s < 0  <=>  s > t_p
    sign = diff.view(torch.int32).bitwise_right_shift_(31)       # -1 where s > t_p, else 0
    slot.sub_(sign)
    torch.index_select(t.code_of, 0, slot, out=codes)
    torch.add(codes[1::2], codes[0::2], alpha=16, out=out)      # (even << 4) | odd, in one op


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)]): the bytes of bnb's quantize_4bit.

    Like bnb's default backend: full blocks multiply by 1/max(absmax, 1e-38) and store the raw absmax;
    a partial last block divides by max(absmax, 1e-38) and stores that clamped value; an odd element
    count pads with a 0.0 (code 7 for NF4, 0 for FP4) in the last low nibble."""
    t = _tables(quant_type, x.device)
    flat = x.reshape(-1)
    n = flat.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    packed = kernels.empty_large((n + 1) // 2, torch.uint8, x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    step = _chunk_elements(flat, full, blocksize)
    buf = _CodeScratch(max(min(step, full), blocksize + 1), x.device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        blocks = flat[start:stop].view(-1, blocksize)
        am = _block_absmax(blocks, buf.run)
        absmax[start // blocksize: stop // blocksize] = am
        if blocks.dtype != torch.float32:   # one contiguous upcast: a mixed-dtype mul would copy anyway
            blocks = buf.upcast[: stop - start].view(-1, blocksize).copy_(blocks)
        scaled = buf.scaled[: stop - start]
        torch.mul(blocks, (1.0 / am.clamp(min=1e-38)).unsqueeze(1), out=scaled.view(-1, blocksize))
        _pack_codes_into(scaled, t, packed[start // 2: stop // 2], buf)
    if full < n:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[n_full] = am
        _pack_codes_into(F.pad(tail / am, (0, (n - full) % 2)), t, packed[full // 2:], buf)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, quant_type: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Flat [n] tensor of `dtype`: table[code] * absmax[block] in float32, rounded once to dtype (the
    C++ and torch kernels of bnb do exactly this).

    Per chunk of whole blocks: each byte becomes its two float32 table values in one gather (a 256-entry
    table of float pairs, read as int64 so the gather moves one 8-byte element), the pairs are scaled
    in place by their block's absmax on a [blocks, blocksize] view, and written once into the output
    (for float32 the output itself is the scratch). The output is allocated with huge pages: its first
    touch is otherwise ~40% of the time (one page fault per 4 KiB)."""
    t = _tables(quant_type, packed.device)
    out = kernels.empty_large(n, dtype, packed.device)
    n_full = n // blocksize
    full = n_full * blocksize
    step = _chunk_elements(packed, full, blocksize)
    chunk = min(step, full)
    byte = torch.empty(chunk // 2, dtype=torch.int32, device=packed.device)
    scratch = None if dtype == torch.float32 else torch.empty(chunk, dtype=torch.float32, device=packed.device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        k = (stop - start) // blocksize
        b = byte[: (stop - start) // 2]
        b.copy_(packed[start // 2: stop // 2])
        f = out[start:stop] if scratch is None else scratch[: stop - start]
        torch.index_select(t.pair_bits, 0, b, out=f.view(torch.int64))
        f.view(k, blocksize).mul_(absmax[start // blocksize: stop // blocksize].unsqueeze(1))
        if scratch is not None:
            out[start:stop].copy_(f)
    if full < n:
        tail = t.pair_lut.index_select(0, packed[full // 2:].to(torch.int32)).view(-1)[: n - full]
        torch.mul(tail, absmax[n_full], out=out[full:])
    return out


def _quantize_blockwise_dynamic(a: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """bnb `quantize_blockwise(a, blocksize=256)` with the dynamic map: (uint8 codes, float32 absmax).

    Rounds to the exact nearest map entry, like bnb's pure-torch default backend (torch.bucketize over
    the midpoints) and its CUDA kernel (a binary search). bnb's CPU C++ kernel instead looks the code
    up in a 65536-bin approximation and near a midpoint can land a code or a few off (about 1 absmax
    code in 1000 on random data, never more than 2^-15 of the run's absmax farther than the nearest);
    and for a 256-run of absmax values that all equal their mean (e.g. a weight of one block) it writes
    nested_absmax 0 and code 0 where this (like the default backend) writes 0 (a full run) or 1e-38
    (the last, partial run) and the code of 0.0. Each variant decodes to nearly the same absmax, and
    readers are unaffected: they decode whatever codes the file holds."""
    code = _dynamic_on(a.device)
    n = a.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    blocks = a[:full].view(n_full, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, (a[full:] / am).clamp(-1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


def dequantize_nested_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float,
                             nested_blocksize: int, nested_map: torch.Tensor | None = None,
                             nested_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 absmax = map[code] * nested_absmax[i // nested_blocksize] + offset (two roundings, as bnb).
    With a 16-bit nested_dtype (bnb writes it when it re-quantizes the statistics of a weight its
    AVX512-BF16 path converted) bnb rounds the product to that dtype, adds the float32 offset in place
    (torch's own in-place add on that dtype) and widens to float32: the same ops, done here."""
    nested_map = _dynamic_on(codes.device) if nested_map is None else nested_map
    nb = codes.numel()
    vals = nested_map.index_select(0, codes.to(torch.int32))
    vals = F.pad(vals, (0, nested_absmax.numel() * nested_blocksize - nb)).view(-1, nested_blocksize)
    absmax = (vals * nested_absmax.unsqueeze(1)).view(-1)[:nb]
    if nested_dtype != torch.float32:
        absmax = absmax.to(nested_dtype)
        absmax += torch.tensor(offset, dtype=torch.float32, device=absmax.device)
        return absmax.float()
    return absmax + offset   # offset is a float32 value: the sum rounds exactly as bnb's float32 add


# --- the scheme -------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).strip("torch.")  # bnb's own spelling (QuantState.as_dict); strip is a char set


def _storage_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and isinstance(getattr(torch, d.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, d.removeprefix("torch."))
    raise ConfigError(f"quant_storage={d!r} is not a torch dtype")


class Bnb4Scheme(Scheme):
    """bitsandbytes NF4/FP4. The scheme's parameters are what `quantize` writes; `decode` follows each
    layer's own quant_state JSON (which is authoritative) and returns a QTensor whose scheme matches it."""

    param_name = "weight"

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 compute_dtype=None, quant_storage=torch.uint8):
        if quant_type not in QUANT_TYPES:
            raise UnsupportedError(f"bitsandbytes 4-bit quant_type {quant_type!r} is not supported; "
                                   f"expected one of {list(QUANT_TYPES)}")
        if blocksize not in VALID_BLOCKSIZES:
            raise UnsupportedError(f"bitsandbytes 4-bit blocksize {blocksize!r} is not supported; "
                                   f"expected one of {list(VALID_BLOCKSIZES)}")
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.compute_dtype = parse_dtype(compute_dtype, what="compute_dtype")
        self.quant_storage = _storage_dtype(quant_storage)
        self.name = f"bnb-{quant_type}"
        self._siblings: dict[tuple, Bnb4Scheme] = {}

    def __repr__(self) -> str:
        return (f"Bnb4Scheme({self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, quant_storage={self.quant_storage})")

    def _sibling(self, quant_type, blocksize, double_quant, quant_storage) -> "Bnb4Scheme":
        key = (quant_type, blocksize, double_quant, quant_storage)
        if key == (self.quant_type, self.blocksize, self.double_quant, self.quant_storage):
            return self
        if key not in self._siblings:
            self._siblings[key] = Bnb4Scheme(quant_type, blocksize, double_quant, self.compute_dtype, quant_storage)
        return self._siblings[key]

    # --- keys ---------------------------------------------------------------------------------------
    def required_keys(self):
        return ("weight", "weight.absmax", "weight.quant_map")

    def optional_keys(self):
        return (*(QS_PREFIX + QS_TYPE_PREFIX + q for q in QUANT_TYPES), "weight.nested_absmax",
                "weight.nested_quant_map")

    def present(self, suffixes) -> bool:
        """A module stores bnb 4-bit pieces when any companion of its weight is there; a Linear with only
        a float `weight` is dense. Half-present sets then fail in `decode` with the missing key named."""
        return any(s in _COMPANIONS or s.startswith(QS_PREFIX) for s in suffixes)

    # --- decode -------------------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        def key(s):
            return full_key(prefix, s)

        qs_suffixes = sorted(s for s in pieces if s.startswith(QS_PREFIX))
        if "weight" not in pieces:
            raise MissingTensorError(f"bitsandbytes 4-bit pieces {sorted(pieces)} without their packed "
                                     "'weight'", file=file, key=key("weight"))
        if not qs_suffixes:
            raise MissingTensorError(
                f"packed 4-bit weight without its quant_state; expected '{QS_PREFIX}{QS_TYPE_PREFIX}nf4' or "
                f"'...fp4' beside it, got {sorted(pieces)}", file=file, key=key(QS_PREFIX + QS_TYPE_PREFIX + "nf4"))
        if len(qs_suffixes) > 1:
            raise QuantStateError(f"{len(qs_suffixes)} quant_state entries {qs_suffixes}; expected exactly one",
                                  file=file, key=key(qs_suffixes[0]))
        qs_suffix = qs_suffixes[0]
        meta = _parse_quant_state(pieces[qs_suffix], qs_suffix, file=file, key=key(qs_suffix))
        quant_type, blocksize, dtype, wshape = meta["quant_type"], meta["blocksize"], meta["dtype"], meta["shape"]
        if shape is not None and tuple(shape) != tuple(wshape):
            raise ShapeMismatchError(f"quant_state shape {list(wshape)}, but the model expects {list(shape)}",
                                     file=file, key=key(qs_suffix))
        n = math.prod(wshape)
        nb = -(-n // blocksize)

        weight = pieces["weight"]
        if weight.dtype.is_complex or weight.dtype == torch.bool:
            raise ShapeMismatchError(f"packed weight dtype {weight.dtype}, expected uint8 or another "
                                     "quant_storage dtype", file=file, key=key("weight"))
        nbytes = weight.numel() * weight.element_size()
        if nbytes != (n + 1) // 2:
            raise ShapeMismatchError(
                f"packed weight holds {nbytes} bytes ({list(weight.shape)} {_dtype_name(weight.dtype)}), expected "
                f"{(n + 1) // 2} for shape {list(wshape)} (two 4-bit codes a byte)", file=file, key=key("weight"))
        codes = weight.contiguous().reshape(-1).view(torch.uint8)

        for s in ("weight.absmax", "weight.quant_map"):
            if s not in pieces:
                raise MissingTensorError(f"missing {s!r} beside the packed weight; got {sorted(pieces)}",
                                         file=file, key=key(s))
        _check_quant_map(pieces["weight.quant_map"], quant_type, file=file, key=key("weight.quant_map"))

        nested_pieces = [s for s in ("weight.nested_absmax", "weight.nested_quant_map") if s in pieces]
        nested = "nested_offset" in meta
        if nested_pieces and len(nested_pieces) < 2:
            missing = ({"weight.nested_absmax", "weight.nested_quant_map"} - set(nested_pieces)).pop()
            raise MissingTensorError(f"double-quant piece {missing!r} missing beside {nested_pieces[0]!r}",
                                     file=file, key=key(missing))
        if nested and not nested_pieces:
            raise MissingTensorError("quant_state says double quant (nested_offset) but 'weight.nested_absmax' "
                                     "and 'weight.nested_quant_map' are missing", file=file,
                                     key=key("weight.nested_absmax"))
        if nested_pieces and not nested:
            raise QuantStateError("weight.nested_absmax/nested_quant_map present but the quant_state JSON has "
                                  "no nested_blocksize/nested_dtype/nested_offset", file=file, key=key(qs_suffix))

        absmax = pieces["weight.absmax"]
        warnings = []
        if not nested and _is_cpu_packed_absmax(absmax, wshape, blocksize):
            absmax = absmax.t().reshape(-1).float()
            warnings.append(f"'{key('weight.absmax')}' is bfloat16 {list(pieces['weight.absmax'].shape)}, the "
                            "layout bitsandbytes' AVX512-BF16 CPU path leaves behind after a forward; repaired to "
                            f"float32 [{nb}] (values already rounded to bfloat16 by bitsandbytes; bitsandbytes "
                            "itself reloads this file wrongly)")
        want_dtype = torch.uint8 if nested else torch.float32
        if absmax.dtype != want_dtype:
            why = "double-quant absmax codes" if nested else "absmax without double quant"
            raise ShapeMismatchError(f"dtype {_dtype_name(absmax.dtype)}, expected {_dtype_name(want_dtype)} ({why})",
                                     file=file, key=key("weight.absmax"))
        if tuple(absmax.shape) != (nb,):
            raise ShapeMismatchError(f"shape {list(absmax.shape)}, expected [{nb}] (one per {blocksize}-element "
                                     f"block of {n})", file=file, key=key("weight.absmax"))

        data = {"codes": codes}
        qmeta = {"quant_type": quant_type, "blocksize": blocksize, "quant_storage": weight.dtype,
                 "packed_shape": tuple(weight.shape), "nested": nested, "warnings": warnings}
        if nested:
            nbs = meta["nested_blocksize"]
            nested_absmax, nested_map = pieces["weight.nested_absmax"], pieces["weight.nested_quant_map"]
            nnb = -(-nb // nbs)
            if nested_absmax.dtype != torch.float32 or tuple(nested_absmax.shape) != (nnb,):
                raise ShapeMismatchError(f"{_dtype_name(nested_absmax.dtype)} {list(nested_absmax.shape)}, expected "
                                         f"float32 [{nnb}] (one per {nbs} absmax codes of {nb})", file=file,
                                         key=key("weight.nested_absmax"))
            if nested_map.dtype != torch.float32 or tuple(nested_map.shape) != (256,):
                raise ShapeMismatchError(f"{_dtype_name(nested_map.dtype)} {list(nested_map.shape)}, expected "
                                         "float32 [256]", file=file, key=key("weight.nested_quant_map"))
            data.update(absmax_codes=absmax, nested_absmax=nested_absmax)
            # bnb decodes with the stored map; keep it only when it is not the standard one
            if not torch.equal(nested_map.cpu().view(torch.int32), dynamic_map().view(torch.int32)):
                data["nested_quant_map"] = nested_map
            qmeta.update(nested_blocksize=nbs, nested_offset=meta["nested_offset"], nested_dtype=meta["nested_dtype"])
        else:
            data["absmax"] = absmax
        scheme = self._sibling(quant_type, blocksize, nested, weight.dtype)
        return QTensor(scheme, data, wshape, dtype, qmeta)

    # --- float <-> 4-bit ----------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> QTensor:
        if w.dtype not in FLOAT_DTYPES.values():
            raise UnsupportedError(f"bitsandbytes 4-bit quantizes float16, bfloat16 or float32 weights, got {w.dtype}")
        n = w.numel()
        itemsize = self.quant_storage.itemsize
        if ((n + 1) // 2) % itemsize:
            raise UnsupportedError(f"quant_storage {_dtype_name(self.quant_storage)} needs the packed byte count "
                                   f"({(n + 1) // 2} for shape {list(w.shape)}) to be a multiple of {itemsize}")
        codes, absmax = quantize_4bit(w.contiguous(), self.blocksize, self.quant_type)
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "quant_storage": self.quant_storage,
                "packed_shape": ((n + 1) // 2 // itemsize, 1), "nested": self.double_quant}
        data = {"codes": codes}
        if self.double_quant:
            offset = absmax.mean()
            absmax_codes, nested_absmax = _quantize_blockwise_dynamic(absmax - offset)
            data.update(absmax_codes=absmax_codes, nested_absmax=nested_absmax)
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_offset=offset.item())
        else:
            data["absmax"] = absmax
        return QTensor(self, data, w.shape, w.dtype, meta)

    def block_absmax(self, qt: QTensor) -> torch.Tensor:
        """float32 absmax per block (rebuilt from the double-quant statistics when needed)."""
        if not qt.meta["nested"]:
            return qt.data["absmax"]
        return dequantize_nested_absmax(qt.data["absmax_codes"], qt.data["nested_absmax"], qt.meta["nested_offset"],
                                        qt.meta["nested_blocksize"], qt.data.get("nested_quant_map"),
                                        qt.meta.get("nested_dtype", torch.float32))

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        w = dequantize_4bit(qt.data["codes"], self.block_absmax(qt), qt.numel(), qt.meta["blocksize"],
                            qt.meta["quant_type"], dtype)
        return w.view(qt.shape)

    # --- encode -------------------------------------------------------------------------------------
    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        """Linear4bit.state_dict order and bytes: weight, absmax, quant_map, [nested_absmax,
        nested_quant_map], quant_state.bitsandbytes__<type> (json.dumps of QuantState.as_dict)."""
        m = qt.meta
        dev = qt.device
        out = {"weight": qt.data["codes"].view(m["quant_storage"]).reshape(m["packed_shape"])}
        blob = {"quant_type": m["quant_type"], "blocksize": m["blocksize"], "dtype": _dtype_name(qt.dtype),
                "shape": list(qt.shape)}
        if m["nested"]:
            nested_map = qt.data.get("nested_quant_map")
            out["weight.absmax"] = qt.data["absmax_codes"]
            out["weight.quant_map"] = code_table(m["quant_type"]).to(dev)
            out["weight.nested_absmax"] = qt.data["nested_absmax"]
            out["weight.nested_quant_map"] = (dynamic_map() if nested_map is None else nested_map).to(dev, copy=True)
            blob.update(nested_blocksize=m["nested_blocksize"],
                        nested_dtype=_dtype_name(m.get("nested_dtype", torch.float32)),
                        nested_offset=m["nested_offset"])
        else:
            out["weight.absmax"] = qt.data["absmax"]
            out["weight.quant_map"] = code_table(m["quant_type"]).to(dev)
        raw = json.dumps(blob).encode("utf-8")
        out[QS_PREFIX + QS_TYPE_PREFIX + m["quant_type"]] = torch.tensor(list(raw), dtype=torch.uint8, device=dev)
        return out

    # --- runtime ------------------------------------------------------------------------------------
    def compute_dtype_for(self, x_dtype: torch.dtype) -> torch.dtype:
        """Linear4bit: a compute_dtype given at construction is always used (transformers passes
        bnb_4bit_compute_dtype, float32 by default); without one bnb computes in the input dtype."""
        return self.compute_dtype or x_dtype

    def prepare_runtime(self, qt: QTensor) -> QTensor:
        """Marks the weight for the int8 kernel (runtime/kernels.py), built on its first fast forward
        (see `affine_weight`). The codes and absmax stay as they are for encode() and dequantize()."""
        return kernels.attach_fast(qt, self.affine_weight)

    def affine_weight(self, qt: QTensor) -> kernels.Int8Packed:
        """NF4/FP4 is a 16-entry table per block, not affine. The fast path requantizes the exact float32
        values table[c] * absmax[block] to int8 with one scale per output row (rowmax / 127, rounded up
        to a bfloat16 so the kernel's bfloat16 scale is exact): each weight moves by at most half a
        step, rowmax / 254. The int8 x bfloat16 kernel reads one byte a weight and runs ~2x faster than
        the two 4-bit planes an integer grid of the table needs (within absmax / 238), which this path
        replaced: bench/decode.py measures both the speed and the logits against the exact path."""
        n_out, n_in = qt.shape if qt.ndim == 2 else (0, 0)
        bs = qt.meta["blocksize"]
        if qt.ndim != 2 or n_in % bs:
            raise kernels.NotEligible(f"blocks of {bs} do not tile the rows of a {list(qt.shape)} weight")
        absmax = self.block_absmax(qt)

        def rows(r0: int, r1: int) -> torch.Tensor:   # whole rows are whole blocks (n_in % bs == 0)
            codes = qt.data["codes"][r0 * n_in // 2: r1 * n_in // 2]
            w = dequantize_4bit(codes, absmax[r0 * n_in // bs: r1 * n_in // bs], (r1 - r0) * n_in, bs,
                                qt.meta["quant_type"], torch.float32)
            return w.view(r1 - r0, n_in)

        return kernels.int8_rows(n_out, n_in, rows, absmax.view(n_out, n_in // bs).amax(1))

    def linear(self, x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The packed kernel when the fast kernels are on and it applies (kernels.fast_linear); else
        Linear4bit.forward without bnb's AVX512-BF16 repacking: dequantize to the compute dtype (fp32
        math, one rounding), matmul, cast back to the input dtype."""
        y = kernels.fast_linear(x, qt, bias)
        if y is not None:
            return y
        compute = qt.scheme.compute_dtype_for(x.dtype)
        xc = x.to(compute)
        w = qt.scheme.dequantize(qt, compute)
        return F.linear(xc, w, bias.to(compute) if bias is not None else None).to(x.dtype)

    def nbytes_for(self, shape, dtype) -> int:
        n = math.prod(shape)
        nb = -(-n // self.blocksize)
        stats = nb + 4 * -(-nb // NESTED_BLOCKSIZE) if self.double_quant else 4 * nb
        return (n + 1) // 2 + stats


# --- quant_state JSON -------------------------------------------------------------------------------
def _parse_quant_state(blob: torch.Tensor, suffix: str, *, file, key) -> dict:
    """Validate the packed JSON (docs/formats.md §1.1) and return quant_type, blocksize, dtype (torch),
    shape (tuple) and, with double quant, nested_blocksize and nested_offset (float32 value)."""
    type_name = suffix[len(QS_PREFIX):]
    if not type_name.startswith(QS_TYPE_PREFIX):
        raise QuantStateError(f"unexpected quant_state entry {suffix!r}; expected '{QS_PREFIX}{QS_TYPE_PREFIX}nf4' "
                              "or '...fp4'", file=file, key=key)
    key_type = type_name[len(QS_TYPE_PREFIX):]
    if key_type not in QUANT_TYPES:
        raise UnsupportedError(f"bitsandbytes quant type {key_type!r} (from the key name) is not supported; "
                               f"expected one of {list(QUANT_TYPES)}", file=file, key=key)
    if blob.dtype != torch.uint8 or blob.ndim != 1:
        raise QuantStateError(f"quant_state must be a 1-D uint8 tensor of UTF-8 JSON, got {_dtype_name(blob.dtype)} "
                              f"{list(blob.shape)}", file=file, key=key)
    try:
        d = json.loads(bytes(blob.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise QuantStateError(f"quant_state is not valid UTF-8 JSON: {e}", file=file, key=key) from None
    except RecursionError:
        raise QuantStateError("quant_state JSON is nested too deeply to parse; expected a flat object",
                              file=file, key=key) from None
    if not isinstance(d, dict):
        raise QuantStateError(f"quant_state JSON is a {type(d).__name__}, expected an object", file=file, key=key)
    unknown = sorted(set(d) - set(_JSON_KEYS) - set(_NESTED_JSON_KEYS))
    missing = [k for k in _JSON_KEYS if k not in d]
    if unknown or missing:
        raise QuantStateError(f"quant_state JSON keys {sorted(d)}: missing {missing}, unknown {unknown}; expected "
                              f"{list(_JSON_KEYS)} (+ {list(_NESTED_JSON_KEYS)} with double quant)", file=file, key=key)

    qt = d["quant_type"]
    if not isinstance(qt, str):
        raise QuantStateError(f"quant_type {qt!r} is not a string", file=file, key=key)
    if qt not in QUANT_TYPES:
        raise UnsupportedError(f"quant_type {qt!r} is not supported; expected one of {list(QUANT_TYPES)}",
                               file=file, key=key)
    if qt != key_type:
        raise QuantStateError(f"quant_type {qt!r} in the JSON contradicts the key name ({key_type!r})",
                              file=file, key=key)
    bs = d["blocksize"]
    if not _is_int(bs) or bs <= 0:
        raise QuantStateError(f"blocksize {bs!r}, expected a positive integer", file=file, key=key)
    if bs not in VALID_BLOCKSIZES:
        raise UnsupportedError(f"blocksize {bs} is not supported; expected one of {list(VALID_BLOCKSIZES)}",
                               file=file, key=key)
    dtype = FLOAT_DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
    if dtype is None:
        raise UnsupportedError(f"dtype {d['dtype']!r} is not supported; expected one of {list(FLOAT_DTYPES)}",
                               file=file, key=key)
    shape = d["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s >= 0 for s in shape):
        raise QuantStateError(f"shape {shape!r}, expected a list of non-negative integers", file=file, key=key)
    out = {"quant_type": qt, "blocksize": bs, "dtype": dtype, "shape": tuple(shape)}

    present = [k for k in _NESTED_JSON_KEYS if k in d]
    if present and len(present) < len(_NESTED_JSON_KEYS):
        raise QuantStateError(f"double-quant keys {present} without {sorted(set(_NESTED_JSON_KEYS) - set(present))}",
                              file=file, key=key)
    if present:
        nbs, ndt, off = d["nested_blocksize"], d["nested_dtype"], d["nested_offset"]
        if not _is_int(nbs) or nbs <= 0:
            raise QuantStateError(f"nested_blocksize {nbs!r}, expected a positive integer", file=file, key=key)
        if nbs not in VALID_BLOCKSIZES:   # bnb's blockwise kernels take these; a huge one would be allocated
            raise UnsupportedError(f"nested_blocksize {nbs} is not supported; expected one of "
                                   f"{list(VALID_BLOCKSIZES)}", file=file, key=key)
        if not isinstance(ndt, str) or ndt not in FLOAT_DTYPES:
            # bnb's quantize_blockwise (which writes the nested statistics) takes these three
            raise UnsupportedError(f"nested_dtype {ndt!r} is not supported; expected one of {list(FLOAT_DTYPES)}",
                                   file=file, key=key)
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise QuantStateError(f"nested_offset {off!r}, expected a finite number", file=file, key=key)
        out.update(nested_blocksize=nbs, nested_offset=float(np.float32(off)), nested_dtype=FLOAT_DTYPES[ndt])
    return out


def _is_cpu_packed_absmax(absmax: torch.Tensor, wshape, blocksize: int) -> bool:
    """bnb's `_convert_weight_packed_for_cpu` (run by Linear4bit.forward on AVX512-BF16 CPUs) replaces the
    absmax of an [N, K] weight by bfloat16 absmax.reshape(N, K/blocksize).T; its save-time inverse
    restores the codes but, without double quant, not the absmax. Only that exact shape and dtype."""
    return (absmax.dtype == torch.bfloat16 and absmax.ndim == 2 and len(wshape) == 2
            and wshape[1] % blocksize == 0 and tuple(absmax.shape) == (wshape[1] // blocksize, wshape[0]))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_quant_map(qmap: torch.Tensor, quant_type: str, *, file, key) -> None:
    """bnb decodes with its built-in table and ignores this one, so a different table means the file
    says something bnb would not honour: refuse it rather than guess."""
    if tuple(qmap.shape) != (16,) or not qmap.is_floating_point():
        raise ShapeMismatchError(f"quant_map {_dtype_name(qmap.dtype)} {list(qmap.shape)}, expected float32 [16]",
                                 file=file, key=key)
    if not torch.equal(qmap.cpu().float(), code_table(quant_type).to(qmap.dtype).float()):
        raise QuantStateError(f"quant_map is not the standard {quant_type.upper()} table "
                              f"(got {[round(v, 4) for v in qmap.float().tolist()]})", file=file, key=key)
