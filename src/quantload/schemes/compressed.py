"""compressed-tensors checkpoints (llm-compressor, vLLM): docs/formats.md §5.

pack-quantized (integer weights, 1..8 bits), per module at prefix p, weight [O, I]:
  weight_packed      int32 [O, ceil(I*bits/32)]  dense little-endian stream along the input dim, values
                                                  stored offset by +2^(bits-1); old 3/5/6/7-bit files use
                                                  the padded layout (32//bits per word, ceil(I/(32//bits)))
  weight_scale       float tensor [1] | channel [O, 1] | group [O, ceil(I/gs)]
  weight_shape       int64/int32 [2] = [O, I]
  weight_zero_point  asymmetric only: group/channel packed along dim 0 [ceil(O*bits/32), ng]; tensor int8 [1]
  weight_g_idx       int32 [I], old actorder="group" checkpoints
int-quantized / float-quantized / naive-quantized: `weight` stored directly as int8 or float8_e4m3fn, with
weight_scale (tensor, channel, group or block [ceil(O/bh), ceil(I/bw)]) and, if asymmetric, an int8
weight_zero_point of the scale's shape. Static activation scales (input_scale, input_zero_point) are kept
for saving; the forward runs in floating point (dequantize, then matmul).

The config's config_groups pick a scheme per module: `ignore` first, then the most specific target
(exact name, then "re:" regex, then class name such as "Linear"), compressed-tensors' own matching rules.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..runtime import kernels
from .affine import WeightArgs, dequantize_values, minmax_qparams, quantize_values
from .base import QTensor, Scheme
from .checks import check_group_index, expect_dtype, expect_float, expect_shape, full_key, need
from .intpack import pack_stream, packed_len, padded_len, unpack_padded, unpack_stream
from .registry import register_method

PACKED_ZP_STRATEGIES = ("group", "channel")
NAIVE_FORMATS = ("int-quantized", "float-quantized", "naive-quantized")


def _scale_shape(args: WeightArgs, n_out: int, n_in: int) -> tuple[int, ...]:
    if args.strategy == "group":
        return (n_out, -(-n_in // args.group_size))
    if args.strategy == "channel":
        return (n_out, 1)
    if args.strategy == "block":
        bh, bw = args.block_structure
        return (-(-n_out // bh), -(-n_in // bw))
    return (1,)


def _describe(args: WeightArgs) -> str:
    g = {"group": f"group{args.group_size}", "block": "block{}x{}".format(*args.block_structure or (0, 0))}
    return f"{args.type}{args.num_bits}-{g.get(args.strategy, args.strategy)}-{'sym' if args.symmetric else 'asym'}"


class _CTScheme(kernels.FastLinear, Scheme):
    """What the two compressed-tensors layouts share: the scale checks and the float math."""

    def __init__(self, args: WeightArgs, fmt: str):
        self.args = args
        self.format = fmt
        self.name = f"ct-{fmt.removesuffix('-quantized')}-{_describe(args)}"

    def _check_scale(self, scale, n_out, n_in, kw) -> torch.Tensor:
        expect_float(scale, "weight_scale", **kw)
        want = _scale_shape(self.args, n_out, n_in)
        if self.args.strategy == "tensor" and scale.ndim == 0:
            return scale
        expect_shape(scale, want, "weight_scale", **kw,
                     why=f"strategy {self.args.strategy!r} for a [{n_out}, {n_in}] weight")
        return scale

    def _symmetric_zero_point(self, pieces, scale, n_out, kw) -> torch.Tensor | None:
        """Older compressed-tensors releases saved an all-zero weight_zero_point for symmetric schemes;
        it is kept (for saving) and ignored. Any other value contradicts the config."""
        zp = pieces.get("weight_zero_point")
        if zp is None:
            return None
        values = zp
        bits = self.args.num_bits
        if zp.dtype == torch.int32 and tuple(zp.shape) != tuple(scale.shape) and zp.ndim == 2:
            values = unpack_stream(zp, bits, n_out, dim=0) - (1 << (bits - 1))
        if values.is_floating_point() or bool((values != 0).any()):
            raise ConfigError("config says symmetric weights, but the checkpoint stores a non-zero "
                              "weight_zero_point (an asymmetric scheme)",
                              file=kw["file"], key=full_key(kw["prefix"], "weight_zero_point"))
        return zp

    def _affine_parts(self, qt: QTensor, codes: torch.Tensor, zero: torch.Tensor, bits: int):
        """AffineWeight of unsigned codes [O, I] and unsigned zero-points (scale-shaped or [1]); the
        tensor strategy is one group per row with the same scale; blocks have no packed form."""
        n_out, n_in = qt.shape
        st = self.args.strategy
        if st == "block":
            raise kernels.NotEligible("block-wise scales have no packed kernel")
        scale = qt.data["weight_scale"]
        if st == "tensor":
            scale = scale.reshape(1, 1).expand(n_out, 1)
        zero = zero.reshape(1, 1).expand(n_out, 1) if zero.numel() == 1 else zero
        gs = self.args.group_size if st == "group" else n_in
        perm = kernels.group_order(qt.data.get("weight_g_idx"), n_in, gs)
        if perm is not None:
            codes = codes.index_select(1, perm)
        return kernels.AffineWeight(codes, scale, bits, gs, zero=zero.expand(scale.shape), perm=perm)

    def _n_scales(self, n_out, n_in) -> int:
        n = 1
        for d in _scale_shape(self.args, n_out, n_in):
            n *= d
        return n


class CTPackedScheme(_CTScheme):
    """pack-quantized: integer codes packed in int32 words."""

    def __init__(self, args: WeightArgs):
        if args.type != "int":
            raise UnsupportedError(f"pack-quantized needs integer weights, got type {args.type!r}")
        super().__init__(args, "pack-quantized")
        self.bits = args.num_bits
        self.offset = 1 << (args.num_bits - 1)

    def required_keys(self):
        keys = ("weight_packed", "weight_scale", "weight_shape")
        return keys if self.args.symmetric else (*keys, "weight_zero_point")

    def optional_keys(self):
        return ("weight_g_idx", "weight_zero_point") if self.args.symmetric else ("weight_g_idx",)

    def present(self, suffixes):
        if "weight_packed" not in suffixes and {"weight", "weight_scale"} <= set(suffixes):
            raise ConfigError("config says format 'pack-quantized', but this module stores 'weight' with "
                              "'weight_scale' (the int-/float-quantized layout)")
        return super().present(suffixes)

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        packed = need(pieces, "weight_packed", **kw)
        scale = need(pieces, "weight_scale", **kw)
        wshape = need(pieces, "weight_shape", **kw)
        expect_dtype(packed, torch.int32, "weight_packed", **kw)
        expect_dtype(wshape, (torch.int64, torch.int32), "weight_shape", **kw)
        expect_shape(wshape, (2,), "weight_shape", **kw, why="[out_features, in_features]")
        n_out, n_in = (int(v) for v in wshape.tolist())
        if shape is not None and (n_out, n_in) != tuple(int(v) for v in shape):
            raise ShapeMismatchError(f"holds [{n_out}, {n_in}], but the model expects {list(shape)}",
                                     file=file, key=full_key(prefix, "weight_shape"))
        if packed.ndim != 2 or packed.shape[0] != n_out:
            raise ShapeMismatchError(f"shape {list(packed.shape)}, expected [{n_out}, "
                                     f"{packed_len(n_in, self.bits)}] ({n_in} {self.bits}-bit values per row)",
                                     file=file, key=full_key(prefix, "weight_packed"))
        layout = self._layout(packed.shape[1], n_in, "weight_packed", kw, n_out)
        scale = self._check_scale(scale, n_out, n_in, kw)
        data = {"weight_packed": packed, "weight_scale": scale, "weight_shape": wshape}
        meta = {"layout": layout}
        if self.args.symmetric:
            zero = self._symmetric_zero_point(pieces, scale, n_out, kw)
            if zero is not None:
                data["weight_zero_point"], meta["zp_ignored"] = zero, True
        else:
            zp = need(pieces, "weight_zero_point", **kw, why="(asymmetric scheme)")
            meta["zp_packed"] = self._check_zero_point(zp, scale, n_out, layout, kw)
            data["weight_zero_point"] = zp
        g_idx = pieces.get("weight_g_idx")
        if g_idx is not None:
            if self.args.strategy != "group":
                raise ConfigError(f"weight_g_idx needs strategy 'group', config says {self.args.strategy!r}",
                                  file=file, key=full_key(prefix, "weight_g_idx"))
            check_group_index(g_idx, n_in, scale.shape[1], "weight_g_idx", **kw)
            data["weight_g_idx"] = g_idx
        return QTensor(self, data, (n_out, n_in), scale.dtype, meta)

    def _layout(self, width, n, suffix, kw, rows) -> str:
        """Dense (current) or padded (compressed-tensors before the dense change; 2/4/8 bits agree)."""
        dense, padded = packed_len(n, self.bits), padded_len(n, self.bits)
        if width == dense:
            return "dense"
        if width == padded:
            return "padded"
        alt = f" or {padded} (padded layout)" if padded != dense else ""
        raise ShapeMismatchError(f"{width} words per line, expected {dense}{alt} for {n} {self.bits}-bit values "
                                 f"(shape [{rows}, {dense}])", file=kw["file"], key=full_key(kw["prefix"], suffix))

    def _check_zero_point(self, zp, scale, n_out, layout, kw) -> bool:
        """True when packed along dim 0 (group/channel), False when stored as plain int8."""
        if self.args.strategy in PACKED_ZP_STRATEGIES and zp.dtype == torch.int32:
            n_groups = scale.shape[1]
            want = (packed_len(n_out, self.bits) if layout == "dense" else padded_len(n_out, self.bits), n_groups)
            expect_shape(zp, want, "weight_zero_point", **kw,
                         why=f"{n_out} {self.bits}-bit zero-points packed along the outputs x {n_groups} groups")
            return True
        expect_dtype(zp, (torch.int8, torch.int32), "weight_zero_point", **kw)
        expect_shape(zp, tuple(scale.shape), "weight_zero_point", **kw, why="one zero-point per scale")
        return False

    # --- use ------------------------------------------------------------------------------------
    def _unpack(self, words, n, dim, layout, dtype=torch.int32):
        """Unsigned codes: the stored values are offset by +2^(bits-1)."""
        fn = unpack_stream if layout == "dense" else unpack_padded
        return fn(words, self.bits, n, dim=dim, dtype=dtype)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        n_out, n_in = qt.shape
        layout = qt.meta["layout"]
        q = self._unpack(qt.data["weight_packed"], n_in, 1, layout, torch.uint8)
        zp = None if qt.meta.get("zp_ignored") else qt.data.get("weight_zero_point")
        if zp is not None and qt.meta["zp_packed"]:
            zp = self._unpack(zp, n_out, 0, layout) - self.offset
        w = dequantize_values(q, qt.data["weight_scale"], zp, self.args, qt.data.get("weight_g_idx"),
                              offset=self.offset)
        return w.to(dtype)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """Packed-kernel form (runtime/kernels.py): the stored unsigned codes, zero-point + 2^(bits-1)."""
        n_out, n_in = qt.shape
        layout = qt.meta["layout"]
        q = self._unpack(qt.data["weight_packed"], n_in, 1, layout, torch.uint8)
        zp = None if qt.meta.get("zp_ignored") else qt.data.get("weight_zero_point")
        if zp is None:
            zero = torch.tensor(self.offset, device=q.device)
        elif qt.meta["zp_packed"]:
            zero = self._unpack(zp, n_out, 0, layout)         # stored with the offset already
        else:
            zero = zp.to(torch.int32) + self.offset
        return self._affine_parts(qt, q, zero, self.bits)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Round-to-nearest min-max quantization, byte for byte what compressed-tensors' quantize +
        PackedQuantizationCompressor.compress write for this weight and these args."""
        if w.ndim != 2:
            raise ShapeMismatchError(f"can only quantize 2-d weights, got shape {list(w.shape)}")
        if self.args.actorder == "group":
            raise UnsupportedError("actorder='group' (g_idx) needs calibration; runtime quantization cannot make it")
        scale, zp = minmax_qparams(w, self.args)
        q = quantize_values(w, scale, zp, self.args)
        data = {"weight_packed": pack_stream(q.to(torch.int32) + self.offset, self.bits, dim=1),
                "weight_scale": scale, "weight_shape": torch.tensor(tuple(w.shape), device=w.device)}
        meta = {"layout": "dense"}
        if not self.args.symmetric:
            if self.args.strategy in PACKED_ZP_STRATEGIES:
                data["weight_zero_point"] = pack_stream(zp.to(torch.int32) + self.offset, self.bits, dim=0)
                meta["zp_packed"] = True
            else:
                data["weight_zero_point"] = zp
                meta["zp_packed"] = False
        return QTensor(self, data, w.shape, w.dtype, meta)

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        n = self._n_scales(n_out, n_in)
        if self.args.symmetric:
            zp = 0
        elif self.args.strategy in PACKED_ZP_STRATEGIES:
            zp = 4 * packed_len(n_out, self.bits) * (n // n_out)
        else:
            zp = n
        return 4 * n_out * packed_len(n_in, self.bits) + 16 + n * (torch.finfo(dtype).bits // 8) + zp \
            + (4 * n_in if self.args.actorder == "group" else 0)


class CTNaiveScheme(_CTScheme):
    """int-quantized / float-quantized / naive-quantized: the weight stored in int8 or float8_e4m3fn."""

    def __init__(self, args: WeightArgs, fmt: str = "int-quantized"):
        if args.type == "int" and args.num_bits > 8:
            raise UnsupportedError(f"{fmt} with {args.num_bits}-bit integers is not supported")
        super().__init__(args, fmt)
        self.storage = torch.float8_e4m3fn if args.type == "float" else torch.int8

    def required_keys(self):
        keys = ("weight", "weight_scale")
        return keys if self.args.symmetric else (*keys, "weight_zero_point")

    def optional_keys(self):
        extra = ("weight_zero_point",) if self.args.symmetric else ()
        return (*extra, "input_scale", "input_zero_point")

    def present(self, suffixes):
        if "weight_packed" in suffixes:
            raise ConfigError(f"config says format {self.format!r}, but this module stores 'weight_packed' "
                              "(the pack-quantized layout)")
        return super().present(suffixes)

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        weight = need(pieces, "weight", **kw)
        scale = need(pieces, "weight_scale", **kw)
        expect_dtype(weight, self.storage, "weight", **kw)
        if weight.ndim != 2:
            raise ShapeMismatchError(f"{weight.ndim}-d tensor, expected 2-d", file=file, key=full_key(prefix, "weight"))
        if shape is not None:
            expect_shape(weight, tuple(shape), "weight", **kw, why="the model's weight shape")
        n_out, n_in = weight.shape
        scale = self._check_scale(scale, n_out, n_in, kw)
        data = {"weight": weight, "weight_scale": scale}
        meta = {}
        if self.args.symmetric:
            zero = self._symmetric_zero_point(pieces, scale, n_out, kw)
            if zero is not None:
                data["weight_zero_point"], meta["zp_ignored"] = zero, True
        else:
            zp = need(pieces, "weight_zero_point", **kw, why="(asymmetric scheme)")
            expect_dtype(zp, (torch.int8, torch.int32), "weight_zero_point", **kw)
            expect_shape(zp, tuple(scale.shape), "weight_zero_point", **kw, why="one zero-point per scale")
            data["weight_zero_point"] = zp
        for k in ("input_scale", "input_zero_point"):
            if k in pieces:
                data[k] = pieces[k]
        return QTensor(self, data, (n_out, n_in), scale.dtype, meta)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        zp = None if qt.meta.get("zp_ignored") else qt.data.get("weight_zero_point")
        w = dequantize_values(qt.data["weight"], qt.data["weight_scale"], zp, self.args)
        return w.to(dtype)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """Packed-kernel form (runtime/kernels.py) of int8 weights: q + 128 as unsigned codes."""
        if self.storage != torch.int8:
            raise kernels.NotEligible(f"{self.storage} weights have no packed kernel")
        zp = None if qt.meta.get("zp_ignored") else qt.data.get("weight_zero_point")
        zero = torch.tensor(128, device=qt.device) if zp is None else zp.to(torch.int32) + 128
        return self._affine_parts(qt, qt.data["weight"].view(torch.uint8) ^ 0x80, zero, 8)

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return dict(qt.data)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """What compressed-tensors' quantize + NaiveQuantizationCompressor.compress write (weights only)."""
        if w.ndim != 2:
            raise ShapeMismatchError(f"can only quantize 2-d weights, got shape {list(w.shape)}")
        scale, zp = minmax_qparams(w, self.args)
        data = {"weight": quantize_values(w, scale, zp, self.args), "weight_scale": scale}
        if not self.args.symmetric:
            data["weight_zero_point"] = zp
        return QTensor(self, data, w.shape, w.dtype)

    def nbytes_for(self, shape, dtype) -> int:
        n_out, n_in = shape
        n = self._n_scales(n_out, n_in)
        return n_out * n_in + n * (torch.finfo(dtype).bits // 8) + (0 if self.args.symmetric else n)


# --- quantization_config ------------------------------------------------------------------------
_SUPPORTED_FORMATS = ("pack-quantized", *NAIVE_FORMATS, "dense", "nvfp4-pack-quantized", "mxfp4-pack-quantized")


def _ct_name_match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _class_names(module: nn.Module | None) -> set[str]:
    if module is None:
        return {"Linear", "Module"}
    return {c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)}


class CompressedTensorsSpec(QuantSpec):
    """compressed-tensors: a scheme per config group, chosen by targets; `ignore` leaves modules dense."""

    method = "compressed-tensors"

    def __init__(self, cfg: dict, *, file=None):
        cfg = dict(cfg)
        fmt = cfg.get("format")
        for k in ("sparsity_config", "transform_config"):
            sub = cfg.get(k) or {}
            if sub and (k == "transform_config" or str(sub.get("format", "dense")) != "dense"):
                raise UnsupportedError(f"compressed-tensors {k} {sub!r} is not supported", file=file)
        if fmt is not None and fmt not in (*_SUPPORTED_FORMATS, "mixed-precision"):
            raise UnsupportedError(f"compressed-tensors format {fmt!r} is not supported; supported: "
                                   f"{list(_SUPPORTED_FORMATS)} and 'mixed-precision'", file=file)
        groups = cfg.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise ConfigError(f"config_groups must be a dict, got {type(groups).__name__}", file=file)
        self.compressed = str(cfg.get("quantization_status", "compressed")).lower() == "compressed"
        self.groups = []   # (targets, scheme or None)
        for gname, g in groups.items():
            if not isinstance(g, dict) or not g.get("targets"):
                raise ConfigError(f"config group {gname!r} needs a non-empty 'targets' list", file=file)
            self.groups.append((list(g["targets"]), self._scheme(g, fmt, file)))
        ignore = list(cfg.get("ignore") or [])
        super().__init__(None, skip_modules=ignore, raw=cfg)

    def _scheme(self, group: dict, top_format, file):
        if group.get("weights") is None:
            return None                                   # activation-only group: weights stay dense
        fp4 = group.get("format") if top_format in (None, "mixed-precision") else top_format
        if fp4 in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):  # E2M1 weights: schemes/nvfp4.py
            from .nvfp4 import ct_fp4_scheme
            return ct_fp4_scheme(fp4, group["weights"], file=file) if self.compressed else None
        args = WeightArgs.from_dict(group["weights"], file=file)
        fmt = group.get("format") if top_format in (None, "mixed-precision") else top_format
        if fmt is None:                                   # what compressed-tensors infers
            fmt = ("float-quantized" if args.type == "float"
                   else "int-quantized" if group.get("input_activations") else "pack-quantized")
        if fmt not in _SUPPORTED_FORMATS:
            raise UnsupportedError(f"compressed-tensors format {fmt!r} is not supported; supported: "
                                   f"{list(_SUPPORTED_FORMATS)}", file=file)
        if fmt == "dense" or not self.compressed:
            return None                                   # float weights (fake-quantized): load as dense
        if fmt == "pack-quantized":
            return CTPackedScheme(args)
        return CTNaiveScheme(args, fmt)

    def scheme_for(self, module_name, module):
        if module is not None and not isinstance(module, nn.Linear):
            return None
        classes = _class_names(module)
        if any(_ct_name_match(module_name, t) or t in classes for t in self.skip_modules):
            return None
        scheme = self._best_group(module_name, classes)
        if scheme is None:
            return None
        a = scheme.args
        if module is not None and a.strategy == "group" and module.in_features % a.group_size:
            # compressed-tensors (and vLLM) need whole groups: such a layer stays dense and is listed in
            # `ignore` so the saved config says so
            self.skip_modules.append(module_name)
            return None
        return scheme

    def _best_group(self, name, classes):
        """compressed-tensors' precedence: exact name, then regex, then class name."""
        for rank in (lambda t: not t.startswith("re:") and t == name,
                     lambda t: t.startswith("re:") and _ct_name_match(name, t),
                     lambda t: t in classes):
            for targets, scheme in self.groups:
                if any(rank(t) for t in targets):
                    return scheme
        return None

    def to_dict(self):
        return {**self.raw, "ignore": list(self.skip_modules)}


@register_method("compressed-tensors", "compressed_tensors")
def parse_compressed_tensors(d: dict) -> CompressedTensorsSpec:
    return CompressedTensorsSpec(d)
