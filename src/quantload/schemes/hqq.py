"""HQQ checkpoints (hqq's HQQLinear.state_dict, as transformers saves them): docs/formats.md §6.1.

Per layer: W_q (packed codes), scale, zero, and the layer's own parameters encoded as tensors (bool -> uint8
scalar, int -> int32 scalar, float -> float32 scalar, str and torch.dtype -> uint8 characters, torch.Size
-> int64). Those per-layer facts are authoritative; the config only says "hqq".

Grouping (numel divisible by group_size): axis=1 views W as [numel/gs, gs] (contiguous groups, scale/zero
[numel/gs, 1]); axis=0 views it as [gs, numel/gs] (strided groups, scale/zero [1, numel/gs]).
Packing is planar along dim 0, first slice in the HIGH bits: 4bit_u8 two halves at bits 4, 0; 2bit_u8 four
quarters at 6, 4, 2, 0; 1bit_u8 eight slices at 7..0; 3bit_32 rows padded to a multiple of 10, ten slices
in int32 at bits 27, 24, ..., 0; 8bit_u8 raw. W = ((codes - zero) * scale).reshape(shape) in compute_dtype.
"""
from __future__ import annotations

import torch

from ..config import QuantSpec
from ..errors import QuantStateError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_shape, full_key, need
from .intpack import unpack_planes
from .registry import register_method

# packing -> (bits, slices per container element, container dtype)
PACKINGS = {
    "8bit_u8": (8, 1, torch.uint8),
    "4bit_u8": (4, 2, torch.uint8),
    "2bit_u8": (2, 4, torch.uint8),
    "1bit_u8": (1, 8, torch.uint8),
    "3bit_32": (3, 10, torch.int32),
}
_BOOL = ("view_as_float", "quant_scale", "quant_zero", "offload_meta", "encoded_state_dict",
         "stores_quant_config", "channel_wise", "optimize", "round_zero")
_NUMBER = ("nbits", "group_size", "axis")
_STR = ("packing",)
_DTYPE = ("unpack_view_dtype", "compute_dtype")
_SIZE = ("shape",)
META_KEYS = (*_NUMBER, *_SIZE, *_STR, *_DTYPE, *_BOOL)
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.int8,
                               torch.int32, torch.int16, torch.float64)}


def _decode_meta(key: str, t: torch.Tensor, file, prefix):
    """hqq's decode_safetensor_type, without eval: the tensor encoding of one per-layer fact."""
    k = full_key(prefix, key)
    if key in _BOOL:
        return bool(t.item())
    if key in _NUMBER:
        if t.numel() != 1:
            raise QuantStateError(f"expected a scalar, got shape {list(t.shape)}", file=file, key=k)
        return t.item()
    if key in _SIZE:
        return tuple(int(v) for v in t.tolist())
    text = "".join(chr(c) for c in t.reshape(-1).tolist())
    if key in _DTYPE:
        if text not in _DTYPES:
            raise QuantStateError(f"dtype {text!r} is not one of {sorted(_DTYPES)}", file=file, key=k)
        return _DTYPES[text]
    return text


def _encode_meta(value) -> torch.Tensor:
    """hqq's encode_safetensor_type."""
    if isinstance(value, bool):
        return torch.tensor(int(value), dtype=torch.uint8)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(value, torch.dtype):
        value = str(value)
    if isinstance(value, str):
        return torch.tensor([ord(c) for c in value], dtype=torch.uint8)
    if isinstance(value, tuple):
        return torch.tensor(value)
    raise TypeError(f"cannot encode {value!r}")


class HQQScheme(kernels.FastLinear, Scheme):
    param_name = "weight"
    name = "hqq"

    def __init__(self, nbits: int = 4, group_size: int | None = 64):
        # only used for planning (nbytes_for): the real parameters are stored with each layer
        self.nbits, self.group_size = nbits, group_size

    def required_keys(self):
        return ("W_q", "scale", "zero", "shape", "nbits", "group_size", "axis", "packing")

    def optional_keys(self):
        return tuple(k for k in META_KEYS if k not in self.required_keys())

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w_q, scale, zero = (need(pieces, k, **kw) for k in self.required_keys()[:3])
        for k in self.required_keys()[3:]:
            need(pieces, k, **kw)
        meta = {k: _decode_meta(k, pieces[k], file, prefix) for k in META_KEYS if k in pieces}
        for flag in ("quant_scale", "quant_zero", "offload_meta"):
            if meta.get(flag):
                raise UnsupportedError(f"HQQ layers with {flag}=True are not supported", file=file,
                                       key=full_key(prefix, flag))
        packing = meta["packing"]
        if packing not in PACKINGS:
            raise UnsupportedError(f"HQQ packing {packing!r} is not supported; supported: {sorted(PACKINGS)}",
                                   file=file, key=full_key(prefix, "packing"))
        bits, slices, container = PACKINGS[packing]
        if meta.get("view_as_float"):
            w_q = w_q.view(meta.get("unpack_view_dtype", container))
        expect_dtype(w_q, container, "W_q", **kw)
        n_out, n_in = meta["shape"]
        if shape is not None and (n_out, n_in) != tuple(int(v) for v in shape):
            raise ShapeMismatchError(f"holds {[n_out, n_in]}, but the model expects {list(shape)}",
                                     file=file, key=full_key(prefix, "shape"))
        rows, cols = self._grid(meta, n_out, n_in, file, prefix)
        expect_shape(w_q, (-(-rows // slices), cols), "W_q", **kw,
                     why=f"{packing}: [{rows}, {cols}] codes in {slices} planes along dim 0")
        axis, grouped = meta["axis"], meta.get("channel_wise", True)
        want = ((rows, 1) if axis == 1 else (1, cols)) if grouped else None
        for k, t in (("scale", scale), ("zero", zero)):
            if want is None:
                if t.numel() != 1:
                    raise ShapeMismatchError(f"shape {list(t.shape)}, expected one value (channel_wise=False)",
                                             file=file, key=full_key(prefix, k))
            else:
                expect_shape(t, want, k, **kw, why=f"one per group along axis {axis}")
        meta.update(rows=rows, bits=bits, slices=slices, keys=[k for k in pieces if k in META_KEYS],
                    view_dtype=pieces["W_q"].dtype)
        dtype = meta.get("compute_dtype", scale.dtype)
        return QTensor(self, {"W_q": w_q, "scale": scale, "zero": zero}, (n_out, n_in), dtype, meta)

    @staticmethod
    def _grid(meta, n_out, n_in, file, prefix) -> tuple[int, int]:
        """The [rows, cols] matrix HQQ quantized: the grouped view of the weight, or the weight itself."""
        gs, axis = meta.get("group_size"), meta["axis"]
        if axis not in (0, 1):
            raise QuantStateError(f"axis {axis}, expected 0 or 1", file=file, key=full_key(prefix, "axis"))
        if gs is None or not meta.get("channel_wise", True):
            return n_out, n_in
        numel = n_out * n_in
        if gs <= 0 or numel % gs:
            raise QuantStateError(f"group_size {gs} does not divide the weight's {numel} elements",
                                  file=file, key=full_key(prefix, "group_size"))
        return (numel // gs, gs) if axis == 1 else (gs, numel // gs)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        m = qt.meta
        compute = m.get("compute_dtype", qt.data["scale"].dtype)
        shifts = [(m["slices"] - 1 - k) * m["bits"] for k in range(m["slices"])]
        codes = unpack_planes(qt.data["W_q"], m["bits"], shifts)[: m["rows"]].to(compute)
        w = ((codes - qt.data["zero"]) * qt.data["scale"]).reshape(qt.shape)
        return w.to(dtype)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """The fast path's view (runtime/kernels.py): with axis=1 and a group size dividing in_features,
        each weight row holds n_in / gs contiguous groups, W = (codes - zero) * scale (a float zero)."""
        m = qt.meta
        n_out, n_in = qt.shape
        gs = m.get("group_size")
        if m["axis"] != 1 or not m.get("channel_wise", True) or gs is None or n_in % gs:
            raise kernels.NotEligible(f"HQQ axis={m['axis']} group_size={gs}: groups are not contiguous "
                                      "within rows")
        shifts = [(m["slices"] - 1 - k) * m["bits"] for k in range(m["slices"])]
        codes = unpack_planes(qt.data["W_q"], m["bits"], shifts)[: m["rows"]].reshape(n_out, n_in)
        groups = n_in // gs
        return kernels.AffineWeight(codes, qt.data["scale"].reshape(n_out, groups), m["bits"], gs,
                                    zero=qt.data["zero"].reshape(n_out, groups))

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        m = qt.meta
        w_q = qt.data["W_q"]
        if m.get("view_as_float"):
            w_q = w_q.view(m["view_dtype"])
        out = {"W_q": w_q, "scale": qt.data["scale"], "zero": qt.data["zero"]}
        out.update({k: _encode_meta(m[k]) for k in m["keys"]})
        return out

    def quantize(self, w: torch.Tensor) -> QTensor:
        raise UnsupportedError(f"runtime quantization to {self.name} is not supported (HQQ layers are read, not written); use "
                               "quantize='int4' or another compressed-tensors spec")

    def nbytes_for(self, shape, dtype) -> int:
        numel = shape[0] * shape[1]
        gs = self.group_size or shape[1]
        packed = -(-numel * 32 // 10 // 8) if self.nbits == 3 else -(-numel * self.nbits // 8)
        return packed + 2 * (numel // gs) * (torch.finfo(dtype).bits // 8)


class HQQSpec(QuantSpec):
    method = "hqq"

    def __init__(self, cfg: dict):
        wq = ((cfg.get("quant_config") or {}).get("weight_quant_params") or {})
        skip = cfg.get("skip_modules")
        super().__init__(HQQScheme(wq.get("nbits", 4), wq.get("group_size", 64)),
                         skip_modules=list(skip) if skip is not None else ["lm_head"], raw=cfg)
        self.raw["quant_method"] = "hqq"


@register_method("hqq")
def parse_hqq(d: dict) -> HQQSpec:
    return HQQSpec(d)
