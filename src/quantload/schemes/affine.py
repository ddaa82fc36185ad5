"""Affine weight quantization primitives: min-max round-to-nearest with no calibration, and the
runtime-quantization configs built on them.

The math is compressed-tensors' own (`calculate_qparams`, `_quantize`, `_dequantize` in its CPU path,
docs/formats.md §5.1), done op for op in the same dtypes (min-max statistics in float32 as llm-compressor's
observer keeps them, the scale stored in the weight's dtype, quantization in the weight's dtype), so a weight
quantized here packs to the very bytes compressed-tensors writes for the same weight and args. On CUDA,
compressed-tensors itself switches to a Triton kernel that divides in float32; we keep the CPU semantics on
every device, so our bytes do not depend on where the model was loaded. Scales and zero-points depend on the strategy:
tensor (one pair), channel (one per output row, [O, 1]), group (one per `group_size` input columns,
[O, ceil(I/gs)]) and block ([ceil(O/bh), ceil(I/bw)]).

Runtime quantization (`quantize="int4"`, or `IntQuantConfig(...)`) is always expressed as a
compressed-tensors config, so that what we save is a pack-quantized checkpoint transformers and vLLM read.
Short names registered here (the bitsandbytes "int8" / "llm.int8" stay LLM.int8):

  name                     bits  zero-point  grouping
  "int4", "w4a16"          4     symmetric   group of 128 input columns
  "int4-asym", "w4a16-asym" 4    asymmetric  group of 128
  "int4-channel"           4     symmetric   per output channel
  "int8-channel", "w8a16"  8     symmetric   per output channel
  "int8-group"             8     symmetric   group of 128
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import register_short_name
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError

FP8_MAX = 448.0   # float8_e4m3fn
STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class WeightArgs:
    """The weight part of a compressed-tensors quantization scheme (the fields that change bytes)."""
    num_bits: int = 8
    type: str = "int"              # "int" or "float"
    symmetric: bool = True
    strategy: str = "tensor"
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    actorder: str | None = None

    @classmethod
    def from_dict(cls, d: dict, *, file=None) -> "WeightArgs":
        """compressed-tensors QuantizationArgs (as serialized in config.json) -> WeightArgs, with its
        strategy inference: no group_size -> tensor, group_size > 0 -> group, -1 -> channel."""
        if not isinstance(d, dict):
            raise ConfigError(f"quantization 'weights' must be a dict, got {type(d).__name__}", file=file)
        bits = int(d.get("num_bits", 8))
        typ = str(d.get("type", "int")).lower()
        gs = d.get("group_size")
        strategy = d.get("strategy")
        if strategy is None:
            strategy = "tensor" if gs is None else "group" if gs > 0 else "channel"
        strategy = str(strategy).lower()
        if strategy not in STRATEGIES:
            raise UnsupportedError(f"compressed-tensors weight strategy {strategy!r} is not supported; "
                                   f"supported: {list(STRATEGIES)}", file=file)
        if strategy == "group" and (gs is None or gs <= 0):
            raise ConfigError(f"strategy 'group' needs a positive group_size, got {gs!r}", file=file)
        bs = d.get("block_structure")
        if isinstance(bs, str):
            bs = [int(x) for x in bs.split("x")]
        if strategy == "block" and (not bs or len(bs) != 2):
            raise ConfigError(f"strategy 'block' needs block_structure [rows, cols], got {bs!r}", file=file)
        if typ not in ("int", "float"):
            raise UnsupportedError(f"compressed-tensors weight type {typ!r} is not supported", file=file)
        if typ == "float" and bits != 8:
            raise UnsupportedError(f"float weights with num_bits={bits} (FP4/NVFP4/MX formats) are not supported; "
                                   "only FP8 E4M3", file=file)
        if typ == "int" and not 1 <= bits <= 8:
            raise UnsupportedError(f"integer weights with num_bits={bits} are not supported; expected 1..8",
                                   file=file)
        if d.get("dynamic") not in (None, False, "false"):
            raise UnsupportedError(f"dynamic weight quantization ({d.get('dynamic')!r}) is not supported", file=file)
        act = d.get("actorder")
        return cls(bits, typ, bool(d.get("symmetric", True)), strategy,
                   int(gs) if strategy == "group" else None, tuple(bs) if strategy == "block" else None,
                   str(act).lower() if act not in (None, False) else None)

    def to_dict(self) -> dict:
        """compressed-tensors' own serialization of these args (QuantizationArgs.model_dump)."""
        d = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
             "group_size": self.group_size, "strategy": self.strategy, "dynamic": False}
        if self.block_structure is not None:
            d["block_structure"] = list(self.block_structure)
        if self.actorder is not None:
            d["actorder"] = self.actorder
        return d


def qrange(args: WeightArgs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' calculate_range: float32 0-d tensors (their dtype matters for promotion)."""
    if args.type == "float":
        return torch.tensor(-FP8_MAX, device=device), torch.tensor(FP8_MAX, device=device)
    r = 2.0 ** args.num_bits
    return torch.tensor(-r / 2, device=device), torch.tensor(r / 2 - 1, device=device)


def _check_groups(w: torch.Tensor, args: WeightArgs, what: str = "weight") -> None:
    if args.strategy == "group" and w.shape[-1] % args.group_size:
        raise ShapeMismatchError(f"{what} has {w.shape[-1]} input columns, not a multiple of group_size "
                                 f"{args.group_size} (compressed-tensors requires whole groups)")


def _blocks(x: torch.Tensor, block) -> torch.Tensor:
    """[O, I] -> [O/bh, bh, I/bw, bw] after zero padding (zeros never move a min-max range that
    already includes 0)."""
    bh, bw = block
    o, i = x.shape
    x = torch.nn.functional.pad(x, (0, -i % bw, 0, -o % bh))
    return x.unflatten(1, (-1, bw)).unflatten(0, (-1, bh))


def observe_minmax(w: torch.Tensor, args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per scale entry, in w's dtype: tensor -> 0-d, channel -> [O, 1], group -> [O, ng],
    block -> [nbr, nbc]."""
    if args.strategy == "tensor":
        return torch.aminmax(w)
    if args.strategy == "channel":
        return torch.amin(w, dim=-1, keepdim=True), torch.amax(w, dim=-1, keepdim=True)
    if args.strategy == "group":
        _check_groups(w, args)
        g = w.unflatten(-1, (-1, args.group_size))
        return torch.amin(g, dim=-1), torch.amax(g, dim=-1)
    b = _blocks(w, args.block_structure)
    return torch.amin(b, dim=(1, 3)), torch.amax(b, dim=(1, 3))


def calculate_qparams(min_vals: torch.Tensor, max_vals: torch.Tensor, args: WeightArgs):
    """Scale (in the observed dtype) and zero-point (int8; float8 zeros for FP8), exactly as
    compressed-tensors computes them with scale_dtype and zp_dtype left unset. Symmetric schemes get a
    zero-point of zeros too: compressed-tensors initializes one and adds it while quantizing (which turns
    -0.0 into +0.0), and drops it only when compressing."""
    min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
    bit_min, bit_max = qrange(args, min_vals.device)
    bit_range = bit_max - bit_min
    if args.symmetric:
        max_val_pos = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        scales = max_val_pos / (bit_range.to(max_val_pos.dtype) / 2)
        zero_points = torch.zeros(scales.shape, device=scales.device, dtype=min_vals.dtype)
    else:
        if args.type == "float":
            raise UnsupportedError("asymmetric float (FP8) quantization is not supported")
        scales = (max_vals - min_vals) / bit_range.to(max_vals.dtype)
        zero_points = bit_min - (min_vals / scales)
        zero_points = torch.clamp(zero_points, bit_min, bit_max)
    eps = torch.finfo(scales.dtype).eps
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype, device=scales.device), scales)
    if args.type == "float":
        zero_points = zero_points.to(torch.float8_e4m3fn)
    else:
        zero_points = torch.round(torch.clamp(zero_points, -128, 127)).to(torch.int8)
    if scales.ndim == 0:
        scales, zero_points = scales.reshape(1), zero_points.reshape(1)
    return scales, zero_points


def minmax_qparams(w: torch.Tensor, args: WeightArgs):
    """Scale and zero-point of a float weight, as llm-compressor's min-max observer feeds
    compressed-tensors: statistics in float32, calculate_qparams in float32, then the scale stored in the
    weight's dtype (the dtype of the module's weight_scale parameter). This reproduces the golden
    compressed-tensors fixtures byte for byte; computing the scale in bfloat16 instead moves ~2% of the
    asymmetric codes by one."""
    lo, hi = observe_minmax(w, args)
    scale, zero_point = calculate_qparams(lo.float(), hi.float(), args)
    return scale.to(w.dtype), zero_point


class _Grid:
    """How a [O, I] weight lines up with its scale tensor. Whole groups/blocks reshape the weight so
    scales broadcast without being copied per element; partial ones (and g_idx) expand the scales."""

    def __init__(self, args: WeightArgs, shape, g_idx: torch.Tensor | None = None):
        self.args, self.shape, self.g_idx = args, tuple(shape), g_idx
        o, i = self.shape
        st = args.strategy
        if g_idx is not None:
            self.mode = "index"
        elif st == "group":
            self.mode = "view" if i % args.group_size == 0 else "expand"
        elif st == "block":
            bh, bw = args.block_structure
            self.mode = "view" if o % bh == 0 and i % bw == 0 else "expand"
        else:
            self.mode = "plain"              # tensor [1] and channel [O, 1] broadcast as they are

    def weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "view":
            return x
        o, i = self.shape
        if self.args.strategy == "group":
            return x.reshape(o, i // self.args.group_size, self.args.group_size)
        bh, bw = self.args.block_structure
        return x.reshape(o // bh, bh, i // bw, bw)

    def param(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "view":
            return t.unsqueeze(-1) if self.args.strategy == "group" else t[:, None, :, None]
        if self.mode == "index":
            return t[:, self.g_idx.long()]
        if self.mode == "expand":
            o, i = self.shape
            if self.args.strategy == "group":
                return t.repeat_interleave(self.args.group_size, dim=-1)[..., :i]
            bh, bw = self.args.block_structure
            return t.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:o, :i]
        return t

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape)


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    args: WeightArgs) -> torch.Tensor:
    """compressed-tensors' _quantize: x / scale (+ zp) in w's dtype, clamp, round; int8 codes for int,
    float8_e4m3fn for float."""
    _check_groups(w, args)
    grid = _Grid(args, w.shape)
    scaled = grid.weight(w) / grid.param(scale)
    if zero_point is not None:
        scaled += grid.param(zero_point).to(w.dtype)
    q_min, q_max = qrange(args, w.device)
    scaled = torch.clamp(scaled, q_min, q_max)
    if args.type == "float":
        return grid.restore(scaled.to(torch.float8_e4m3fn))
    return grid.restore(torch.round(scaled).to(torch.int8))


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      args: WeightArgs, g_idx: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """compressed-tensors' _dequantize, (q - zp) * scale in the scale's dtype. `q` may be unsigned codes
    stored `offset` above the signed values (pack-quantized): the offset joins the small zero-point
    tensor instead of costing a pass over the weight; the difference is the same exact integer, so the
    result is bit-identical. `g_idx` (old actorder="group" checkpoints) picks each input column's group."""
    dt = scale.dtype
    grid = _Grid(args, q.shape, g_idx)
    x = grid.weight(q).to(dt)
    if zero_point is not None:
        x = x - grid.param(zero_point.to(torch.int32) + offset).to(dt)
    elif offset:
        x = x - offset
    return grid.restore(x * grid.param(scale))


# --- runtime quantization configs -----------------------------------------------------------------
CT_VERSION = "0.20.0"   # the compressed-tensors release whose config layout we write


def ct_config(bits: int = 4, *, group_size: int | None = 128, symmetric: bool = True,
              ignore=("lm_head",), targets=("Linear",)) -> dict:
    """A compressed-tensors pack-quantized (WnA16) quantization_config, as compressed-tensors writes it.
    group_size None or -1 means one scale per output channel."""
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits={bits}: runtime integer quantization supports 2..8 bits")
    channel = group_size in (None, -1)
    if not channel and (not isinstance(group_size, int) or group_size <= 0):
        raise ConfigError(f"group_size={group_size!r}: expected a positive integer, or None/-1 for per channel")
    args = WeightArgs(bits, "int", bool(symmetric), "channel" if channel else "group",
                      None if channel else group_size)
    return {
        "quant_method": "compressed-tensors", "version": CT_VERSION, "format": "pack-quantized",
        "quantization_status": "compressed", "global_compression_ratio": None,
        "config_groups": {"group_0": {"targets": list(targets), "weights": args.to_dict(),
                                      "input_activations": None, "output_activations": None, "format": None}},
        "ignore": list(ignore), "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
    }


@dataclass
class IntQuantConfig:
    """Runtime weight-only integer quantization (round to nearest, min-max): bits 2..8, symmetric or not,
    per group of `group_size` input columns (None: per output channel). Saved as compressed-tensors."""
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    ignore: list = field(default_factory=lambda: ["lm_head"])

    def to_dict(self) -> dict:
        return ct_config(self.bits, group_size=self.group_size, symmetric=self.symmetric, ignore=self.ignore)


def _register_short_names() -> None:
    names = {
        ("int4", "w4a16"): dict(bits=4, group_size=128, symmetric=True),
        ("int4-asym", "w4a16-asym"): dict(bits=4, group_size=128, symmetric=False),
        ("int4-channel",): dict(bits=4, group_size=None, symmetric=True),
        ("int8-channel", "w8a16"): dict(bits=8, group_size=None, symmetric=True),
        ("int8-group",): dict(bits=8, group_size=128, symmetric=True),
    }
    for aliases, kw in names.items():
        for a in aliases:
            register_short_name(a, ct_config(**kw))


_register_short_names()
