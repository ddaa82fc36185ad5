"""Fine-grained FP8 (transformers `FineGrainedFP8Config`, quant_method "fp8"): DeepSeek-V3/V4, Qwen3 "-FP8"
and MiniMax releases. docs/formats-2025.md.

Per Linear at prefix p, weight [O, I]:
  weight            float8_e4m3fn [O, I]
  weight_scale_inv  the multiplier back to real values, one per block of weight_block_size [bh, bw]:
                    [ceil(O/bh), ceil(I/bw)], float32 (scale_fmt "float", V3) or a power of two
                    (scale_fmt "ue8m0", V4: torch.float8_e8m0fnu, or its raw bytes as uint8);
                    a 0-d float32 when weight_block_size is null (one scale per tensor)
  activation_scale  float32 scalar, activation_scheme "static" only (kept for saving)
W = float32(weight) * float32(weight_scale_inv), cast to the compute dtype: transformers' Fp8Dequantize, which
is also what transformers runs on a CPU (it dequantizes FP8 checkpoints when no GPU is present). Leading
dimensions (experts stacked [E, O, I] with scales [E, ...]) decode the same way; `select_expert` slices one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantSpec, register_short_name
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .hf_match import hf_skipped
from .registry import register_method

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
UE8M0 = getattr(torch, "float8_e8m0fnu", None)
SCALE_FORMATS = ("float", "ue8m0")
ACTIVATION_SCHEMES = ("dynamic", "static")


def fp8_matrix(pieces, scale_key: str, *, shape=None, file=None, prefix=""):
    """(weight, scale) of a plain 2-d float8_e4m3fn weight and its scale piece, the weight checked against
    the model's shape: what every per-tensor and per-channel FP8 layout (FBGEMM, ModelOpt) starts with."""
    kw = dict(file=file, prefix=prefix)
    w, s = need(pieces, "weight", **kw), need(pieces, scale_key, **kw)
    expect_dtype(w, FP8, "weight", **kw)
    if w.ndim != 2:
        raise ShapeMismatchError(f"{w.ndim}-d tensor, expected [out, in]", file=file, key=full_key(prefix, "weight"))
    if shape is not None:
        expect_shape(w, tuple(shape), "weight", **kw, why="the model's weight shape")
    return w, s


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_to_float(s: torch.Tensor) -> torch.Tensor:
    """weight_scale_inv -> float32 multipliers. E8M0 stored as raw bytes (uint8) is 2 ** (byte - 127),
    as transformers' Fp8Dequantize reads MXFP8 checkpoints; every other dtype is a plain cast."""
    if s.dtype == torch.uint8:
        return (s.to(torch.float32) - 127.0).exp2()
    return s.to(torch.float32)


FP8_TO_FP16_SHIFT = 2.0 ** 8     # e4m3 bits shifted into float16's place read as value * 2 ** -8


def fp8_scaled_down(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 values exactly q * 2 ** -8, 5x faster on CPU than q.to(float32) (which is
    not vectorized): the sign-extended byte shifted left by 7 is the float16 whose exponent field is e4m3's
    (bias 7 instead of 15, hence the factor), subnormals included; bit 14 is a copy of the sign, cleared.
    None if q holds a NaN code (0x7F / 0xFF), which this mapping would not keep."""
    u = q.view(torch.uint8)
    if u.numel() and int((u & 0x7F).max()) == 0x7F:
        return None
    bits = (u.view(torch.int8).to(torch.int16) << 7) & ~0x4000
    return bits.view(torch.float16).to(torch.float32)


def fp8_times_scales(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """float32(q) * s per block, bit for bit: (q * 2**-8) * (s * 2**8) is the same real product as q * s,
    so it rounds to the same float32 (the power of two moves to the small scale tensor)."""
    v = fp8_scaled_down(q)
    if v is None or not bool(s.abs().max() < 2.0 ** 100):
        return apply_block_scales(q.to(torch.float32), s, block)
    return apply_block_scales(v, s * FP8_TO_FP16_SHIFT, block)


def apply_block_scales(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float32 q [..., O, I] times float32 per-block scales [..., ceil(O/bh), ceil(I/bw)] (or one scale).
    Whole blocks multiply through a view (no scale-sized copy); partial edge blocks repeat the scales and
    crop, as transformers' FP8Linear allocates them."""
    if block is None or s.ndim == 0 or s.numel() == 1:
        return q * s.reshape(())
    rows, cols = q.shape[-2:]
    bh, bw = block
    if rows % bh == 0 and cols % bw == 0:
        lead = q.shape[:-2]
        v = q.reshape(*lead, rows // bh, bh, cols // bw, bw)
        return (v * s.unsqueeze(-1).unsqueeze(-3)).reshape(q.shape)
    full = s.repeat_interleave(bh, dim=-2)[..., :rows, :].repeat_interleave(bw, dim=-1)[..., :cols]
    return q * full


class FP8BlockScheme(Scheme):
    """float8_e4m3fn weights with a float32 or UE8M0 scale per [bh, bw] block (or per tensor)."""

    def __init__(self, block: tuple[int, int] | None = (128, 128), scale_fmt: str = "float",
                 activation_scheme: str = "dynamic"):
        if scale_fmt not in SCALE_FORMATS:
            raise UnsupportedError(f"fp8 scale_fmt {scale_fmt!r} is not supported; supported: {list(SCALE_FORMATS)}")
        if scale_fmt == "ue8m0" and UE8M0 is None:
            raise UnsupportedError("fp8 scale_fmt 'ue8m0' needs torch.float8_e8m0fnu (PyTorch >= 2.7)")
        self.block = tuple(int(b) for b in block) if block is not None else None
        self.scale_fmt = scale_fmt
        self.activation_scheme = activation_scheme
        shape = "tensor" if self.block is None else "block{}x{}".format(*self.block)
        self.name = f"fp8-{shape}-{scale_fmt}"

    def required_keys(self):
        return ("weight", "weight_scale_inv")

    def optional_keys(self):
        return ("activation_scale",)

    def scale_shape(self, shape) -> tuple[int, ...]:
        if self.block is None:
            return ()
        *lead, rows, cols = shape
        return (*lead, _cdiv(rows, self.block[0]), _cdiv(cols, self.block[1]))

    # --- decode / encode ------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w = need(pieces, "weight", **kw)
        s = need(pieces, "weight_scale_inv", **kw)
        expect_dtype(w, FP8, "weight", **kw)
        if w.ndim < 2:
            raise ShapeMismatchError(f"{w.ndim}-d tensor, expected [out, in] (or [experts, out, in])",
                                     file=file, key=full_key(prefix, "weight"))
        if shape is not None:
            expect_shape(w, tuple(shape), "weight", **kw, why="the model's weight shape")
        if self.scale_fmt == "ue8m0":
            expect_dtype(s, (UE8M0, torch.uint8), "weight_scale_inv", **kw)
        elif not s.is_floating_point() or s.element_size() < 2:
            raise ShapeMismatchError(f"dtype {s.dtype}, expected float32 (scale_fmt 'float'); 'ue8m0' scales "
                                     "need scale_fmt='ue8m0' in the config", file=file,
                                     key=full_key(prefix, "weight_scale_inv"))
        if self.block is None:
            if s.numel() != 1:
                raise ShapeMismatchError(f"shape {list(s.shape)}, expected one scale (weight_block_size is null)",
                                         file=file, key=full_key(prefix, "weight_scale_inv"))
        else:
            expect_shape(s, self.scale_shape(w.shape), "weight_scale_inv", **kw,
                         why="one scale per {}x{} block of a {} weight".format(*self.block, list(w.shape)))
        data = {"weight": w, "weight_scale_inv": s}
        if "activation_scale" in pieces:
            data["activation_scale"] = pieces["activation_scale"]
        return QTensor(self, data, w.shape, torch.bfloat16)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    # --- use ------------------------------------------------------------------------------------
    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        return fp8_times_scales(qt.data["weight"], scale_to_float(qt.data["weight_scale_inv"]), self.block).to(dtype)

    def select_expert(self, qt: QTensor, i: int) -> QTensor:
        """Expert i of a stacked [E, O, I] weight: views of its weight and scales, no copy."""
        if qt.ndim != 3:
            raise ShapeMismatchError(f"select_expert needs a stacked [experts, out, in] weight, got {list(qt.shape)}")
        data = {k: (v[i] if v.ndim == 3 else v) for k, v in qt.data.items()}
        return QTensor(self, data, qt.shape[1:], qt.dtype, qt.meta)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """transformers' Fp8Quantize, op for op: per-block amax in float32, scale = 448 / amax (1 for an
        all-zero block), stored inverse 1 / scale (ue8m0: rounded up to a power of two first, and the
        weight divided by exactly that), weight clamped to +-448 and cast."""
        if w.ndim < 2:
            raise ShapeMismatchError(f"can only quantize 2-d (or stacked 3-d) weights, got {list(w.shape)}")
        rows, cols = w.shape[-2:]
        bh, bw = self.block if self.block is not None else (rows, cols)
        if rows % bh or cols % bw:
            raise ShapeMismatchError(f"a [{rows}, {cols}] weight is not a whole number of {bh}x{bw} blocks "
                                     "(transformers leaves such a weight unquantized)")
        lead = w.shape[:-2]
        v = w.to(torch.float32).reshape(*lead, rows // bh, bh, cols // bw, bw)
        amax = v.abs().amax(dim=(-3, -1))
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scales = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(safe))
        inv = (1.0 / scales).to(torch.float32)
        if self.scale_fmt == "ue8m0":
            inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny)))).to(UE8M0)
            scales = 1.0 / inv.to(torch.float32)
        q = torch.clamp(v * scales.unsqueeze(-1).unsqueeze(-3), min=-FP8_MAX, max=FP8_MAX).to(FP8)
        if self.block is None and not lead:
            inv = inv.reshape(())   # one scale for the tensor, stored 0-d as per-tensor checkpoints keep it
        return QTensor(self, {"weight": q.reshape(w.shape), "weight_scale_inv": inv}, w.shape, w.dtype)

    def nbytes_for(self, shape, dtype) -> int:
        n = 1
        for d in self.scale_shape(shape):
            n *= d
        per = 1 if self.scale_fmt == "ue8m0" else 4
        return int(torch.Size(shape).numel()) + n * per


# --- quantization_config --------------------------------------------------------------------------
class FP8Spec(QuantSpec):
    """transformers' FineGrainedFP8Config: one FP8 scheme for every Linear not in modules_to_not_convert."""

    method = "fp8"

    def __init__(self, cfg: dict, *, file=None):
        cfg = dict(cfg)
        act = str(cfg.get("activation_scheme", "dynamic")).lower()
        if act not in ACTIVATION_SCHEMES:
            raise UnsupportedError(f"fp8 activation_scheme {act!r} is not supported; supported: "
                                   f"{list(ACTIVATION_SCHEMES)}", file=file)
        block = cfg.get("weight_block_size", (128, 128))
        if block is not None:
            if not isinstance(block, (list, tuple)) or len(block) != 2 or any(int(b) <= 0 for b in block):
                raise ConfigError(f"fp8 weight_block_size must be two positive integers or null, got {block!r}",
                                  file=file)
        fmt = str(cfg.get("scale_fmt") or "float").lower()
        if fmt not in SCALE_FORMATS:
            raise UnsupportedError(f"fp8 scale_fmt {fmt!r} is not supported; supported: {list(SCALE_FORMATS)}",
                                   file=file)
        if str(cfg.get("expert_dtype", "fp8")).lower() != "fp8":
            raise UnsupportedError(f"fp8 expert_dtype {cfg['expert_dtype']!r} (FP4-packed experts) is not supported; "
                                   "supported: ['fp8']", file=file)
        if cfg.get("modules_to_convert"):
            raise UnsupportedError(f"fp8 modules_to_convert {cfg['modules_to_convert']!r} (FP8 embedding tables) is "
                                   "not supported; supported: FP8 Linear layers", file=file)
        skip = cfg.get("modules_to_not_convert")
        if skip is None:
            skip = cfg.get("ignored_layers")            # MiniMax's name for it, as transformers accepts
        skip = list(skip or [])
        if "lm_head" not in skip:
            skip.append("lm_head")                        # transformers never converts the output head
        super().__init__(FP8BlockScheme(block, fmt, act), skip_modules=skip, raw=cfg)

    def scheme_for(self, module_name, module):
        if (module is not None and not isinstance(module, nn.Linear)) or hf_skipped(module_name, self.skip_modules):
            return None
        scheme = self.scheme
        if module is not None and scheme.block is not None:
            bh, bw = scheme.block
            if module.out_features % bh or module.in_features % bw:
                return None                               # transformers' Fp8Quantize leaves it in float too
        return scheme

    def to_dict(self):
        return dict(self.raw)


@register_method("fp8")
def parse_fp8(d: dict) -> FP8Spec:
    return FP8Spec(d)


register_short_name("fp8", {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
register_short_name("fp8-ue8m0", {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
