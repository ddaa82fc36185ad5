"""FBGEMM FP8 per output channel (transformers `FbgemmFp8Config`, quant_method "fbgemm_fp8"; Meta's Llama
FP8 releases). docs/formats-2025.md.

Per Linear, weight [O, I]:
  weight        float8_e4m3fn [O, I]
  weight_scale  float32 [O, 1]        W = float32(weight) * weight_scale
(`input_scale_ub`, the activation-scale bound, is a non-persistent buffer: config only, never in the file.)
transformers runs it only on CUDA, through fbgemm-gpu's f8f8bf16_rowwise, which also quantizes the
activations per row; here the forward is weight-only: dequantize to the compute dtype, then matmul.
Quantizing follows fbgemm's row-wise reference (quantize_test.fp8_row_quantize_ref, "match kernel logics"):
scale = min(448 / rowmax, 448 * 512), weight = fp8(w * scale), weight_scale = 1 / scale, in float32 as the
CUDA kernel computes (fbgemm-gpu does not run here, so its fast-math division is not reproduced: a value on
an exact FP8 rounding tie may land one step apart).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import ShapeMismatchError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape
from .fp8_block import FP8, FP8_MAX, fp8_matrix
from .hf_match import hf_skipped
from .registry import register_method



class FbgemmFP8Scheme(Scheme):
    name = "fbgemm-fp8"

    def required_keys(self):
        return ("weight", "weight_scale")

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w, s = fp8_matrix(pieces, "weight_scale", shape=shape, **kw)
        expect_dtype(s, (torch.float32, torch.bfloat16, torch.float16), "weight_scale", **kw)
        expect_shape(s, (w.shape[0], 1), "weight_scale", **kw, why="one scale per output row")
        return QTensor(self, {"weight": w, "weight_scale": s}, w.shape, torch.bfloat16)

    def encode(self, qt):
        return dict(qt.data)

    def dequantize(self, qt, dtype):
        return (qt.data["weight"].to(torch.float32) * qt.data["weight_scale"].to(torch.float32)).to(dtype)

    def quantize(self, w):
        if w.ndim != 2:
            raise ShapeMismatchError(f"can only quantize 2-d weights, got {list(w.shape)}")
        rowmax = w.abs().amax(dim=1).to(torch.float32)
        scale = (FP8_MAX / rowmax).clamp(max=FP8_MAX * 512.0)
        q = (w * scale.unsqueeze(1)).to(FP8)
        return QTensor(self, {"weight": q, "weight_scale": scale.reciprocal().reshape(-1, 1)}, w.shape, w.dtype)

    def nbytes_for(self, shape, dtype):
        return shape[0] * shape[1] + 4 * shape[0]


class FbgemmFP8Spec(QuantSpec):
    method = "fbgemm_fp8"

    def __init__(self, cfg: dict):
        skip = list(cfg.get("modules_to_not_convert") or [])
        if "lm_head" not in skip:
            skip.append("lm_head")
        super().__init__(FbgemmFP8Scheme(), skip_modules=skip, raw=dict(cfg))

    def scheme_for(self, module_name, module):
        # transformers' modules_to_not_convert rule (a regex from the start, or a suffix)
        if (module is not None and not isinstance(module, nn.Linear)) or hf_skipped(module_name, self.skip_modules):
            return None
        return self.scheme


@register_method("fbgemm_fp8")
def parse_fbgemm_fp8(d: dict) -> FbgemmFP8Spec:
    return FbgemmFP8Spec(d)
