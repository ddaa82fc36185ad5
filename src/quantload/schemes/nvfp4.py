"""NVFP4 (and its compressed-tensors MXFP4 sibling): E2M1 weights in groups of 16 with an FP8 E4M3 scale
per group and one float32 scale per tensor. Two layouts of the same numbers (docs/formats-2025.md):

compressed-tensors `nvfp4-pack-quantized` (llm-compressor), per Linear, weight [O, I]:
  weight_packed        uint8 [O, I/2]   two E2M1 codes a byte, the first in the low nibble
  weight_scale         float8_e4m3fn [O, I/16]
  weight_global_scale  float32 [1]      W = e2m1 * (weight_scale / weight_global_scale)
  input_global_scale   float32 [1]      static activation schemes only (kept for saving)
  (`mxfp4-pack-quantized`: the same packing, groups of 32, weight_scale uint8 E8M0, no global scale)
NVIDIA ModelOpt `quant_algo: NVFP4` (hf_quant_config.json, or quant_method "modelopt"; modelopt.py):
  weight               uint8 [O, I/2]   the same packed codes
  weight_scale         float8_e4m3fn [O, I/16]
  weight_scale_2       float32 []       W = e2m1 * (weight_scale * weight_scale_2)
  input_scale          float32 []       kept for saving
(compressed-tensors' ModelOpt converter maps one to the other: weight_global_scale = 1 / weight_scale_2.)

Decoding follows each tool op for op: compressed-tensors' NVFP4PackedCompressor.decompress (values and scales
in bfloat16, the product in float32, rounded to bfloat16) and ModelOpt's NVFP4QTensor.dequantize (float32,
rounded once to the target dtype). Quantizing (compressed-tensors layout only) is compressed-tensors'
generate_gparam + calculate_qparams + NVFP4PackedCompressor.compress. The forward dequantizes, then matmuls
(weight-only: W4A4 activation quantization is not emulated).
"""
from __future__ import annotations

import torch

from ..config import register_short_name
from ..errors import ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .fp4 import E2M1_MAX, E2M1_TO_FP16_SHIFT, e2m1_codes, e2m1_scaled_down, e8m0_exponents, pack_codes

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
CT_FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


class _Args:
    """What compressed.py's spec reads from a scheme's args: strategy "group" and the group size make it leave
    a layer whose inputs are not whole groups dense (and list it in `ignore`), as compressed-tensors needs."""

    def __init__(self, strategy: str, group_size: int):
        self.strategy, self.group_size = strategy, group_size


class FP4Scheme(Scheme):
    """E2M1 codes, two a byte, with per-group scales: layout "ct-nvfp4", "ct-mxfp4" or "modelopt"."""

    LAYOUTS = ("ct-nvfp4", "ct-mxfp4", "modelopt")

    def __init__(self, layout: str = "ct-nvfp4"):
        if layout not in self.LAYOUTS:
            raise UnsupportedError(f"FP4 layout {layout!r} is not supported; supported: {list(self.LAYOUTS)}")
        self.layout = layout
        self.group = MXFP4_GROUP if layout == "ct-mxfp4" else NVFP4_GROUP
        self.name = {"ct-nvfp4": "ct-nvfp4", "ct-mxfp4": "ct-mxfp4", "modelopt": "modelopt-nvfp4"}[layout]
        self.args = _Args("group", self.group)
        self.codes_key = "weight" if layout == "modelopt" else "weight_packed"

    def required_keys(self):
        if self.layout == "modelopt":
            return ("weight", "weight_scale", "weight_scale_2")
        if self.layout == "ct-mxfp4":
            return ("weight_packed", "weight_scale")
        return ("weight_packed", "weight_scale", "weight_global_scale")

    def optional_keys(self):
        return ("input_scale",) if self.layout == "modelopt" else ("input_global_scale",)

    # --- decode / encode ------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        codes = need(pieces, self.codes_key, **kw)
        scale = need(pieces, "weight_scale", **kw)
        expect_dtype(codes, torch.uint8, self.codes_key, **kw)
        if codes.ndim != 2:
            raise ShapeMismatchError(f"{codes.ndim}-d tensor, expected [out, in/2]", file=file,
                                     key=full_key(prefix, self.codes_key))
        n_out, n_in = codes.shape[0], codes.shape[1] * 2
        if shape is not None:
            if tuple(shape) != (n_out, n_in):
                raise ShapeMismatchError(f"shape {list(codes.shape)} holds a [{n_out}, {n_in}] weight, but the model "
                                         f"expects {list(shape)} (stored as [{shape[0]}, {shape[1] // 2}])",
                                         file=file, key=full_key(prefix, self.codes_key))
        if n_in % self.group:
            raise ShapeMismatchError(f"{n_in} input columns are not a whole number of {self.group}-value groups",
                                     file=file, key=full_key(prefix, self.codes_key))
        expect_dtype(scale, torch.uint8 if self.layout == "ct-mxfp4" else FP8, "weight_scale", **kw)
        expect_shape(scale, (n_out, n_in // self.group), "weight_scale", **kw,
                     why=f"one scale per {self.group} values of a [{n_out}, {n_in}] weight")
        data = {self.codes_key: codes, "weight_scale": scale}
        for k in self.required_keys()[2:]:
            g = need(pieces, k, **kw)
            expect_dtype(g, torch.float32, k, **kw)
            if g.numel() != 1:
                raise ShapeMismatchError(f"shape {list(g.shape)}, expected one per-tensor scale", file=file,
                                         key=full_key(prefix, k))
            data[k] = g
        for k in self.optional_keys():
            if k in pieces:
                data[k] = pieces[k]
        return QTensor(self, data, (n_out, n_in), torch.bfloat16)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    # --- use ------------------------------------------------------------------------------------
    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        n_out, n_in = qt.shape
        # the E2M1 values times 2**-14 (exact, fast); the power of two is folded into the per-group scales,
        # which leaves every float32 product, hence every rounding, as the tools compute it
        small = e2m1_scaled_down(qt.data[self.codes_key]).unflatten(-1, (-1, self.group))
        scale = qt.data["weight_scale"]
        if self.layout == "ct-mxfp4":
            # MXFP4PackedCompressor.decompress: bfloat16 values times bfloat16 2 ** (e - 127)
            s = 2.0 ** e8m0_exponents(scale).to(torch.bfloat16)
            w = (small.to(torch.bfloat16) * E2M1_TO_FP16_SHIFT) * s.unsqueeze(-1)
            return w.reshape(n_out, n_in).to(dtype)
        if self.layout == "modelopt":
            # NVFP4QTensor.dequantize: float32 values times float32 (weight_scale * weight_scale_2)
            s = scale.to(torch.float32) * qt.data["weight_scale_2"].to(torch.float32)
            w = _times(small, s)
            return w.reshape(n_out, n_in).to(dtype)
        # NVFP4PackedCompressor.decompress: bfloat16 values, float32 scale / global scale, float32 product,
        # rounded to bfloat16
        s = scale.to(torch.bfloat16) / qt.data["weight_global_scale"]
        return _times(small, s).to(torch.bfloat16).reshape(n_out, n_in).to(dtype)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """compressed-tensors NVFP4, weights only: a float32 global scale 448 * 6 / amax(|w|), per-group
        scales max|group| / 6 times it, rounded to FP8 (0 -> 0.125), then codes = e2m1(w / (scale /
        global)) with compressed-tensors' ties, packed two a byte."""
        if self.layout != "ct-nvfp4":
            raise UnsupportedError(f"quantizing to {self.name} is not supported; supported: ct-nvfp4 "
                                   "(compressed-tensors nvfp4-pack-quantized)")
        if w.ndim != 2 or w.shape[1] % self.group:
            raise ShapeMismatchError(f"NVFP4 needs a 2-d weight with a multiple of {self.group} input columns, "
                                     f"got {list(w.shape)}")
        lo, hi = torch.aminmax(w)
        amax = torch.max(torch.min(lo.float(), torch.zeros(())).abs(), torch.max(hi.float(), torch.zeros(())))
        amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
        gscale = torch.nan_to_num(FP8_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)
        g = w.unflatten(-1, (-1, self.group))
        glo, ghi = torch.amin(g, dim=-1).float(), torch.amax(g, dim=-1).float()
        pos = torch.max(torch.min(glo, torch.zeros_like(glo)).abs(), torch.max(ghi, torch.zeros_like(ghi)))
        scales = gscale * (pos / (2 * E2M1_MAX / 2))
        scales = torch.clamp(scales, -FP8_MAX, FP8_MAX).to(FP8).to(torch.float32)
        scales = torch.where(scales == 0, torch.tensor(0.125, device=w.device), scales)
        x = g / (scales / gscale).unsqueeze(-1)
        codes = e2m1_codes(torch.clamp(x, -E2M1_MAX, E2M1_MAX)).flatten(-2)
        data = {"weight_packed": pack_codes(codes), "weight_scale": scales.to(FP8), "weight_global_scale": gscale}
        return QTensor(self, data, w.shape, w.dtype)

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        return n_out * n_in // 2 + n_out * n_in // self.group + (0 if self.layout == "ct-mxfp4" else 4)


def _times(small: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32(value) * s per group, from values held as value * 2**-14: (v * 2**-14) * (s * 2**14) is the
    same real product, so the same float32 (unless s * 2**14 would overflow: then the plain way)."""
    if bool(s.abs().max() < 2.0 ** 100):
        return small.to(torch.float32) * (s * E2M1_TO_FP16_SHIFT).unsqueeze(-1)
    return (small.to(torch.float32) * E2M1_TO_FP16_SHIFT) * s.unsqueeze(-1)


def ct_fp4_scheme(fmt: str, weights: dict, *, file=None) -> FP4Scheme:
    """The scheme for a compressed-tensors config group in an FP4 format (called by compressed.py)."""
    w = dict(weights or {})
    want = {"nvfp4-pack-quantized": NVFP4_GROUP, "mxfp4-pack-quantized": MXFP4_GROUP}[fmt]
    if (int(w.get("num_bits", 4)) != 4 or str(w.get("type", "float")) != "float"
            or w.get("group_size") != want or not w.get("symmetric", True)):
        raise UnsupportedError(f"compressed-tensors {fmt} with weights {w!r} is not supported; supported: "
                               f"symmetric 4-bit float weights in groups of {want}", file=file)
    return FP4Scheme("ct-nvfp4" if fmt == "nvfp4-pack-quantized" else "ct-mxfp4")


register_short_name("nvfp4", {
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
        "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}, "input_activations": None,
        "output_activations": None, "format": None}},
    "kv_cache_scheme": None, "ignore": ["lm_head"]})
