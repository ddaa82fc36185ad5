"""BitNet b1.58 packed ternary weights (transformers `BitNetQuantConfig`, quant_method "bitnet";
microsoft/bitnet-b1.58-2B-4T). docs/formats-2025.md.

Per Linear, weight [O, I] with O a multiple of 4:
  weight        uint8 [O/4, I]  four ternary values a byte, packed along the rows: byte [r, c] holds rows
                                r, r + O/4, r + 2*O/4, r + 3*O/4 of column c in bits 0-1, 2-3, 4-5, 6-7,
                                each stored as value + 1 (0, 1, 2 for -1, 0, +1)
  weight_scale  [1] in the model dtype
The model was trained with its activations quantized, so the forward is part of the format and is
transformers' BitLinear op for op: x is rounded per token to int8 (scale 127 / max|x|, clamped at 1e-5),
multiplied by the ternary weight in the compute dtype, and divided by (weight_scale * activation scale);
`linear_class: "autobitlinear"` (offline) instead fake-quantizes x in float32 and multiplies the output by
weight_scale. `dequantize()` is the effective float weight: ternary / weight_scale (bitlinear) or
ternary * weight_scale (autobitlinear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from ..errors import ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .registry import register_method

PER_BYTE = 4
LINEAR_CLASSES = ("bitlinear", "autobitlinear")


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [R, C] -> [4R, C] values in {-1, 0, 1}, as transformers' unpack_weights."""
    planes = [(packed >> (2 * i)) & 3 for i in range(PER_BYTE)]
    return torch.cat(planes, dim=0).to(dtype) - 1


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """[O, C] values in {-1, 0, 1} (O a multiple of 4) -> uint8 [O/4, C], as transformers' pack_weights."""
    u = (q + 1).to(torch.uint8)
    r = q.shape[0] // PER_BYTE
    out = torch.zeros((r, *q.shape[1:]), dtype=torch.uint8, device=q.device)
    for i in range(PER_BYTE):
        out |= u[i * r:(i + 1) * r] << (2 * i)
    return out


class BitNetScheme(Scheme):
    def __init__(self, linear_class: str = "bitlinear"):
        if linear_class not in LINEAR_CLASSES:
            raise UnsupportedError(f"BitNet linear_class {linear_class!r} is not supported; supported: "
                                   f"{list(LINEAR_CLASSES)}")
        self.linear_class = linear_class
        self.name = "bitnet" if linear_class == "bitlinear" else "bitnet-auto"

    def required_keys(self):
        return ("weight", "weight_scale")

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w, s = need(pieces, "weight", **kw), need(pieces, "weight_scale", **kw)
        expect_dtype(w, torch.uint8, "weight", **kw)
        if w.ndim != 2:
            raise ShapeMismatchError(f"{w.ndim}-d tensor, expected [out/4, in]", file=file,
                                     key=full_key(prefix, "weight"))
        if shape is not None:
            expect_shape(w, (shape[0] // PER_BYTE, shape[1]), "weight", **kw,
                         why=f"four ternary rows a byte of a {list(shape)} weight")
            if shape[0] % PER_BYTE:
                raise ShapeMismatchError(f"{shape[0]} output rows are not a multiple of 4", file=file,
                                         key=full_key(prefix, "weight"))
        if not s.is_floating_point() or s.numel() != 1:
            raise ShapeMismatchError(f"dtype {s.dtype} shape {list(s.shape)}, expected one float scale", file=file,
                                     key=full_key(prefix, "weight_scale"))
        return QTensor(self, {"weight": w, "weight_scale": s}, (w.shape[0] * PER_BYTE, w.shape[1]), s.dtype)

    def encode(self, qt):
        return dict(qt.data)

    def ternary(self, qt, dtype) -> torch.Tensor:
        return unpack_ternary(qt.data["weight"], dtype)

    def dequantize(self, qt, dtype):
        s = qt.data["weight_scale"].to(dtype)
        t = self.ternary(qt, dtype)
        return t / s if self.linear_class == "bitlinear" else t * s

    def linear(self, x, qt, bias):
        dtype = x.dtype
        w = self.ternary(qt, dtype)
        s = qt.data["weight_scale"]
        if self.linear_class == "autobitlinear":
            # AutoBitLinear (offline): ActQuant in float32, then the output times weight_scale
            a = x.float()
            scale = 127 / a.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
            a = ((a * scale).round().clamp(-128, 127) / scale).to(dtype)
            return F.linear(a, w, bias) * s
        # BitLinear.activation_quant + post_quant_process
        scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        xq = (x * scale).round().clamp(-128, 127).to(torch.int8)
        y = F.linear(xq.to(dtype), w)
        y = y / (s * scale)
        if bias is not None:
            y += bias.view(1, -1).expand_as(y)
        return y

    def quantize(self, w):
        """transformers' WeightQuant (absmean ternary) + pack_weights; weight_scale = 1 / mean|w| for
        bitlinear (the output is divided by it), mean|w| for autobitlinear."""
        if w.ndim != 2 or w.shape[0] % PER_BYTE:
            raise ShapeMismatchError(f"BitNet needs a 2-d weight with a multiple of 4 rows, got {list(w.shape)}")
        f = w.float()
        scale = 1.0 / f.abs().mean().clamp_(min=1e-5)
        q = (f * scale).round().clamp(-1, 1)
        ws = scale if self.linear_class == "bitlinear" else 1.0 / scale
        return QTensor(self, {"weight": pack_ternary(q), "weight_scale": ws.reshape(1).to(w.dtype)}, w.shape, w.dtype)

    def nbytes_for(self, shape, dtype):
        return shape[0] * shape[1] // PER_BYTE + dtype.itemsize


class BitNetSpec(QuantSpec):
    method = "bitnet"

    def __init__(self, cfg: dict):
        cfg = dict(cfg)
        cls = str(cfg.get("linear_class", "bitlinear")).lower()
        mode = str(cfg.get("quantization_mode", "offline")).lower()
        if cls not in LINEAR_CLASSES or mode != "offline" or cfg.get("use_rms_norm"):
            raise UnsupportedError(f"BitNet linear_class={cls!r}, quantization_mode={mode!r}, use_rms_norm="
                                   f"{cfg.get('use_rms_norm', False)!r} is not supported; supported: packed offline "
                                   f"{list(LINEAR_CLASSES)} without use_rms_norm")
        skip = list(cfg.get("modules_to_not_convert") or [])
        if "lm_head" not in skip:
            skip.append("lm_head")
        super().__init__(BitNetScheme(cls), skip_modules=skip, raw=cfg)


@register_method("bitnet")
def parse_bitnet(d: dict) -> BitNetSpec:
    return BitNetSpec(d)
