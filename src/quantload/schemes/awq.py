"""AWQ checkpoints (AutoAWQ, transformers' AwqConfig): docs/formats.md §4. 4-bit only.

GEMM (version "gemm", the common one), in_features I, out_features O, G = group_size:
  qweight int32 [I, O/8]    packed along the OUTPUT dim, nibble i of a word = column 8c + ORDER[i]
  qzeros  int32 [I/G, O/8]  same interleave; the stored value is the true zero-point
  scales  float [I/G, O]
GEMV (version "gemv"):
  qweight int32 [O, I/8]    packed along the INPUT dim, sequential nibbles
  qzeros  int32 [O, Wz]     Wz = calculate_zeros_width(I, G): the groups padded up to a whole word count
  scales  float [O, Wz*8]   the real groups are the first I/G columns
W = (q - z) * s. zero_point=False (never written by AutoAWQ, but allowed by the config): no qzeros and
an implicit zero-point of 2^(bits-1), the symmetric range stored unsigned.
"""
from __future__ import annotations

import torch

from ..config import QuantSpec
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_float, expect_shape, full_key, need
from .intpack import unpack_stream
from .registry import register_method

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]
# kernels that run the GEMM layout (transformers' AwqConfig 'version' names a kernel, not always a layout)
_GEMM_LAYOUT = ("gemm", "exllama", "ipex")
_VERSIONS = (*_GEMM_LAYOUT, "gemv")


def unpack_awq_gemm(words: torch.Tensor, n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """[R, n/8] int32 with the AWQ nibble interleave -> [R, n] codes in column order: the sequential
    nibbles, then the columns of each word put back in place."""
    seq = unpack_stream(words, 4, words.shape[-1] * 8, dim=-1, dtype=dtype).unflatten(-1, (-1, 8))
    return seq[..., list(AWQ_REVERSE_ORDER)].flatten(-2)[..., :n]


def calculate_zeros_width(in_features: int, group_size: int, pack_num: int = 8) -> int:
    """AutoAWQ's GEMV zeros width: ceil(groups / 8), rounded up to a multiple of 1/2/4 words for group
    sizes >= 128 / 64 / 32."""
    mult = 1 if group_size >= 128 else 2 if group_size == 64 else 4 if group_size == 32 else None
    if mult is None:
        raise UnsupportedError(f"AWQ GEMV group_size={group_size} is not supported; expected 32, 64 or >= 128")
    base = -(-(in_features // group_size) // pack_num)
    return -(-base // mult) * mult


class AWQScheme(kernels.FastLinear, Scheme):
    param_name = "weight"
    bits = 4

    def __init__(self, group_size: int = 128, *, version: str = "gemm", zero_point: bool = True, bits: int = 4):
        if bits != 4:
            raise UnsupportedError(f"AWQ bits={bits} is not supported; AutoAWQ's GEMM/GEMV layouts are 4-bit only")
        version = str(version).lower()
        if version not in _VERSIONS:
            raise UnsupportedError(f"AWQ version {version!r} is not supported; supported: {list(_VERSIONS)} "
                                   "(gemv_fast, marlin and llm-awq are different layouts)")
        if not (group_size == -1 or group_size > 0):
            raise ConfigError(f"AWQ group_size={group_size}; expected -1 or a positive integer")
        self.group_size = group_size
        self.layout = "gemv" if version == "gemv" else "gemm"
        self.zero_point = zero_point
        self.name = f"awq-{self.layout}-4bit-g{group_size}{'' if zero_point else '-nozp'}"

    def required_keys(self):
        return ("qweight", "qzeros", "scales") if self.zero_point else ("qweight", "scales")

    def optional_keys(self):
        return () if self.zero_point else ("qzeros",)

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        qweight = need(pieces, "qweight", **kw)
        scales = need(pieces, "scales", **kw)
        qzeros = need(pieces, "qzeros", **kw) if self.zero_point else pieces.get("qzeros")
        expect_dtype(qweight, torch.int32, "qweight", **kw)
        if qzeros is not None:
            expect_dtype(qzeros, torch.int32, "qzeros", **kw)
        expect_float(scales, "scales", **kw)
        if qweight.ndim != 2:
            raise ShapeMismatchError(f"{qweight.ndim}-d tensor, expected 2-d", file=file,
                                     key=full_key(prefix, "qweight"))
        if self.layout == "gemm":
            n_out, n_in = (qweight.shape[1] * 8, qweight.shape[0]) if shape is None else map(int, shape)
            expect_shape(qweight, (n_in, -(-n_out // 8)), "qweight", **kw,
                         why=f"GEMM layout: {n_in} inputs x {n_out} outputs packed 8 per word along the outputs"
                             + ("; a GPTQ-style [I*4/32, O] qweight is not AWQ" if qweight.shape[1] == n_out else ""))
        else:
            n_out, n_in = (qweight.shape[0], qweight.shape[1] * 8) if shape is None else map(int, shape)
            expect_shape(qweight, (n_out, -(-n_in // 8)), "qweight", **kw,
                         why=f"GEMV layout: {n_out} outputs x {n_in} inputs packed 8 per word along the inputs")
        gs = n_in if self.group_size == -1 else self.group_size
        if n_in % gs:
            raise ShapeMismatchError(f"in_features {n_in} is not a multiple of group_size {gs}", file=file,
                                     key=full_key(prefix, "qweight"))
        n_groups = n_in // gs
        if self.layout == "gemm":
            expect_shape(scales, (n_groups, n_out), "scales", **kw, why=f"{n_groups} groups x {n_out} outputs")
            if qzeros is not None:
                expect_shape(qzeros, (n_groups, -(-n_out // 8)), "qzeros", **kw,
                             why=f"{n_groups} groups x {n_out} outputs packed 8 per word")
        else:
            width = calculate_zeros_width(n_in, gs)
            expect_shape(scales, (n_out, width * 8), "scales", **kw,
                         why=f"GEMV: {n_out} outputs x {n_groups} groups padded to {width * 8}")
            if qzeros is not None:
                expect_shape(qzeros, (n_out, width), "qzeros", **kw,
                             why=f"GEMV: {n_out} outputs x {n_groups} groups packed 8 per word, padded to {width}")
        data = {"qweight": qweight, "scales": scales}
        if qzeros is not None:
            data["qzeros"] = qzeros
        return QTensor(self, data, (n_out, n_in), scales.dtype, {"group_size": gs, "n_groups": n_groups})

    # --- use ------------------------------------------------------------------------------------
    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        n_out, n_in = qt.shape
        gs, ng = qt.meta["group_size"], qt.meta["n_groups"]
        qzeros, scales = qt.data.get("qzeros"), qt.data["scales"]
        dt = scales.dtype
        if self.layout == "gemm":                      # [inputs, outputs], groups along dim 0
            q = unpack_awq_gemm(qt.data["qweight"], n_out, torch.uint8).reshape(ng, gs, n_out)
            z = unpack_awq_gemm(qzeros, n_out).unsqueeze(1) if qzeros is not None else None
            s = scales.unsqueeze(1)
        else:                                          # [outputs, inputs], groups along dim 1
            q = unpack_stream(qt.data["qweight"], 4, n_in, dim=1, dtype=torch.uint8).reshape(n_out, ng, gs)
            z = unpack_stream(qzeros, 4, ng, dim=1).unsqueeze(-1) if qzeros is not None else None
            s = scales[:, :ng].unsqueeze(-1)
        # AutoAWQ's math: (q - z) * s, the difference an exact integer, one multiply in the scales' dtype
        w = (q.to(dt) - (z.to(dt) if z is not None else 1 << (self.bits - 1))) * s
        w = w.reshape(n_in, n_out).t() if self.layout == "gemm" else w.reshape(n_out, n_in)
        # a contiguous [O, I] weight, so a matmul on it rounds the same as on any other weight
        return w.to(dtype).contiguous()

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """The packed-kernel form (runtime/kernels.py): codes [O, I], zero-points and scales [O, groups]."""
        n_out, n_in = qt.shape
        gs, ng = qt.meta["group_size"], qt.meta["n_groups"]
        qzeros, scales = qt.data.get("qzeros"), qt.data["scales"]
        if self.layout == "gemm":
            q = unpack_awq_gemm(qt.data["qweight"], n_out, torch.uint8).t()
            z = unpack_awq_gemm(qzeros, n_out).t() if qzeros is not None else None
            s = scales.t()
        else:
            q = unpack_stream(qt.data["qweight"], 4, n_in, dim=1, dtype=torch.uint8)
            z = unpack_stream(qzeros, 4, ng, dim=1) if qzeros is not None else None
            s = scales[:, :ng]
        if z is None:
            z = torch.full(s.shape, 1 << (self.bits - 1), dtype=torch.int32, device=s.device)
        return kernels.AffineWeight(q, s, self.bits, gs, zero=z)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def quantize(self, w: torch.Tensor) -> QTensor:
        raise UnsupportedError(f"runtime quantization to {self.name} is not supported (AWQ needs calibration data); use "
                               "quantize='int4' or another compressed-tensors spec")

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        gs = n_in if self.group_size == -1 else self.group_size
        ng = -(-n_in // gs)
        isz = torch.finfo(dtype).bits // 8
        if self.layout == "gemm":
            words = n_in * -(-n_out // 8) + (ng * -(-n_out // 8) if self.zero_point else 0)
            return 4 * words + ng * n_out * isz
        width = calculate_zeros_width(n_in, gs)
        return 4 * (n_out * -(-n_in // 8) + (n_out * width if self.zero_point else 0)) + n_out * width * 8 * isz


# --- quantization_config ------------------------------------------------------------------------
class AWQSpec(QuantSpec):
    method = "awq"

    def __init__(self, cfg: dict):
        cfg = dict(cfg)
        if str(cfg.get("backend", "autoawq")).lower() == "llm-awq":
            raise UnsupportedError("AWQ backend 'llm-awq' is a different on-disk layout; only AutoAWQ's GEMM/GEMV")
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        gs = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        version = str(cfg.get("version", "gemm")).lower()
        zero_point = bool(cfg.get("zero_point", True))
        scheme = AWQScheme(gs, version=version, zero_point=zero_point, bits=bits)
        skip = cfg.get("modules_to_not_convert")
        super().__init__(scheme, skip_modules=list(skip) if skip else ["lm_head"], raw=cfg)
        self.raw.update({"quant_method": "awq", "bits": bits, "group_size": gs, "version": version,
                         "zero_point": zero_point})


@register_method("awq")
def parse_awq(d: dict) -> AWQSpec:
    return AWQSpec(d)
