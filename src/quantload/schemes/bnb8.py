"""bitsandbytes LLM.int8 as `Linear8bitLt` / `Int8Params` write it: docs/formats.md §2. Plain torch,
bitsandbytes is never imported.

Per Linear [O, I]:
  weight         int8 [O, I]   CB = round_half_even(W16 * 127 / SCB[o]), W16 = the weight cast to float16
  SCB            float32 [O]   per-row absmax of W16
  weight_format  uint8 []      0 = "row"; bnb >= 0.45 writes only row and refuses the old tiled formats
W = CB * SCB[:, None] * (1/127) in float32 (two roundings, as bnb), then cast.
The outlier threshold is a runtime setting of the activations (never stored): see `Bnb8Scheme.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, QuantStateError, ShapeMismatchError, UnsupportedError
from ..report import KernelChoice
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need

INV_127 = 7.874015718698502e-3     # bnb's literal for 1/127 (int8_vectorwise_dequant)
MM_DEQUANT_SCALE = 6.200124e-05    # bnb's literal for 1/(127*127) (int8_mm_dequant)
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}  # utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING
# int8 x int8 products summed in float32 stay exact while every partial sum is an integer below 2^24:
# 1024 * 127 * 127 < 2^24, so the inner dimension is cut into runs of this length.
_EXACT_RUN = 1024


def int8_rowwise_quantize(a16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb int8_vectorwise_quant (threshold 0) on a float16 matrix: (int8 codes, float32 row absmax).
    A zero row has absmax 0 and 0 * (127/0) = NaN, which bnb's CPU cast turns into 0; we write the 0
    explicitly so every device agrees."""
    scb = a16.abs().amax(1).float()
    scaled = a16 * (127.0 / scb.unsqueeze(1))
    scaled.nan_to_num_(nan=0.0, posinf=127.0, neginf=-127.0)
    return torch.round(scaled).to(torch.int8), scb


def int8_rowwise_dequantize(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """float32, exactly bnb's `A * stats.view(-1, 1) * 7.874015718698502e-3`."""
    return cb * scb.view(-1, 1) * INV_127


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = a [M, K] int8 @ b [N, K] int8 ^T, exact: float32 matmuls over runs of <= 1024 of
    the inner dimension (exact integers), summed as int32."""
    k = a.shape[1]
    if k <= _EXACT_RUN:
        return (a.float() @ b.float().t()).to(torch.int32)
    pad = -k % _EXACT_RUN
    runs = (k + pad) // _EXACT_RUN
    a3 = F.pad(a, (0, pad)).float().view(a.shape[0], runs, _EXACT_RUN).transpose(0, 1)
    b3 = F.pad(b, (0, pad)).float().view(b.shape[0], runs, _EXACT_RUN).permute(1, 2, 0)
    return torch.bmm(a3, b3).to(torch.int32).sum(0, dtype=torch.int32)


_BNB_USES_INT_MM = torch.backends.cpu.get_cpu_capability() == "AVX512"


def int8_matmul_like_bnb(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int32 product exactly as bitsandbytes computes it on this machine, so LLM.int8 layers give
    transformers + bitsandbytes' outputs bit for bit (greedy text included). bnb's CPU backend uses
    torch._int_mm (exact) only with AVX-512; elsewhere its default backend multiplies in float32 and
    truncates to int32, which rounds sums past 2^24 once in_features exceeds ~1040. On CUDA bnb is exact."""
    if a.device.type != "cpu" or _BNB_USES_INT_MM:
        return int8_matmul_exact(a, b)
    return torch.matmul(a.float(), b.float().t()).to(torch.int32)


INT_MM_KEY = "int_mm"   # qt.meta: the fast path computes the int32 product with torch._int_mm


class Bnb8Scheme(Scheme):
    """bitsandbytes LLM.int8 with int8 weights (has_fp16_weights=False, the only inference layout)."""

    name = "bnb-int8"
    param_name = "weight"

    def __init__(self, threshold: float = 6.0, has_fp16_weights: bool = False):
        if has_fp16_weights:
            raise UnsupportedError("LLM.int8 with has_fp16_weights=True keeps float weights and requantizes them "
                                   "on every forward (a training mode); load the weights dense instead")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ConfigError(f"LLM.int8 threshold {threshold!r}, expected a number >= 0")
        self.threshold = float(threshold)
        self.has_fp16_weights = False

    def __repr__(self) -> str:
        return f"Bnb8Scheme(threshold={self.threshold})"

    def required_keys(self):
        return ("weight", "SCB")

    def optional_keys(self):
        return ("weight_format",)

    def present(self, suffixes) -> bool:
        """int8 layers carry SCB (and weight_format); a Linear with only a float weight is dense."""
        return "SCB" in suffixes or "weight_format" in suffixes

    # --- decode / encode ----------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        weight = need(pieces, "weight", file=file, prefix=prefix, why="(int8 codes beside SCB)")
        scb = need(pieces, "SCB", file=file, prefix=prefix, why="(per-row scales of the int8 weight)")
        fmt = pieces.get("weight_format")
        if fmt is not None:
            if fmt.numel() != 1 or fmt.is_floating_point() or fmt.dtype == torch.bool:
                raise QuantStateError(f"weight_format {fmt.dtype} {list(fmt.shape)}, expected a uint8 scalar",
                                      file=file, key=full_key(prefix, "weight_format"))
            code = int(fmt.item())
            if code not in WEIGHT_FORMATS:
                raise QuantStateError(f"weight_format {code} is unknown; expected 0 (row)", file=file,
                                      key=full_key(prefix, "weight_format"))
            if code != 0:
                raise UnsupportedError(f"weight_format {code} ({WEIGHT_FORMATS[code]!r}) is a tiled layout of "
                                       "bitsandbytes < 0.45; only 0 ('row') is supported", file=file,
                                       key=full_key(prefix, "weight_format"))
        expect_dtype(weight, torch.int8, "weight", file=file, prefix=prefix)
        if weight.ndim != 2:
            raise ShapeMismatchError(f"shape {list(weight.shape)}, expected [out_features, in_features]",
                                     file=file, key=full_key(prefix, "weight"))
        if shape is not None:
            expect_shape(weight, shape, "weight", file=file, prefix=prefix, why="the model's Linear")
        expect_dtype(scb, torch.float32, "SCB", file=file, prefix=prefix)
        expect_shape(scb, (weight.shape[0],), "SCB", file=file, prefix=prefix, why="one scale per output row")
        # the checkpoint does not say the original float dtype; bnb's int8 path is float16-centric
        return QTensor(self, {"CB": weight, "SCB": scb}, weight.shape, torch.float16)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        """Linear8bitLt.state_dict: weight, SCB, weight_format (always 0 = row)."""
        return {"weight": qt.data["CB"], "SCB": qt.data["SCB"],
                "weight_format": torch.tensor(0, dtype=torch.uint8, device=qt.device)}

    # --- float <-> int8 -----------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> QTensor:
        """Int8Params._quantize: cast to float16 first, then row-wise absmax quantization."""
        if not w.is_floating_point() or w.ndim != 2:
            raise UnsupportedError(f"LLM.int8 quantizes 2-D float weights, got {w.dtype} {list(w.shape)}")
        cb, scb = int8_rowwise_quantize(w.contiguous().to(torch.float16))
        return QTensor(self, {"CB": cb, "SCB": scb}, w.shape, w.dtype)

    def prepare_runtime(self, qt: QTensor) -> QTensor:
        """The fast path keeps LLM.int8's own algorithm (int8 activations per row, outlier columns in the
        input dtype) and computes its int32 product with torch._int_mm (CPU): the same integers as the
        exact path (bnb's own on AVX-512 CPUs), ~7x faster at one row than float32 runs. The packed
        weight-only int8 kernel (affine_weight) is not used: it skips the activation quantization and
        missed the fidelity bar (top-1 agreement with the exact path 92.2% on SmolLM2, 4096 tokens)."""
        if qt.is_meta:
            return qt
        meta = {k: v for k, v in qt.meta.items() if k != kernels.CHOICE_KEY}
        if not kernels.marking_now():
            meta[kernels.CHOICE_KEY] = kernels.exact_choice()
        elif qt.device.type != "cpu":
            meta[kernels.CHOICE_KEY] = KernelChoice("exact", "torch._int_mm is used on CPU only")
        else:
            meta[INT_MM_KEY] = True
            meta[kernels.CHOICE_KEY] = KernelChoice(
                "int_mm", "LLM.int8's algorithm, its int32 product by torch._int_mm",
                {"int8pack": "weight-only bfloat16 product: top-1 agreement with the exact path 92.2% on "
                             "SmolLM2 (bar: 98%)"})
        return QTensor(self, qt.data, qt.shape, qt.dtype, meta)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        cb, scb = qt.data["CB"], qt.data["SCB"]
        scale = (scb.double() / 127).unsqueeze(1)
        zero = torch.full_like(scale, 128)
        return kernels.AffineWeight(cb.view(torch.uint8) ^ 0x80, scale, 8, cb.shape[1], zero=zero)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        return int8_rowwise_dequantize(qt.data["CB"], qt.data["SCB"]).to(dtype)

    # --- runtime ------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """bnb MatMul8bitLt.forward (inference): the input is cast to float16 and quantized per row;
        with threshold > 0, every input column holding a value with |x| >= threshold is an outlier
        column: its values are left out of the int8 product and added back in the input dtype against
        the dequantized weight columns. int32 accumulation, then bnb's dequant:
        acc * (SCA * SCB) * 6.200124e-05 (+ bias) in float32, cast to the input dtype.
        The int32 product is computed as bnb does on this machine (int8_matmul_like_bnb), so the output
        equals bnb's bit for bit."""
        cb, scb = qt.data["CB"], qt.data["SCB"]
        out_features, in_features = cb.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        if x2.shape[0] == 0:
            return x.new_empty((*lead, out_features))
        a16 = x2.to(torch.float16)
        outlier_cols = None
        if self.threshold > 0:
            outliers = a16.abs() >= self.threshold
            col_mask = outliers.any(0)
            if bool(col_mask.any()):
                outlier_cols = col_mask.nonzero().view(-1)
                a16 = a16.masked_fill(outliers, 0)
        ca, sca = int8_rowwise_quantize(a16)
        if outlier_cols is not None:
            ca[:, outlier_cols] = 0
        if qt.meta.get(INT_MM_KEY) and kernels.fast_kernels_enabled() and ca.device.type == "cpu":
            acc = torch._int_mm(ca, cb.t())          # exact int32, as bnb on AVX-512 (fast path)
        else:
            acc = int8_matmul_like_bnb(ca, cb)
        out = acc * (sca.view(-1, 1) * scb.view(1, -1)) * MM_DEQUANT_SCALE
        if bias is not None:
            out += bias.to(x.dtype)
        out = out.to(x.dtype)
        if outlier_cols is not None:
            sub_w = int8_rowwise_dequantize(cb[:, outlier_cols], scb).to(x.dtype).t()
            out = out.addmm(x2[:, outlier_cols], sub_w)
        return out.view(*lead, out_features)

    def nbytes_for(self, shape, dtype) -> int:
        out_features, in_features = shape
        return out_features * in_features + 4 * out_features
