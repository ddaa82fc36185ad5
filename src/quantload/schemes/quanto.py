"""optimum-quanto checkpoints (QModule state dicts, as transformers saves them): docs/formats.md §6.2.

qint8 / qfloat8: weight._data int8 (float8_e4m3fn) [O, I], weight._scale [O, 1] (or a scalar): W = data * scale.
qint4 / qint2:   weight._data._data uint8, weight._scale [R, 1], weight._shift [R, 1], where the weight is
                 grouped as W.reshape(R = O*I/gs, gs) (gs = 128, else 96/64/32 dividing I when I > 128) or
                 left [O, I] per channel. Codes are planar along dim 0 in uint8: packed row r, bits
                 [b*k, b*(k+1)) hold grouped row k*ceil(R/(8/b)) + r. A float shift gives W = scale*q - shift,
                 an integer shift (zero-point) W = scale*(q - shift).
Every QModule also stores input_scale and output_scale (1.0 without activation quantization); they are
kept so saving writes them back.

The grouped form does not record (O, I): with no model, decode takes O from the layer's bias when the
caller passes it (see `shape_hint_keys`), and otherwise refuses a layout it cannot tell from per-channel.
"""
from __future__ import annotations

import torch

from ..config import QuantSpec, module_matches
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import expect_dtype, expect_float, expect_shape, full_key, need
from .intpack import unpack_planes
from .registry import register_method

QTYPES = {"qint2": 2, "qint4": 4, "qint8": 8, "qfloat8": 8, "qfloat8_e4m3fn": 8}
_ALIASES = {"int2": "qint2", "int4": "qint4", "int8": "qint8", "float8": "qfloat8", "fp8": "qfloat8",
            "qfloat8_e4m3fn": "qfloat8"}
_QUANTO_GROUP_SIZES = (128, 96, 64, 32)


def canonical_qtype(name, *, file=None) -> str:
    s = str(name).lower().removeprefix("quanto.")
    s = _ALIASES.get(s, s)
    if s not in QTYPES:
        raise UnsupportedError(f"optimum-quanto weights {name!r} are not supported; supported: "
                               "int2, int4, int8, float8", file=file)
    return s


class QuantoScheme(kernels.FastLinear, Scheme):
    param_name = "weight"
    #: extra keys a caller without a model may pass only to size the weight (not consumed)
    shape_hint_keys = ("bias",)

    def __init__(self, qtype: str = "qint4"):
        self.qtype = canonical_qtype(qtype)
        self.bits = QTYPES[self.qtype]
        self.packed = self.bits < 8
        self.name = f"quanto-{self.qtype}"

    def required_keys(self):
        if self.packed:
            return ("weight._data._data", "weight._scale", "weight._shift")
        return ("weight._data", "weight._scale")

    def optional_keys(self):
        return ("input_scale", "output_scale")

    def present(self, suffixes):
        s = set(suffixes)
        if self.packed and "weight._data" in s and "weight._data._data" not in s:
            raise ConfigError(f"config says {self.qtype} weights, but the module stores an unpacked 'weight._data' "
                              "(qint8/qfloat8)")
        if not self.packed and "weight._data._data" in s:
            raise ConfigError(f"config says {self.qtype} weights, but the module stores packed "
                              "'weight._data._data' (qint4/qint2)")
        return super().present(suffixes)

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        data = {k: need(pieces, k, **kw) for k in self.required_keys()}
        data.update({k: pieces[k] for k in self.optional_keys() if k in pieces})
        scale = data["weight._scale"]
        expect_float(scale, "weight._scale", **kw)
        if not self.packed:
            return self._decode_bytes(data, shape, kw)
        packed_key = "weight._data._data"
        packed, shift = data[packed_key], data["weight._shift"]
        expect_dtype(packed, torch.uint8, packed_key, **kw)
        if scale.ndim != 2 or scale.shape[1] != 1:
            raise ShapeMismatchError(f"shape {list(scale.shape)}, expected [rows, 1]", file=file,
                                     key=full_key(prefix, "weight._scale"))
        rows, cols = scale.shape[0], packed.shape[1]
        per = 8 // self.bits
        expect_shape(packed, (-(-rows // per), cols), packed_key, **kw,
                     why=f"{rows} rows of {self.bits}-bit codes, {per} planes per byte")
        expect_shape(shift, (rows, 1), "weight._shift", **kw, why="one shift per scale")
        n_out, n_in = self._logical_shape(rows, cols, shape, pieces.get("bias"), file, prefix)
        return QTensor(self, data, (n_out, n_in), scale.dtype, {"rows": rows})

    def _decode_bytes(self, data, shape, kw):
        w, scale = data["weight._data"], data["weight._scale"]
        expect_dtype(w, torch.float8_e4m3fn if self.qtype == "qfloat8" else torch.int8, "weight._data", **kw)
        if w.ndim != 2:
            raise ShapeMismatchError(f"{w.ndim}-d tensor, expected 2-d", file=kw["file"],
                                     key=full_key(kw["prefix"], "weight._data"))
        if shape is not None:
            expect_shape(w, tuple(shape), "weight._data", **kw, why="the model's weight shape")
        if scale.numel() != 1:
            expect_shape(scale, (w.shape[0], 1), "weight._scale", **kw, why="one scale per output row")
        return QTensor(self, data, tuple(w.shape), scale.dtype)

    def _logical_shape(self, rows, cols, shape, bias, file, prefix):
        key = full_key(prefix, "weight._data._data")
        if shape is None and bias is not None and bias.ndim == 1 and bias.numel():
            n_out = bias.numel()
            if (rows * cols) % n_out:
                raise ShapeMismatchError(f"{rows}x{cols} codes cannot be {n_out} output rows (from the bias)",
                                         file=file, key=key)
            shape = (n_out, rows * cols // n_out)
        if shape is None:
            if cols in _QUANTO_GROUP_SIZES:
                raise ShapeMismatchError(
                    f"[{rows}, {cols}] codes may be {rows} channels of {cols} inputs or {rows} groups of {cols}; "
                    "optimum-quanto does not store (out, in): pass the model's weight shape", file=file, key=key)
            return rows, cols
        n_out, n_in = (int(v) for v in shape)
        if rows * cols != n_out * n_in or n_in % cols:
            raise ShapeMismatchError(f"{rows} rows of {cols} codes do not make a [{n_out}, {n_in}] weight "
                                     f"(expected [{n_out}, {n_in}] per channel or [{n_out * n_in // 128}, 128]-style "
                                     "groups that divide in_features)", file=file, key=key)
        return n_out, n_in

    # --- use ------------------------------------------------------------------------------------
    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        scale = qt.data["weight._scale"]
        if not self.packed:
            return (scale * qt.data["weight._data"].to(scale.dtype)).to(dtype)
        shifts = [k * self.bits for k in range(8 // self.bits)]
        codes = unpack_planes(qt.data["weight._data._data"], self.bits, shifts)[: qt.meta["rows"]]
        shift = qt.data["weight._shift"]
        if shift.is_floating_point():
            w = scale * codes.to(scale.dtype) - shift
        else:
            w = scale * (codes.to(torch.int8) - shift.to(torch.int8)).to(scale.dtype)
        return w.reshape(qt.shape).to(dtype)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """The fast path's view (runtime/kernels.py): qint2/qint4 groups of `cols` inputs (each row of the
        weight holds n_in / cols of them), W = scale * q - shift or scale * (q - shift); qint8 per row,
        W = scale * q (symmetric: the int8 kernel). qfloat8 is not integer codes."""
        scale = qt.data["weight._scale"]
        n_out, n_in = qt.shape
        if self.qtype == "qfloat8":
            raise kernels.NotEligible("float8 codes are not integers")
        if not self.packed:
            if scale.numel() == 1:
                scale = scale.reshape(1, 1).expand(n_out, 1)
            codes = (qt.data["weight._data"].to(torch.int16) + 128).to(torch.uint8)
            return kernels.AffineWeight(codes, scale.reshape(n_out, 1), 8, n_in, zero=torch.full_like(
                scale.reshape(n_out, 1), 128, dtype=torch.float32))
        shifts = [k * self.bits for k in range(8 // self.bits)]
        codes = unpack_planes(qt.data["weight._data._data"], self.bits, shifts)[: qt.meta["rows"]]
        group = codes.shape[1]
        groups = n_in // group
        shift = qt.data["weight._shift"].reshape(n_out, groups)
        scale = scale.reshape(n_out, groups)
        codes = codes.reshape(n_out, n_in)
        if shift.is_floating_point():
            return kernels.AffineWeight(codes, scale, self.bits, group, bias=-shift)
        return kernels.AffineWeight(codes, scale, self.bits, group, zero=shift)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def quantize(self, w: torch.Tensor) -> QTensor:
        raise UnsupportedError(f"runtime quantization to {self.name} is not supported (optimum-quanto layers are read, not written); use "
                               "quantize='int4' or another compressed-tensors spec")

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        isz = torch.finfo(dtype).bits // 8
        if not self.packed:
            return n_out * n_in + n_out * isz
        gs = next((g for g in _QUANTO_GROUP_SIZES if n_in > 128 and n_in % g == 0), n_in)
        rows = n_out * n_in // gs
        return -(-rows // (8 // self.bits)) * gs + 2 * rows * isz


class QuantoSpec(QuantSpec):
    """transformers' QuantoConfig ({"quant_method": "quanto", "weights": "int4", ...}); an optional
    "quanto_qmap" ({module: {"weights": "qint4", "activations": "none"}}, quanto's own file) overrides
    the weights type per module."""

    method = "quanto"

    def __init__(self, cfg: dict):
        act = cfg.get("activations")
        if act not in (None, "none", "None"):
            raise UnsupportedError(f"optimum-quanto activation quantization ({act!r}) is not supported")
        qtype = canonical_qtype(cfg.get("weights", "int8"))
        skip = cfg.get("modules_to_not_convert")
        super().__init__(QuantoScheme(qtype), skip_modules=list(skip) if skip else ["lm_head"], raw=cfg)
        self.qmap = cfg.get("quanto_qmap") or {}
        self._schemes = {qtype: self.scheme}
        self.raw.update({"quant_method": "quanto", "weights": cfg.get("weights", "int8")})

    def scheme_for(self, module_name, module):
        entry = self.qmap.get(module_name)
        if entry is None:
            if module_matches(module_name, self.skip_modules):
                return None
            return super().scheme_for(module_name, module)
        if module is not None and not isinstance(module, torch.nn.Linear):
            return None
        q = canonical_qtype(entry.get("weights"))
        if q not in self._schemes:
            self._schemes[q] = QuantoScheme(q)
        return self._schemes[q]

    def to_dict(self):
        return {k: v for k, v in self.raw.items() if k != "quanto_qmap"}


@register_method("quanto")
def parse_quanto(d: dict) -> QuantoSpec:
    return QuantoSpec(d)
