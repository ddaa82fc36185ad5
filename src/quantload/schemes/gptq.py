"""GPTQ checkpoints (AutoGPTQ, optimum, GPTQModel): docs/formats.md §3.

Per Linear (in_features I, out_features O, ng = ceil(I / group_size)):
  qweight int32 [ceil(I*bits/32), O]   codes packed down the input dim (a little-endian bit stream)
  qzeros  int32 [ng, ceil(O*bits/32)]  zero-points packed along the output dim
  scales  float [ng, O]
  g_idx   int32 [I]                    group of each input column (desc_act permutes it)
W[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i].

checkpoint_format "gptq" (v1) stores z - 1; "gptq_v2" stores z. v1 cannot store an asymmetric zero of 0:
the -1 overflows into every higher field of its word, which then reads as all ones. We decode those
fields as AutoGPTQ's own forward does (field + 1, no wrap) and record a warning naming the layer.
"""
from __future__ import annotations

import re

import torch

from ..config import QuantSpec, module_matches
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .base import QTensor, Scheme
from .checks import check_group_index, expect_dtype, expect_float, expect_shape, full_key, need
from .intpack import packed_len, unpack_stream
from .registry import register_method

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


class GPTQScheme(kernels.FastLinear, Scheme):
    param_name = "weight"

    def __init__(self, bits: int, group_size: int = 128, *, sym: bool = True,
                 checkpoint_format: str = "gptq", desc_act: bool = False):
        if bits not in SUPPORTED_BITS:
            raise UnsupportedError(f"GPTQ bits={bits} is not supported; supported: {list(SUPPORTED_BITS)}")
        if checkpoint_format not in FORMATS:
            raise UnsupportedError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                                   f"supported: {list(FORMATS)}")
        if not (group_size == -1 or group_size > 0):
            raise ConfigError(f"GPTQ group_size={group_size}; expected -1 or a positive integer")
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.checkpoint_format = checkpoint_format
        self.v1 = checkpoint_format == "gptq"
        self.name = f"{checkpoint_format}-{bits}bit-g{group_size}{'' if sym else '-asym'}"

    def required_keys(self):
        return ("qweight", "qzeros", "scales")

    def optional_keys(self):
        return ("g_idx",)

    # --- decode ---------------------------------------------------------------------------------
    def _in_features(self, qweight, g_idx, shape, file, prefix) -> int:
        if shape is not None:
            return int(shape[1])
        if g_idx is not None:
            return g_idx.numel()
        rows = qweight.shape[0]
        if (rows * 32) % self.bits:
            raise ShapeMismatchError(
                f"{rows} rows of {self.bits}-bit codes do not hold a whole number of input columns "
                f"(rows*32 must be a multiple of {self.bits})", file=file, key=full_key(prefix, "qweight"))
        return rows * 32 // self.bits

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        qweight = need(pieces, "qweight", **kw)
        qzeros = need(pieces, "qzeros", **kw)
        scales = need(pieces, "scales", **kw)
        g_idx = pieces.get("g_idx")
        for k, t in (("qweight", qweight), ("qzeros", qzeros)):
            expect_dtype(t, torch.int32, k, **kw)
            if t.ndim != 2:
                raise ShapeMismatchError(f"{t.ndim}-d tensor, expected 2-d", file=file, key=full_key(prefix, k))
        expect_float(scales, "scales", **kw)
        n_out = qweight.shape[1] if shape is None else int(shape[0])
        n_in = self._in_features(qweight, g_idx, shape, file, prefix)
        expect_shape(qweight, (packed_len(n_in, self.bits), n_out), "qweight", **kw,
                     why=f"{n_in} inputs x {n_out} outputs packed at {self.bits} bits down the input dim")
        gs = n_in if self.group_size == -1 else self.group_size
        n_groups = -(-n_in // gs)
        expect_shape(scales, (n_groups, n_out), "scales", **kw,
                     why=f"{n_groups} groups of {gs} inputs x {n_out} outputs")
        expect_shape(qzeros, (n_groups, packed_len(n_out, self.bits)), "qzeros", **kw,
                     why=f"{n_groups} groups x {n_out} outputs packed at {self.bits} bits")
        contiguous = g_idx is None
        if g_idx is not None:
            check_group_index(g_idx, n_in, n_groups, "g_idx", **kw)
            # most checkpoints store the trivial i // group_size (no desc_act): dequantize by reshaping
            contiguous = bool(torch.equal(g_idx.long(), torch.arange(n_in, device=g_idx.device) // gs))
        warnings = self._check_zeros(unpack_stream(qzeros, self.bits, n_out, dim=1), file, prefix)
        data = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        if g_idx is not None:
            data["g_idx"] = g_idx
        meta = {"group_size": gs, "contiguous_groups": contiguous, "warnings": warnings}
        return QTensor(self, data, (n_out, n_in), scales.dtype, meta)

    def _check_zeros(self, fields: torch.Tensor, file, prefix) -> list[str]:
        """Spot the v1/v2 mix-up on symmetric checkpoints (every zero is 2^(bits-1) in v2 and one less in
        v1), and v1's unrepresentable zero-point 0."""
        half, maxq = 1 << (self.bits - 1), (1 << self.bits) - 1
        key = full_key(prefix, "qzeros")
        if self.sym and fields.numel():
            other = half if self.v1 else half - 1
            if bool((fields == other).all()):
                looks = "gptq_v2" if self.v1 else "gptq (v1)"
                raise ConfigError(
                    f"config says checkpoint_format={self.checkpoint_format!r} with sym=True, but every stored "
                    f"zero-point field is {other}, which is the {looks} layout "
                    f"(expected {half - 1 if self.v1 else half})",
                    file=file, key=key)
        if not self.v1:
            return []
        overflow = int((fields == maxq).sum())
        if not overflow:
            return []
        return [f"{prefix or '<root>'}: GPTQ v1 qzeros ({key}) hold {overflow} field(s) equal to {maxq}: a true "
                f"zero-point of 0 stored as -1, which v1 cannot represent and which overwrote the higher fields of "
                f"its word; decoded as {maxq + 1} like AutoGPTQ does, so those groups are not the original "
                f"weights (re-export as gptq_v2)"]

    # --- use ------------------------------------------------------------------------------------
    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        n_out, n_in = qt.shape
        scales = qt.data["scales"]
        dt = scales.dtype
        gs = qt.meta["group_size"]
        q = unpack_stream(qt.data["qweight"], self.bits, n_in, dim=0, dtype=torch.uint8)   # [I, O]
        z = unpack_stream(qt.data["qzeros"], self.bits, n_out, dim=1)          # [ng, O]
        if self.v1:
            z = z + 1
        # AutoGPTQ's math: scales * (q - z), the difference an exact integer (also in the scales' dtype:
        # every code and zero-point is at most 256), one multiply in the scales' dtype
        if qt.meta["contiguous_groups"] and n_in % gs == 0:
            w = (q.view(-1, gs, n_out).to(dt) - z.to(dt).unsqueeze(1)) * scales.unsqueeze(1)
        else:
            g = qt.data["g_idx"].long() if "g_idx" in qt.data else torch.arange(n_in, device=q.device) // gs
            w = (q.to(dt) - z.to(dt)[g]) * scales[g]
        # a contiguous [O, I] weight, so a matmul on it rounds the same as on any other weight
        return w.reshape(n_in, n_out).t().to(dtype).contiguous()

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """The packed-kernel form (runtime/kernels.py): codes [O, I] with zero-points and scales per group,
        act-order groups gathered by permuting the input columns."""
        n_out, n_in = qt.shape
        gs = qt.meta["group_size"]
        q = unpack_stream(qt.data["qweight"], self.bits, n_in, dim=0, dtype=torch.uint8).t()
        z = unpack_stream(qt.data["qzeros"], self.bits, n_out, dim=1)
        if self.v1:
            z = z + 1
        perm = None if qt.meta["contiguous_groups"] else kernels.group_order(qt.data["g_idx"], n_in, gs)
        if perm is not None:
            q = q.index_select(1, perm)
        return kernels.AffineWeight(q, qt.data["scales"].t(), self.bits, gs, zero=z.t(), perm=perm)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def quantize(self, w: torch.Tensor) -> QTensor:
        raise UnsupportedError(f"runtime quantization to {self.name} is not supported (GPTQ needs calibration data); use "
                               "quantize='int4' or another compressed-tensors spec")

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        gs = n_in if self.group_size == -1 else self.group_size
        ng = -(-n_in // gs)
        return 4 * (packed_len(n_in, self.bits) * n_out + ng * packed_len(n_out, self.bits) + n_in) \
            + ng * n_out * torch.finfo(dtype).bits // 8


# --- quantization_config ------------------------------------------------------------------------
_UNSUPPORTED_FORMATS = ("marlin", "gptq_p", "bitblas", "qqq", "awq")


def normalize_gptq_config(d: dict) -> dict:
    """A GPTQ config in any of its spellings (config.json quantization_config, AutoGPTQ's
    quantize_config.json, GPTQModel's to_dict) -> the transformers form, validated."""
    out = dict(d)
    if "bits" not in out and "w_bit" in out:
        out["bits"] = out.pop("w_bit")
    if "group_size" not in out and "q_group_size" in out:
        out["group_size"] = out.pop("q_group_size")
    if "bits" not in out:
        raise ConfigError(f"GPTQ quantization_config has no 'bits' (keys: {sorted(d)})")
    out["quant_method"] = "gptq"
    fmt = out.get("checkpoint_format") or out.get("format") or "gptq"
    fmt = str(fmt).lower()
    if out.get("is_marlin_format") or fmt in _UNSUPPORTED_FORMATS or fmt not in FORMATS:
        shown = "marlin" if out.get("is_marlin_format") else fmt
        raise UnsupportedError(f"GPTQ checkpoint_format {shown!r} is a different on-disk layout; supported: "
                               f"{list(FORMATS)}")
    out["checkpoint_format"] = fmt
    if str(out.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise UnsupportedError(f"GPTQ pack_dtype {out['pack_dtype']!r} is not supported; only int32")
    out["bits"] = _as_int(out["bits"], "bits")
    out["group_size"] = _as_int(out.get("group_size", 128), "group_size")
    _check_bits_and_group(out["bits"], out["group_size"])
    out["desc_act"] = bool(out.get("desc_act", False))
    out["sym"] = bool(out.get("sym", True))
    return out


def _check_bits_and_group(bits: int, group_size: int, where: str = "") -> None:
    if bits not in SUPPORTED_BITS:
        raise UnsupportedError(f"GPTQ bits={bits}{where} is not supported; supported: {list(SUPPORTED_BITS)}")
    if not (group_size == -1 or group_size > 0):
        raise ConfigError(f"GPTQ group_size={group_size}{where}; expected -1 or a positive integer")


def _as_int(v, name: str, where: str = "") -> int:
    """An integer as GPTQ configs write it (4, "4", 128.0); anything else (0.5, "x", true) is refused with
    the value as written, never truncated."""
    if isinstance(v, bool):
        ok = False
    elif isinstance(v, int):
        return v
    elif isinstance(v, float):
        ok = v.is_integer()
    elif isinstance(v, str):
        ok = v.strip().lstrip("-").isdigit()
    else:
        ok = False
    if not ok:
        raise ConfigError(f"GPTQ {name}={v!r}{where}; expected an integer")
    return int(float(v)) if isinstance(v, float) else int(v)


def _check_dynamic(dynamic: dict, base_args: dict) -> list[tuple[str, re.Pattern, dict | bool]]:
    """GPTQModel `dynamic`: every pattern compiled and every override validated when the config is read
    (not at the first module it would match): [(pattern, compiled, overrides or False for '-:')]."""
    out = []
    for pattern, over in dynamic.items():
        where = f" in dynamic[{pattern!r}]"
        if not isinstance(pattern, str):
            raise ConfigError(f"GPTQ dynamic key {pattern!r}; expected a regex string")
        negative = pattern.startswith("-:")
        try:
            compiled = re.compile(pattern[2:] if negative else pattern.removeprefix("+:"))
        except re.error as e:
            raise ConfigError(f"GPTQ dynamic pattern {pattern!r} is not a valid regex ({e})") from None
        if negative:
            out.append((pattern, compiled, False))
            continue
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"GPTQ dynamic[{pattern!r}]={over!r}; expected a dict of overrides")
        over = dict(over or {})
        for k in ("bits", "group_size"):
            if k in over:
                over[k] = _as_int(over[k], k, where)
        args = {**base_args, **{k: v for k, v in over.items() if k in base_args}}
        _check_bits_and_group(args["bits"], args["group_size"], where)
        out.append((pattern, compiled, over))
    return out


class GPTQSpec(QuantSpec):
    """GPTQ: one scheme for every quantized Linear, except GPTQModel `dynamic` overrides
    ("-:regex" leaves a module dense, "+:regex" or "regex" changes bits/group_size/sym/desc_act)."""

    method = "gptq"

    def __init__(self, cfg: dict):
        cfg = normalize_gptq_config(cfg)
        self.base_args = {k: cfg[k] for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format")}
        skip = list(cfg.get("modules_to_not_convert") or [])
        if not cfg.get("lm_head", False):
            skip.append("lm_head")
        super().__init__(self._scheme(self.base_args), skip_modules=skip, raw=cfg)
        self.dynamic = cfg.get("dynamic") or {}
        if not isinstance(self.dynamic, dict):
            raise ConfigError(f"GPTQ 'dynamic' must be a dict of regex -> overrides, got {type(self.dynamic).__name__}")
        self._dynamic = _check_dynamic(self.dynamic, self.base_args)
        self._cache: dict[tuple, GPTQScheme] = {}

    @staticmethod
    def _scheme(a: dict) -> GPTQScheme:
        return GPTQScheme(int(a["bits"]), int(a["group_size"]), sym=bool(a["sym"]),
                          checkpoint_format=a["checkpoint_format"], desc_act=bool(a["desc_act"]))

    def scheme_for(self, module_name, module):
        if module is not None and not isinstance(module, torch.nn.Linear):
            return None
        over = self._dynamic_match(module_name)
        if over is False or (over is None and module_matches(module_name, self.skip_modules)):
            return None
        if not over:
            return self.scheme
        args = {**self.base_args, **{k: v for k, v in over.items() if k in self.base_args}}
        key = tuple(sorted(args.items()))
        if key not in self._cache:
            self._cache[key] = self._scheme(args)
        return self._cache[key]

    def _dynamic_match(self, name: str):
        """GPTQModel's rule: the first matching pattern wins; '-:' means not quantized."""
        for _, compiled, over in self._dynamic:
            if compiled.match(name):
                return over
        return None

    def to_dict(self):
        return dict(self.raw)


@register_method("gptq")
def parse_gptq(d: dict) -> GPTQSpec:
    return GPTQSpec(d)
