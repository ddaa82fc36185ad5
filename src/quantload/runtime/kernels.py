"""Fast paths for quantized Linear layers: torch's native packed int4/int8 matmuls, repacked once.

A scheme whose weight is an affine integer code per group, W[o, i] = codes[o, i] * scale[o, g] + bias[o, g]
(g = i // group), describes it as an `AffineWeight` (or builds a kernel itself); `attach_fast` marks the
weight at load, and its first `fast_linear` call repacks it into one of these kernels, kept in
`qt.meta["fast"]` beside the untouched checkpoint data (so `encode()` and `dequantize()` are unchanged).
The scheme's `linear` calls `fast_linear` first. What runs:

* "int4pack": `torch._weight_int4pack_mm_for_cpu` (tinygemm). Codes of up to 4 bits go in as they are.
  Wider codes (8-bit GPTQ/compressed-tensors groups, GGUF Q5_x/Q8_0) are cut
  into 4-bit planes u = sum_p 16^p * u_p, each plane a copy of the weight's groups with scale 16^p * s;
  the planes are laid side by side along the input dimension and the input is repeated once per plane,
  so one call sums them. Group sizes 32/64/128/256 (others that are multiples of one of them repeat
  their scales; per-channel weights are one group); the input dimension is zero-padded up to a whole
  number of groups and the outputs up to a multiple of 16 (the kernel's block).
* "int8pack": `torch._weight_int8pack_mm` for symmetric per-output-channel int8 (w8a16), and, as
  "int8pack rows x2 planes" (`int8_rows`), for every weight that is not affine codes in groups the int4
  kernel takes (NF4/FP4 tables, K-quants with 16-element sub-blocks, i-quants, odd groups, HQQ axis 0):
  the exact values requantized to int8 per row, plus an int8 plane of the residual (w = s * (c1 + c2/128)).
  One plane alone (within rowmax / 254) missed the fidelity bar on NF4 (docs/kernels.md).
* The output head (mark_output_head) is wrapped in TopRefined: its largest logits recomputed exactly.

Numerics. On CPU only the bfloat16 variants of these kernels are vectorized (the float32 ones are ~20x
slower than a dense float32 matmul, the float16 one ~10x), so the fast path computes in bfloat16: the
input is rounded to bfloat16, scales and zero offsets are rounded to bfloat16 (a float16 scale loses 3
bits), products accumulate in float32 inside the kernel and the output is rounded to bfloat16, then cast
back to the input dtype; the bias is added in the input dtype. The zero offset the kernel wants,
value = (u - 8) * scale + zero, is derived in float64 from the format's own form ((q - z) * s, d * q + m)
and rounded once. These differences are of the order of bfloat16 rounding (2^-9 relative); they are
measured on real models in bench/decode.py and tests/test_fast_kernels.py.

When it runs: on CPU, for inputs of at most MAX_FAST_ROWS rows (divided by the number of planes), so
decode and short prompts; larger batches dequantize once and use the BLAS matmul, faster there (the
kernel costs rows x planes; a float dequantize does not grow with the rows). Outside autograd, and on
the device the weight was packed on. Everything else takes the scheme's exact path (dequantize, then F.linear).

The switch: the kernels are ON by default (quantload.set_exact, load(exact=), QUANTLOAD_EXACT=1;
set_fast_kernels is the older, deprecated spelling). A load marks eligible weights, repacked on their
first forward (never at load; an embedding is never repacked) and used from then on; `set_exact(True)`
makes every QLinear take the exact path again, bit for bit the dequantize-then-matmul result; a load
made exact marks nothing (no extra memory). Each weight's KernelChoice (meta[CHOICE_KEY], shown in
LoadReport.kernels) says which kernel it got and why the others were not taken. The repacked copy is
extra memory (int4: ~0.6 byte a weight, int8 x2 planes: 2 bytes, beside the checkpoint's): `kernel.nbytes`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..report import KernelChoice

FAST_KEY = "fast"            # qt.meta[FAST_KEY]: the packed kernel
SKIP_KEY = "fast_skipped"    # qt.meta[SKIP_KEY]: why a weight was not packed (for inspection and tests)
PENDING_KEY = "fast_pending" # qt.meta[PENDING_KEY]: how to repack it, until its first fast_linear call
CHOICE_KEY = "kernel"        # qt.meta[CHOICE_KEY]: its KernelChoice (what the load report shows)
INT4_GROUPS = (256, 128, 64, 32)   # group sizes the int4 kernel takes, largest first
N_BLOCK = 16                 # the int4 kernel packs output rows in blocks of 16
INT8_K_MULTIPLE = 8          # the int8 kernel reads inputs 8 at a time (other widths crash it)
MAX_FAST_ROWS = 16           # input rows up to which the kernels beat dequantize + BLAS (divided by the
                             # planes: the kernel's time grows with rows x planes; measured on CPU)
MAX_PLANES = 3               # codes of up to 12 bits
INT8_ROW_PLANES = 2          # int8 planes of a requantized weight (2: residual plane, see int8_rows)
PACK_CHUNK_ELEMS = 1 << 20   # codes repacked per step at load (bounds the temporaries)

def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


# On by default: every quantized Linear takes the fastest packed kernel that meets the fidelity bar
# (docs/kernels.md). QUANTLOAD_EXACT=1 (or the older QUANTLOAD_FAST_KERNELS=0) starts the process exact:
# dequantize, then F.linear, bit for bit the defining tool's reference numerics.
_enabled = not (_env_flag("QUANTLOAD_EXACT") is True or _env_flag("QUANTLOAD_FAST_KERNELS") is False)
# the exact= of the load in progress (None: follow _enabled); see begin_load()
_load_exact: bool | None = None


def set_exact(exact: bool) -> bool:
    """Exact numerics (dequantize, then F.linear) for every quantized Linear from now on, or back to the
    packed kernels; returns the previous setting. Loads made while exact repack nothing."""
    global _enabled
    previous, _enabled = not _enabled, not bool(exact)
    return previous


def exact_enabled() -> bool:
    return not _enabled


def set_fast_kernels(enabled: bool) -> bool:
    """Deprecated alias of `set_exact(not enabled)` (the kernels are now on by default); returns the
    previous fast setting."""
    return not set_exact(not enabled)


def fast_kernels_enabled() -> bool:
    return _enabled


def begin_load(exact: bool | None):
    """The exact= of one load: weights prepared until end_load are marked for repacking unless it is True
    (None: the process setting, `set_exact`). A later `set_exact(True)` still turns every layer exact; a
    layer loaded exact stays exact (it was never marked). Returns what end_load restores."""
    global _load_exact
    previous, _load_exact = _load_exact, exact
    return previous


def end_load(previous) -> None:
    global _load_exact
    _load_exact = previous


_any_rows = False


@contextlib.contextmanager
def fast_at_any_rows():
    """Inside this block the packed kernels also take inputs of more than MAX_FAST_ROWS rows (which
    otherwise dequantize once and use BLAS): what a fidelity measurement needs, so that a teacher-forced
    window sees the kernel's numerics at every position, as decoding does. Slower; not thread-local."""
    global _any_rows
    previous, _any_rows = _any_rows, True
    try:
        yield
    finally:
        _any_rows = previous


def marking_now() -> bool:
    """Whether a weight prepared now is meant for the fast path (the load's exact=, else set_exact)."""
    return _marking()


def exact_choice() -> KernelChoice:
    return KernelChoice("exact", "exact=True" if _load_exact else "quantload.set_exact(True)")


def _marking() -> bool:
    return _enabled if _load_exact is None else not _load_exact


class NotEligible(Exception):
    """A weight that cannot take a packed kernel; the message says why (kept in qt.meta[SKIP_KEY]).
    fallback=False: requantizing the exact weight to int8 per row cannot help either (device, shape)."""

    def __init__(self, message: str, fallback: bool = True):
        super().__init__(message)
        self.fallback = fallback


@dataclass
class AffineWeight:
    """W[o, i] = (codes[o, i] - zero[o, g]) * scale[o, g]  or, with `bias` instead of `zero`,
    W[o, i] = codes[o, i] * scale[o, g] + bias[o, g];  g = i // group (after `perm`, if any).

    codes: unsigned integers [O, I] below 2**bits (any integer dtype). scale, zero, bias: [O, G] (a
    per-channel weight has G = 1 and group = I). perm: when the checkpoint's groups are not contiguous
    (GPTQ act-order), the input columns in group order: the codes are given in that order and the input
    is permuted the same way at run time."""
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    perm: torch.Tensor | None = None


# --- the kernels ----------------------------------------------------------------------------------------
class _Packed:
    kind = "abstract"
    requantized = False      # True: the exact weight requantized (int8 per row), not the file's codes

    def __init__(self, n_out: int, n_in: int, perm: torch.Tensor | None, device: torch.device, planes: int = 1):
        self.n_out, self.n_in, self.perm, self.device = n_out, n_in, perm, device
        self.max_rows = max(1, MAX_FAST_ROWS // planes)
        self.max_elements = self.max_rows * n_in

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def _tensors(self):
        return (self.perm,)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n_in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self._mm(x2).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.view(*lead, self.n_out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n_out}x{self.n_in}, {self.describe()}, {self.nbytes} bytes)"

    def describe(self) -> str:
        return self.kind

    def why(self) -> str:
        return "the checkpoint's integer codes, repacked"


class Int4Packed(_Packed):
    """torch._weight_int4pack_mm_for_cpu on planes of 4-bit codes (see the module docstring)."""
    kind = "int4pack"

    def __init__(self, packed, scales_zeros, group, n_out, n_in, k_padded, planes, perm, device):
        super().__init__(n_out, n_in, perm, device, planes)
        self.packed, self.scales_zeros, self.group = packed, scales_zeros, group
        self.k_padded, self.planes = k_padded, planes
        self.n_padded = packed.shape[0]

    def _tensors(self):
        return (self.packed, self.scales_zeros, self.perm)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        # the input, rounded to bfloat16, once per plane and zero-padded: one broadcasting copy
        if self.planes == 1 and self.k_padded == self.n_in:
            xb = x2.to(torch.bfloat16).contiguous()
        else:
            xb = x2.new_zeros((x2.shape[0], self.planes, self.k_padded), dtype=torch.bfloat16)
            xb[:, :, : self.n_in].copy_(x2.unsqueeze(1))
            xb = xb.view(x2.shape[0], -1)
        if self.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xb, self.packed, self.group, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros)
        return y[:, : self.n_out] if self.n_padded != self.n_out else y

    def describe(self) -> str:
        return f"int4pack g{self.group}" + (f" x{self.planes} planes" if self.planes > 1 else "")


_int8_mm = torch.ops.aten._weight_int8pack_mm


class Int8Packed(_Packed):
    """torch._weight_int8pack_mm: int8 [O, I] times a bfloat16 scale per output row."""
    kind = "int8pack"

    def __init__(self, weight, scales, perm, device, planes: int = 1):
        super().__init__(weight.shape[0], weight.shape[1] // planes, perm, device, planes)
        self.weight, self.scales, self.planes = weight, scales, planes

    def _tensors(self):
        return (self.weight, self.scales, self.perm)

    def describe(self) -> str:
        return ("int8pack rows" + (" x2 planes" if self.planes == 2 else "")) if self.requantized else "int8pack"

    def why(self) -> str:
        if not self.requantized:
            return "8-bit symmetric codes, one scale per row, as stored"
        if self.planes == 2:
            return "exact weight requantized to int8 per row plus an int8 residual plane (within rowmax/65000)"
        return "exact weight requantized to int8 per row (within rowmax/254)"

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16).contiguous()
        if self.planes == 2:   # w = s * (c1 + c2 / 128): the input once as is, once times 2^-7 (exact)
            xb = torch.cat([xb, xb * 2.0 ** -7], -1)
        return torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scales)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None or bias is not None or self.planes != 1:
            return super().__call__(x, bias)
        # the decode step's common case in as few torch calls as possible: at one input row the kernel
        # takes ~50-100 us, and each extra call ~2-4 us (210 layers a token in SmolLM2-135M)
        xb = x.reshape(-1, self.n_in).to(torch.bfloat16, memory_format=torch.contiguous_format)
        return _int8_mm(xb, self.weight, self.scales).to(x.dtype).view(*x.shape[:-1], self.n_out)


# --- repacking ------------------------------------------------------------------------------------------
def _kernel_group(group: int, n_groups: int, k: int) -> tuple[int, int]:
    """(kernel group size, padded input length). A per-channel weight (one group) takes the largest
    kernel group and pads the input up to it; other group sizes must be a multiple of a kernel group."""
    if n_groups == 1:
        kg = next((g for g in INT4_GROUPS if k % g == 0), None)
        if kg is None:
            kg = 32 if k < 256 else 256
        return kg, -(-k // kg) * kg
    kg = next((g for g in INT4_GROUPS if group % g == 0), None)
    if kg is None:
        raise NotEligible(f"group size {group} is not a multiple of 32 (the int4 kernel takes groups of "
                          f"{'/'.join(map(str, sorted(INT4_GROUPS)))})")
    return kg, n_groups * group


def _bias_of(aw: AffineWeight) -> torch.Tensor:
    """bias [O, G] in float64 (exact for every float16/bfloat16/float32 scale and integer zero)."""
    s = aw.scale.double()
    if aw.bias is not None:
        return aw.bias.double().expand_as(s)
    return -(aw.zero.double() * s)


def _int8_symmetric(aw: AffineWeight) -> bool:
    """8-bit codes, one scale per output row and a zero point of 128 everywhere (signed int8 stored
    with an offset): the int8 kernel computes exactly this."""
    if aw.bits != 8 or aw.scale.shape[1] != 1 or aw.codes.shape[1] % INT8_K_MULTIPLE:
        return False
    if aw.zero is not None:
        return bool((aw.zero == 128).all())
    return bool((aw.bias.double() == -128 * aw.scale.double()).all())


def pack(aw: AffineWeight, notes: dict | None = None) -> _Packed:
    """Repack an affine weight for the CPU kernels; NotEligible says why not."""
    codes = aw.codes
    _check_device(codes.device)
    if codes.ndim != 2 or aw.scale.ndim != 2 or aw.scale.shape[0] != codes.shape[0]:
        raise NotEligible(f"codes {list(codes.shape)} and scales {list(aw.scale.shape)} do not line up")
    n_out, k = codes.shape
    if n_out == 0 or k == 0:
        raise NotEligible("empty weight")
    planes = -(-aw.bits // 4)
    if planes > MAX_PLANES:
        raise NotEligible(f"{aw.bits}-bit codes are wider than {4 * MAX_PLANES} bits")
    perm = aw.perm.to(torch.long) if aw.perm is not None else None
    if _int8_symmetric(aw) and codes.device.type == "cpu":
        w8 = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return Int8Packed(w8, aw.scale[:, 0].to(torch.bfloat16).contiguous(), perm, codes.device)

    n_groups = aw.scale.shape[1]
    if n_groups * aw.group < k or (n_groups - 1) * aw.group >= k:
        raise NotEligible(f"{n_groups} groups of {aw.group} do not cover {k} input columns")
    kg, k_pad = _kernel_group(aw.group, n_groups, k)
    repeat = aw.group // kg if n_groups > 1 else k_pad // kg
    n_pad = -(-n_out // N_BLOCK) * N_BLOCK
    inner = None
    if codes.device.type == "cuda":     # tinygemm on CUDA: k in tiles of 16 x innerKTiles (2, 4 or 8)
        inner = next((t for t in (8, 4, 2) if (k_pad * planes) % (16 * t) == 0), None)
        if inner is None:
            raise NotEligible(f"{k_pad} inputs do not tile the CUDA int4 kernel", fallback=False)
    scale = aw.scale.double()
    bias = _bias_of(aw)
    # rows in chunks (a multiple of the kernel's 64-row blocks packs the same bytes as the whole): the
    # int32 codes the packer takes would otherwise cost 4 bytes a weight per plane at load
    step = max(64, PACK_CHUNK_ELEMS // (k_pad * planes) // 64 * 64)
    packed, zeros = [], []
    for r in range(0, n_out, step):
        e = min(r + step, n_out)
        p, z = _pack_rows(codes[r:e], scale[r:e], bias[r:e], k_pad, n_groups, planes,
                          extra_rows=n_pad - n_out if e == n_out else 0, inner_k_tiles=inner)
        packed.append(p)
        zeros.append(z)
    zero = torch.cat(zeros)
    if n_pad != n_out:
        scale = F.pad(scale, (0, 0, 0, n_pad - n_out))
        zero = F.pad(zero, (0, 0, 0, n_pad - n_out))
    # scales and zeros [planes * groups, N, 2]: plane p has scale 16^p * s, and plane 0 alone the zero
    sz = [torch.stack([scale * 16 ** p, zero if p == 0 else torch.zeros_like(zero)], -1) for p in range(planes)]
    sz = torch.cat(sz, 1).repeat_interleave(repeat, dim=1).transpose(0, 1)
    return Int4Packed(torch.cat(packed), sz.to(torch.bfloat16).contiguous(), kg, n_out, k, k_pad, planes, perm,
                      codes.device)


def int8_rows(n_out: int, n_in: int, rows_of, rowmax: torch.Tensor | None = None,
              planes: int | None = None) -> Int8Packed:
    """A weight that is not affine integer codes (a lookup table per block: NF4/FP4, i-quants; groups
    the int4 kernel cannot take: K-quants' 16-element sub-blocks) requantized for the int8 kernel:
    `rows_of(r0, r1)` gives rows r0..r1 as float32 [r1 - r0, n_in] (the exact values, a tensor the
    caller gives away), `rowmax` [n_out] bounds each row's magnitude (None: measured on the rows). Each
    row gets the scale rowmax / 127 rounded up to a bfloat16 (the kernel's scale dtype, so it is used
    exactly) and int8 codes round(w / scale): every weight within half a step, rowmax / 254. Rows are
    requantized PACK_CHUNK_ELEMS at a time (bounded temporaries)."""
    if n_in % INT8_K_MULTIPLE:
        raise NotEligible(f"{n_in} input columns is not a multiple of {INT8_K_MULTIPLE} (the int8 kernel's step)",
                          fallback=False)
    if rowmax is not None and not bool(torch.isfinite(rowmax).all()):
        raise NotEligible("non-finite block scales", fallback=False)
    planes = INT8_ROW_PLANES if planes is None else planes
    w8, scales = None, []
    step = max(1, PACK_CHUNK_ELEMS // n_in)
    for r0 in range(0, n_out, step):
        r1 = min(r0 + step, n_out)
        v = rows_of(r0, r1)
        if w8 is None:
            w8 = torch.empty(n_out, planes * n_in, dtype=torch.int8, device=v.device)
        m = v.abs().amax(1) if rowmax is None else rowmax[r0:r1].float()
        if rowmax is None and not bool(torch.isfinite(m).all()):
            raise NotEligible("non-finite weights", fallback=False)
        scale = _bf16_at_least(torch.where(m > 0, m / 127, 1.0))
        v.mul_(scale.float().reciprocal().unsqueeze(1))
        c1 = v.round().clamp_(-127, 127)
        w8[r0:r1, :n_in].copy_(c1)
        if planes == 2:     # the residual in [-1/2, 1/2] steps, in 128ths: |c2| <= 64
            w8[r0:r1, n_in:].copy_(v.sub_(c1).mul_(128).round_().clamp_(-127, 127))
        scales.append(scale)
    kernel = Int8Packed(w8, torch.cat(scales).contiguous(), None, w8.device, planes)
    kernel.requantized = True
    return kernel


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each (positive, finite) float32 of x."""
    b = x.to(torch.bfloat16)
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)     # the next bfloat16 away from zero
    return torch.where(b.float() < x, up, b).contiguous()


def _pack_rows(codes, scale, bias, k_pad, n_groups, planes, extra_rows=0, inner_k_tiles=None):
    """(int4pack bytes of these rows' planes, their zero offsets [rows, groups]).

    The kernel computes sum_p (c_p - 8) * 16^p * s + zero over the planes' 4-bit codes c_p. Each group's
    codes are written u = o + v, v in balanced base-16 digits d_p = c_p - 8 in [-8, 7], with the integer
    o as close as the codes' range allows to the format's own zero point: then zero = bias + o * s is
    small (0 for symmetric codes) and so are the digits, which keeps the bfloat16 roundings of s and of
    the zero small against the weights (2-bit codes end up centred, and 8-bit symmetric codes do not
    carry a constant 136 * s)."""
    rows, k = codes.shape
    lo_v = -sum(8 * 16 ** p for p in range(planes))
    hi_v = sum(7 * 16 ** p for p in range(planes))
    u = codes.to(torch.int16, memory_format=torch.contiguous_format)   # 12-bit codes and digits fit
    if k_pad != k:
        u = torch.cat([u, u[:, -1:].expand(rows, k_pad - k)], 1)   # repeat a real code: min/max unchanged
    u = u.view(rows, n_groups, -1)
    umin, umax = u.amin(-1).to(torch.int32), u.amax(-1).to(torch.int32)
    target = torch.where(scale != 0, -bias / scale.where(scale != 0, 1), 0).round().clamp(-(1 << 20), 1 << 20)
    o = torch.maximum(torch.minimum(target.to(torch.int32), umin - lo_v), umax - hi_v)
    v = (u - (o - 8).to(torch.int16).unsqueeze(-1)).view(rows, k_pad)       # v + 8
    v[:, k:] = 8                              # padding: digits 0 (the input is 0 there anyway)
    if extra_rows:
        v = F.pad(v, (0, 0, 0, extra_rows), value=8)
    digits = []
    for p in range(planes):                   # v + 8 = sum_p (c_p - 8) * 16^p + 8
        if p == planes - 1:
            digits.append(v)                  # in 0..15: the range check on o guarantees it
            break
        c = v & 15
        digits.append(c)
        v = ((v - c) >> 4) + 8
    d = torch.cat(digits, 1)
    if inner_k_tiles is None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(d.to(torch.int32), 1)
    else:   # CUDA takes two codes a byte, the even column in the high nibble (torch's own tests' layout)
        packed = torch.ops.aten._convert_weight_to_int4pack(((d[:, ::2] << 4) | d[:, 1::2]).to(torch.uint8),
                                                            inner_k_tiles)
    return packed, bias + o.double() * scale


def attach_fast(qt, affine_of, dense_rows=None) -> object:
    """Mark `qt` for repacking (called from a scheme's prepare_runtime, at load): `affine_of(qt)` returns
    its AffineWeight (or a ready kernel) or raises NotEligible; then, unless NotEligible says it cannot
    help, the exact weight is requantized to int8 per row (`int8_rows`), read `dense_rows(qt, r0, r1)`
    (float32 rows r0..r1; default: one dequantize of the whole weight). Nothing is repacked here: the
    first `fast_linear` call does it (`packed_kernel`), so a load pays nothing, weights that never run as a
    Linear (an untied embedding) are never repacked, and a model that is only saved or inspected keeps
    no second copy. The returned QTensor shares its data (what encode() and dequantize() read); its
    meta[CHOICE_KEY] is the KernelChoice the load report shows."""
    if qt.is_meta:
        return qt
    meta = {k: v for k, v in qt.meta.items() if k not in (FAST_KEY, SKIP_KEY, CHOICE_KEY)}
    if not _marking():
        meta[CHOICE_KEY] = exact_choice()
    else:
        meta[PENDING_KEY] = _Pending(affine_of, dense_rows)
        meta[CHOICE_KEY] = meta[PENDING_KEY].choice
    return type(qt)(qt.scheme, qt.data, qt.shape, qt.dtype, meta)


def choice_of(qt, module=None) -> KernelChoice:
    """The KernelChoice of a weight (a shared live object once attach_fast marked it); for an embedding
    module, how its lookup runs."""
    if module is not None and hasattr(module, "num_embeddings"):
        return KernelChoice("lookup", "gathers the rows' quantized data, then dequantizes only those"
                            if hasattr(qt.scheme, "dense_rows") else "dequantizes the table, then gathers")
    choice = qt.meta.get(CHOICE_KEY)
    if choice is None:
        reason = ("runs on the packed kernels from its first forward" if FAST_KEY in qt.meta
                  else f"{qt.scheme.name} has no packed kernel")
        choice = KernelChoice(qt.meta[FAST_KEY].describe() if FAST_KEY in qt.meta else "exact", reason)
    return choice


class _Pending:
    """How to repack a weight, and the result once done. QTensor copies (module moves) copy their meta
    shallowly, so every copy shares this one object and the weight is repacked at most once."""

    def __init__(self, affine_of, dense_rows=None):
        self.affine_of, self.dense_rows, self.done, self.kernel, self.skipped = affine_of, dense_rows, False, None, None
        self.choice = KernelChoice("pending", "repacked on its first forward")
        self.head_rows = None      # set for the output head: TopRefined

    def resolve(self, qt) -> None:
        if self.done:
            return
        notes: dict[str, str] = {}
        try:
            try:
                _check_device(qt.device)
                weight = self.affine_of(qt)
                self.kernel = weight if isinstance(weight, _Packed) else pack(weight, notes)
                if qt.device.type == "cuda":
                    if not isinstance(self.kernel, Int4Packed):
                        self.kernel = None
                        raise NotEligible("only the int4 kernel is used on CUDA", fallback=False)
                    _probe_cuda(self.kernel, qt)
            except NotEligible as e:
                notes.setdefault("int4pack", str(e))
                if not e.fallback:
                    raise
                self.kernel = _int8_from_exact(qt, self.dense_rows)
                self.kernel.requantized = True
            if self.head_rows is not None and qt.device.type == "cpu":
                self.kernel = TopRefined(self.kernel, qt, self.head_rows)
            self.choice.kernel = self.kernel.describe()
            self.choice.reason = self.kernel.why()
        except NotEligible as e:
            notes.setdefault("int8pack", str(e))
            self.skipped = "; ".join(f"{k}: {v}" for k, v in notes.items())
            self.choice.kernel, self.choice.reason = "exact", "no packed kernel applies"
        if self.kernel is not None:
            for family in ("int4pack", "int8pack"):
                if family not in self.kernel.describe() and family not in notes:
                    notes[family] = _why_not(family, self.kernel)
        self.choice.not_taken = notes
        self.done, self.affine_of, self.dense_rows = True, None, None


def _why_not(family: str, kernel) -> str:
    if family == "int8pack":
        return "int4pack keeps the checkpoint's codes and reads half the bytes"
    return ("not affine integer codes in groups of 32+: requantized to int8 per row" if kernel.requantized
            else "8-bit codes with one scale per row: the int8 kernel computes them as stored")


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not _cuda_int4_available():
            raise NotEligible("torch has no CUDA int4pack kernel here", fallback=False)
        return
    if device.type != "cpu":
        raise NotEligible(f"packed kernels are used on CPU and CUDA only (weight on {device.type})", fallback=False)


def _cuda_int4_available() -> bool:
    """tinygemm's CUDA kernel: torch built with CUDA, compute capability 8.0+ (what the kernel needs)."""
    if not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _probe_cuda(kernel, qt) -> None:
    """UNCHECKED on a GPU when written: the CUDA int4 path is validated once per weight at repack time
    against the exact weight (one random input row), so a layout mismatch falls back to the exact path
    instead of computing garbage."""
    x = torch.randn(1, kernel.n_in, device=qt.device, generator=None)
    ref = F.linear(x, qt.dequantize(torch.float32))
    y = kernel(x, None).float()
    err = (y - ref).norm() / ref.norm().clamp_min(1e-30)
    if not bool(err < 0.02):
        raise NotEligible(f"the CUDA int4 kernel disagrees with the exact weight (relative error {float(err):.3g})",
                          fallback=False)


def _int8_from_exact(qt, dense_rows) -> "Int8Packed":
    """Requantize the exact weight to int8 per row (int8_rows), reading it a chunk of rows at a time."""
    if qt.ndim != 2:
        raise NotEligible(f"{qt.ndim}-d weight", fallback=False)
    if qt.device.type != "cpu":
        raise NotEligible("int8pack rows is used on CPU only", fallback=False)
    n_out, n_in = qt.shape
    if dense_rows is None:
        full = qt.dequantize(torch.float32)
        return int8_rows(n_out, n_in, lambda r0, r1: full[r0:r1].clone())
    return int8_rows(n_out, n_in, lambda r0, r1: dense_rows(qt, r0, r1))


HEAD_CANDIDATES = 32     # logits of the output head recomputed exactly per row (see TopRefined)


class TopRefined:
    """The output head's kernel, with its top logits recomputed exactly.

    The packed kernels round their output to bfloat16: a logit of 20 is then off by up to 1/16, enough
    to swap the top two tokens where they are close (measured on SmolLM2 Q4_1, 4096 tokens: top-1
    agreement with the exact path 97.6% with the head on the kernel, 99.2% with it exact). So the head
    keeps the kernel for all logits, then recomputes the HEAD_CANDIDATES largest of each row from the
    exact rows of the weight (`rows_at(qt, idx)`: a GGUF gathers those rows' blocks and dequantizes only
    them), in float32: the argmax, and the probabilities that matter, are the exact path's."""
    requantized = False

    def __init__(self, inner, qt, rows_at, k: int = HEAD_CANDIDATES):
        self.inner, self.qt, self.rows_at = inner, qt, rows_at
        self.k = min(k, inner.n_out)
        self.n_in, self.n_out, self.device = inner.n_in, inner.n_out, inner.device
        self.max_rows, self.max_elements = inner.max_rows, inner.max_elements
        self.requantized = inner.requantized

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def describe(self) -> str:
        return self.inner.describe()

    def why(self) -> str:
        return self.inner.why() + f"; the {self.k} largest logits of each row recomputed exactly"

    def __repr__(self) -> str:
        return f"TopRefined({self.inner!r}, top {self.k})"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.inner(x, bias)
        x2, y2 = x.reshape(-1, self.n_in), y.view(-1, self.n_out)
        idx = y2.topk(self.k, dim=-1).indices                                   # [m, k]
        w = self.rows_at(self.qt, idx.reshape(-1)).view(*idx.shape, self.n_in)    # float32 exact rows
        exact = torch.einsum("mi,mki->mk", x2.float(), w)
        if bias is not None:
            exact = exact + bias.float()[idx]
        y2.scatter_(1, idx, exact.to(y.dtype))
        return y


def mark_output_head(model) -> None:
    """At the end of a load: the output head (model.get_output_embeddings()), when it is a quantized
    weight marked for a kernel whose scheme can read single rows exactly, gets TopRefined."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    qt = getattr(head, "qweight", None)
    pending = qt.meta.get(PENDING_KEY) if qt is not None else None
    rows_at = getattr(qt.scheme, "rows_at", None) if qt is not None else None
    if pending is not None and rows_at is not None:
        pending.head_rows = rows_at


def packed_kernel(qt) -> _Packed | None:
    """The packed kernel of `qt`, repacking it now if attach_fast marked it and that has not happened
    yet; None when there is none (then meta[SKIP_KEY] says why, if it was tried)."""
    meta = qt.meta
    pending = meta.pop(PENDING_KEY, None)
    if pending is not None:
        pending.resolve(qt)
        if pending.kernel is not None:
            meta[FAST_KEY] = pending.kernel
        else:
            meta[SKIP_KEY] = pending.skipped
    return meta.get(FAST_KEY)


class FastLinear:
    """Mixin for a Scheme (listed before Scheme in its bases) whose weights map onto the packed kernels:
    it implements `affine_weight(qt) -> AffineWeight` (or raises NotEligible) and gets prepare_runtime
    and linear. A scheme that defines its own `linear` calls `fast_linear` at its top instead."""

    def affine_weight(self, qt) -> AffineWeight:
        raise NotEligible(f"{type(self).__name__} has no packed form")

    def prepare_runtime(self, qt):
        return attach_fast(qt, self.affine_weight, getattr(self, "dense_rows", None))

    def linear(self, x, qt, bias):
        y = fast_linear(x, qt, bias)
        return super().linear(x, qt, bias) if y is None else y


def group_order(g_idx: torch.Tensor | None, n_in: int, group: int) -> torch.Tensor | None:
    """The input-column order that makes the groups contiguous: None when g_idx is absent or already
    i // group; the stable sort of g_idx when every group then holds `group` columns (GPTQ act-order);
    NotEligible otherwise."""
    if g_idx is None:
        return None
    g = g_idx.to(torch.long)
    natural = torch.arange(n_in, device=g.device) // group
    if torch.equal(g, natural):
        return None
    order = torch.sort(g, stable=True).indices
    if not torch.equal(g[order], natural):
        raise NotEligible(f"g_idx does not put {group} input columns in each group")
    return order


def fast_linear(x: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor | None:
    """y = x @ W^T + b through the packed kernel, or None when the exact path must run (switched off,
    not packed, another device, too many rows, autograd, not a float input)."""
    if not _enabled:
        return None
    kernel = qt.meta.get(FAST_KEY)
    if kernel is None:
        kernel = packed_kernel(qt) if PENDING_KEY in qt.meta else None
        if kernel is None:
            return None
    if x.shape[-1] != kernel.n_in or (x.numel() > kernel.max_elements and not _any_rows) or not x.is_floating_point():
        return None
    if x.device != kernel.device:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    return kernel(x, bias)


# --- large CPU outputs ------------------------------------------------------------------------------------
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_LARGE_OUTPUT = 4 << 20     # bytes from which an output asks for huge pages


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


_madvise_fn = _madvise()


def empty_large(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(n) that, for a large CPU tensor on Linux, asks for transparent huge pages on the
    2 MiB-aligned part of it (what torch itself does under THP_MEM_ALLOC_ENABLE=1). A fresh multi-MiB
    buffer is otherwise first touched one 4 KiB page fault at a time: writing a new 32 MiB output costs
    ~21 ms that way against ~5 ms with huge pages (~3 ms to rewrite it), measured on the bench machine.
    Where the kernel refuses (THP off) this is a plain torch.empty."""
    out = torch.empty(n, dtype=dtype, device=device)
    size = n * out.element_size()
    if _madvise_fn is None or out.device.type != "cpu" or size < _LARGE_OUTPUT:
        return out
    start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (out.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
    if stop > start:
        _madvise_fn(start, stop - start, _MADV_HUGEPAGE)    # advice only: a failure changes nothing
    return out
