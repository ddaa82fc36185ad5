"""Pre-quantized Gemma checkpoints (transformers 5.25 `GemmaQuantizationConfig`, quant_method "gemma").
docs/formats-2025.md.

Integer weights with one float32 scale per output row, 2, 4 or 8 bits chosen per module:
  weight                   int8 [O, I] (8 bits), or uint8 [O, ceil(I/2)] (4 bits: two values a byte, the
                           first in the low nibble, stored + 8) or [O, ceil(I/4)] (2 bits: four a byte from
                           bit 0 up, stored + 2)
  weight_scale             float32 [O, 1]
  input_activation_scale   float32 []   SRQ (static range quantization) of the input: x is rounded to
  output_activation_scale  float32 []   round(x / s) clamped to int8, times s; 0 means uncalibrated (no-op)
and, with quantize_embeddings, the token embeddings as `embedding_quantized` (the same packings) with
`embedding_scale` [rows, blocks]. The forward is transformers' QuantizedLinear op for op: SRQ on the input,
weight = int.to(x.dtype) * scale.to(x.dtype), matmul, SRQ on the output. The bits of a module: the config's
num_bits, overridden by the first pattern of module_quant_configs that `re.search` finds in its name (one
alternation regex, as transformers builds it). k_cache_scale / v_cache_scale are read by other tools and
left aside, as transformers does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .hf_match import hf_skipped
from .registry import register_method

BITS = (2, 4, 8)
PER_BYTE = {2: 4, 4: 2, 8: 1}


def unpack_ints(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Stored bytes -> signed int8 values [..., width] (transformers' _unpack_int4 / _unpack_int2)."""
    if bits == 8:
        return packed
    p = packed.to(torch.uint8)
    if bits == 4:
        vals = [(p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8]
    else:
        vals = [((p >> s) & 0x03).to(torch.int8) - 2 for s in (0, 2, 4, 6)]
    return torch.stack(vals, dim=-1).reshape(*p.shape[:-1], -1)[..., :width]


def apply_srq(x: torch.Tensor, scale: torch.Tensor | None, bits: int = 8) -> torch.Tensor:
    """transformers' apply_srq: round to the int grid of `scale` (in x's dtype), a no-op where scale is 0."""
    if scale is None:
        return x
    scale = scale.to(x.dtype)
    hi = 2 ** (bits - 1) - 1
    calibrated = scale != 0
    safe = torch.where(calibrated, scale, torch.ones_like(scale))
    xq = torch.clamp(torch.round(x / safe), float(-hi - 1), float(hi)) * safe
    return torch.where(calibrated, xq, x)


class _GemmaInts(Scheme):
    """What the Linear and the Embedding layouts share: bits, storage dtype, shape checks."""

    def __init__(self, bits: int):
        if bits not in BITS:
            raise UnsupportedError(f"gemma num_bits={bits} is not supported; supported: {list(BITS)}")
        self.bits = bits

    def _check_codes(self, t, shape, suffix, kw) -> tuple[int, int]:
        expect_dtype(t, torch.int8 if self.bits == 8 else torch.uint8, suffix, **kw)
        if t.ndim != 2:
            raise ShapeMismatchError(f"{t.ndim}-d tensor, expected 2-d", file=kw["file"], key=full_key(kw["prefix"], suffix))
        per = PER_BYTE[self.bits]
        if shape is None:
            return t.shape[0], t.shape[1] * per
        rows, width = (int(v) for v in shape)
        expect_shape(t, (rows, -(-width // per)), suffix, **kw,
                     why=f"{per} {self.bits}-bit values a byte of a [{rows}, {width}] table")
        return rows, width

    def encode(self, qt):
        return dict(qt.data)

    def quantize(self, w):
        raise UnsupportedError("the gemma format needs calibration (transformers cannot quantize to it either); "
                               "supported runtime quantization: 'nf4', 'int4', 'int8', 'fp8', 'nvfp4', ...")


class GemmaLinearScheme(_GemmaInts):
    def __init__(self, bits: int):
        super().__init__(bits)
        self.name = f"gemma-int{bits}"

    def required_keys(self):
        return ("weight", "weight_scale")

    def optional_keys(self):
        return ("input_activation_scale", "output_activation_scale")

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w, s = need(pieces, "weight", **kw), need(pieces, "weight_scale", **kw)
        rows, width = self._check_codes(w, shape, "weight", kw)
        expect_dtype(s, torch.float32, "weight_scale", **kw)
        expect_shape(s, (rows, 1), "weight_scale", **kw, why="one scale per output row")
        data = {"weight": w, "weight_scale": s}
        for k in self.optional_keys():
            if k in pieces:
                if pieces[k].numel() != 1:
                    raise ShapeMismatchError(f"shape {list(pieces[k].shape)}, expected a scalar", file=file,
                                             key=full_key(prefix, k))
                data[k] = pieces[k]
        return QTensor(self, data, (rows, width), torch.float32)

    def dequantize(self, qt, dtype):
        ints = unpack_ints(qt.data["weight"], self.bits, qt.shape[1])
        return ints.to(dtype) * qt.data["weight_scale"].to(dtype)

    def linear(self, x, qt, bias):
        x = apply_srq(x, qt.data.get("input_activation_scale"))
        out = F.linear(x, self.dequantize(qt, x.dtype), bias)
        return apply_srq(out, qt.data.get("output_activation_scale"))

    def nbytes_for(self, shape, dtype):
        rows, width = shape
        return rows * -(-width // PER_BYTE[self.bits]) + 4 * rows


class GemmaEmbeddingScheme(_GemmaInts):
    """quantize_embeddings: a lookup dequantizes only the rows asked for, as QuantizedEmbedding does (the
    architecture's embedding scale is applied by QEmbedding afterwards)."""

    param_name = "embedding_quantized"
    quantizes_embeddings = True

    def __init__(self, bits: int):
        super().__init__(bits)
        self.name = f"gemma-embedding-int{bits}"

    def required_keys(self):
        return ("embedding_quantized", "embedding_scale")

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        q, s = need(pieces, "embedding_quantized", **kw), need(pieces, "embedding_scale", **kw)
        rows, width = self._check_codes(q, shape, "embedding_quantized", kw)
        if not s.is_floating_point() or s.ndim != 2 or s.shape[0] != rows or width % s.shape[1]:
            raise ShapeMismatchError(f"shape {list(s.shape)} {s.dtype}, expected float [{rows}, blocks] with blocks "
                                     f"dividing {width}", file=file, key=full_key(prefix, "embedding_scale"))
        return QTensor(self, {"embedding_quantized": q, "embedding_scale": s}, (rows, width), torch.float32)

    def _rows(self, q, s, width, dtype):
        ints = unpack_ints(q, self.bits, width)
        scale = s.repeat_interleave(width // s.shape[-1], dim=-1)
        return ints.to(dtype) * scale.to(dtype)

    def dequantize(self, qt, dtype):
        return self._rows(qt.data["embedding_quantized"], qt.data["embedding_scale"], qt.shape[1], dtype)

    def embedding(self, ids, qt, dtype):
        return self._rows(qt.data["embedding_quantized"][ids], qt.data["embedding_scale"][ids], qt.shape[1], dtype)

    def linear(self, x, qt, bias):
        return F.linear(x, self.dequantize(qt, x.dtype), bias)

    def nbytes_for(self, shape, dtype):
        rows, width = shape
        return rows * -(-width // PER_BYTE[self.bits]) + 4 * rows


class GemmaSpec(QuantSpec):
    method = "gemma"

    def __init__(self, cfg: dict, *, file=None):
        cfg = dict(cfg)
        try:
            self.num_bits = int(cfg.get("num_bits", 4))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"gemma num_bits must be an integer: {e}", file=file) from e
        overrides = cfg.get("module_quant_configs") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"gemma module_quant_configs must be a dict of regex -> options, got "
                              f"{type(overrides).__name__}", file=file)
        for pattern, opts in overrides.items():
            unknown = set(opts or {}) - {"num_bits"}
            if unknown:
                raise UnsupportedError(f"gemma module_quant_configs[{pattern!r}] option(s) {sorted(unknown)} are not "
                                       "supported; supported: ['num_bits']", file=file)
        self.groups = [dict(o or {}) for o in overrides.values()]
        self.matcher = re.compile("|".join(f"(?P<g{i}>{p})" for i, p in enumerate(overrides))) if overrides else None
        self.quantize_embeddings = bool(cfg.get("quantize_embeddings", False))
        skip = cfg.get("modules_to_not_convert")
        self._linear = {b: GemmaLinearScheme(b) for b in BITS}
        self._embedding = {b: GemmaEmbeddingScheme(b) for b in BITS}
        self._bits_for("")                                  # validates num_bits
        super().__init__(None, skip_modules=list(skip) if skip is not None else ["lm_head"], raw=cfg)

    def _bits_for(self, name: str) -> int:
        bits = self.num_bits
        if self.matcher is not None and (m := self.matcher.search(name)) is not None:
            g = next(k for k, v in m.groupdict().items() if v is not None)
            bits = int(self.groups[int(g[1:])].get("num_bits", bits))
        if bits not in BITS:
            raise UnsupportedError(f"gemma num_bits={bits} (module {name!r}) is not supported; supported: {list(BITS)}")
        return bits

    def scheme_for(self, module_name, module):
        if hf_skipped(module_name, self.skip_modules):
            return None
        if isinstance(module, nn.Embedding):
            return self._embedding[self._bits_for(module_name)] if self.quantize_embeddings else None
        if module is not None and not isinstance(module, nn.Linear):
            return None
        return self._linear[self._bits_for(module_name)]

    def decode_unclaimed(self, tensors: dict, *, file=None) -> dict:
        """read_state_dict (no model, so no module is known to be an Embedding): every
        `<prefix>.embedding_quantized` + `embedding_scale` pair becomes one QTensor."""
        out = dict(tensors)
        for key in [k for k in tensors if k.endswith(".embedding_quantized")]:
            prefix = key[: -len(".embedding_quantized")]
            if prefix + ".embedding_scale" not in tensors or hf_skipped(prefix, self.skip_modules):
                continue
            scheme = self._embedding[self._bits_for(prefix)]
            out[key] = scheme.decode({"embedding_quantized": out[key], "embedding_scale": out.pop(prefix + ".embedding_scale")},
                                     file=file, prefix=prefix)
        return out

    def to_dict(self):
        return dict(self.raw)


@register_method("gemma")
def parse_gemma(d: dict) -> GemmaSpec:
    return GemmaSpec(d)
