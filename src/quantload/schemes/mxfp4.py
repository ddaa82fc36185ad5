"""MXFP4 in the gpt-oss layout (transformers `Mxfp4Config`, quant_method "mxfp4"). docs/formats-2025.md.

A quantized parameter `<stem>` of the module at prefix p is two tensors:
  <stem>_blocks  uint8 [..., R, G, 16]  32 E2M1 codes per group, two a byte, the first in the low nibble
  <stem>_scales  uint8 [..., R, G]      E8M0: the group's values are multiplied by 2 ** (byte - 127)
for a weight of R rows (outputs) and G * 32 columns (inputs). gpt-oss stores its experts stacked:
`mlp.experts.gate_up_proj_blocks` [E, 2 * I, H / 32, 16] and `down_proj_blocks` [E, H, I / 32, 16], float
biases beside them (`gate_up_proj_bias`, `down_proj_bias`, not quantized); attention, router, embeddings and
lm_head stay bfloat16 (modules_to_not_convert).

Decoding is transformers' convert_moe_packed_tensors op for op (a lookup table in the target dtype, then
torch.ldexp by the exponent), which is what transformers runs on a CPU (it dequantizes MXFP4 without
Triton). A QTensor keeps the checkpoint's orientation: `dequantize()` is [..., R, G * 32] ([E, out, in] for
experts, so expert e computes F.linear(x, W[e])); transformers' GptOssExperts parameter is its transpose
[E, in, out]. `select_expert(qt, e)` gives expert e as a 2-D QTensor of views (no copy), and
`linear(x, qt_e, bias)` runs one expert; only the experts a router picks are ever dequantized.
"""
from __future__ import annotations

import math

import torch

from ..config import QuantSpec
from ..errors import ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .fp4 import E8M0_BIAS, e2m1_scaled_down
from .hf_match import hf_skipped
from .registry import register_method

GROUP = 32
EXPERT_STEMS = ("gate_up_proj", "down_proj")     # gpt-oss GptOssExperts' quantized parameters


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2 ** e for int32 e in [-149, 128] (the subnormals and +inf included), built from bits."""
    normal = (e + 127).clamp(0, 255) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e > -127, normal, torch.where(e >= -149, sub, 0)).view(torch.float32)


class MXFP4Scheme(Scheme):
    """E2M1 codes in groups of 32 with one E8M0 exponent per group, for the parameter named `stem`."""

    def __init__(self, stem: str = "weight"):
        self.stem = stem
        self.param_name = stem
        self.name = "mxfp4"

    def required_keys(self):
        return (f"{self.stem}_blocks", f"{self.stem}_scales")

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kb, ks = self.required_keys()
        kw = dict(file=file, prefix=prefix)
        blocks, scales = need(pieces, kb, **kw), need(pieces, ks, **kw)
        expect_dtype(blocks, torch.uint8, kb, **kw)
        expect_dtype(scales, torch.uint8, ks, **kw)
        if blocks.ndim < 3 or blocks.shape[-1] != GROUP // 2:
            raise ShapeMismatchError(f"shape {list(blocks.shape)}, expected [..., rows, groups, 16] (32 FP4 values "
                                     "a group, two a byte)", file=file, key=full_key(prefix, kb))
        expect_shape(scales, blocks.shape[:-1], ks, **kw, why="one exponent per 32-value group")
        logical = (*blocks.shape[:-2], blocks.shape[-2] * GROUP)
        if shape is not None and tuple(shape) != logical:
            raise ShapeMismatchError(f"holds a {list(logical)} weight, but the model expects {list(shape)}",
                                     file=file, key=full_key(prefix, kb))
        return QTensor(self, {kb: blocks, ks: scales}, logical, torch.bfloat16)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        kb, ks = self.required_keys()
        blocks, scales = qt.data[kb], qt.data[ks]
        *lead, groups, half = blocks.shape
        rows = math.prod(lead) * groups
        # transformers: table values in `dtype`, then torch.ldexp(values, e, out=values): value * 2 ** e
        # rounded once to `dtype` (0 stays 0 even for e = 128). The same numbers without the slow mixed-dtype
        # ldexp: values by integer shifts (times 2**-14, exact), times exact float32 powers of two. E2M1 values
        # have 2 significant bits, so every float32 product here is exact and only the cast rounds; exponents
        # of 64 and more go in two steps so that no power of two overflows on its own.
        e = scales.reshape(rows, 1).to(torch.int32) - E8M0_BIAS
        small = e2m1_scaled_down(blocks.reshape(rows, half)).to(torch.float32)
        big = e >= 64
        out = small * pow2(e + 14 - 64 * big.to(torch.int32))
        if bool(big.any()):
            out = out * torch.where(big, 2.0 ** 64, 1.0)
        return out.to(dtype).reshape(qt.shape)

    def linear(self, x, qt, bias):
        if qt.ndim != 2:
            raise ShapeMismatchError(f"linear needs one expert's [out, in] weight, got {list(qt.shape)}: "
                                     "use select_expert(qt, e) first")
        return super().linear(x, qt, bias)

    def select_expert(self, qt: QTensor, i: int) -> QTensor:
        """Expert i of stacked [E, R, C] weights: views of its blocks and scales, no copy."""
        if qt.ndim != 3:
            raise ShapeMismatchError(f"select_expert needs stacked [experts, out, in] weights, got {list(qt.shape)}")
        return QTensor(self, {k: v[i] for k, v in qt.data.items()}, qt.shape[1:], qt.dtype, qt.meta)

    def quantize(self, w: torch.Tensor) -> QTensor:
        raise UnsupportedError("quantizing to MXFP4 (gpt-oss) is not supported: transformers does it with Triton "
                               "kernels only; supported runtime FP4: 'nvfp4' (compressed-tensors)")

    def nbytes_for(self, shape, dtype) -> int:
        n = math.prod(shape)
        return n // 2 + n // GROUP


class Mxfp4Spec(QuantSpec):
    """transformers' Mxfp4Config: the experts' gate_up_proj / down_proj are MXFP4, everything in
    modules_to_not_convert (gpt-oss: attention, router, embeddings, lm_head) stays dense. No nn.Linear is
    MXFP4 in this layout: `experts_schemes` is what an experts module asks for."""

    method = "mxfp4"

    def __init__(self, cfg: dict, *, file=None):
        cfg = dict(cfg)
        skip = list(cfg.get("modules_to_not_convert") or [])
        super().__init__(None, skip_modules=skip, raw=cfg)
        self.schemes = {s: MXFP4Scheme(s) for s in EXPERT_STEMS}

    def _skipped(self, name: str) -> bool:
        # gpt-oss lists regexes ("model.layers.*.self_attn"), matched as transformers matches them
        return hf_skipped(name, self.skip_modules)

    def scheme_for(self, module_name, module):
        return None

    def experts_schemes(self, module_name: str) -> dict[str, MXFP4Scheme]:
        """{parameter name: scheme} for the stacked expert parameters of the module `module_name`
        (empty when it is not converted)."""
        return {} if self._skipped(module_name) else dict(self.schemes)

    def decode_unclaimed(self, tensors: dict, *, file=None) -> dict:
        """read_state_dict: every `<prefix>.<stem>_blocks` + `_scales` pair (no Linear owns them) becomes
        one QTensor under `<prefix>.<stem>`."""
        out = dict(tensors)
        for key in [k for k in tensors if k.endswith("_blocks")]:
            base = key[: -len("_blocks")]
            prefix, _, stem = base.rpartition(".")
            if base + "_scales" not in tensors or self._skipped(prefix):
                continue
            scheme = self.schemes.get(stem) or MXFP4Scheme(stem)
            out[base] = scheme.decode({f"{stem}_blocks": out.pop(key), f"{stem}_scales": out.pop(base + "_scales")},
                                      file=file, prefix=prefix)
        return out

    def to_dict(self):
        return dict(self.raw)


@register_method("mxfp4")
def parse_mxfp4(d: dict) -> Mxfp4Spec:
    return Mxfp4Spec(d)
