"""Which part of each checkpoint piece a rank holds when a Linear is split N ways.

colwise: the output features (weight rows) are split, rank r keeps outputs [r*O/N, (r+1)*O/N).
rowwise: the input features (weight columns) are split, rank r keeps inputs [r*I/N, (r+1)*I/N).

A spec slices the *stored* pieces (still packed, still quantized) so that the shard decodes to exactly
the matching slice of the full weight's decode. Pieces come in as lazy views of the memory-mapped file;
a spec narrows them before copying, so a rank touches only the bytes of its slice (`PieceReader` counts
them). A split that would cut a pack word, a quantization group or a block raises PlacementError naming
the weight, the rank count and the divisibility needed, before anything is read (`check`).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PlacementError
from ..schemes.awq import AWQScheme
from ..schemes.bnb4 import (NESTED_BLOCKSIZE, QS_PREFIX, QS_TYPE_PREFIX, Bnb4Scheme, dequantize_nested_absmax,
                            dynamic_map)
from ..schemes.compressed import CTPackedScheme
from ..schemes.fp8_block import FP8BlockScheme
from ..schemes.gptq import GPTQScheme

STYLES = ("colwise", "rowwise")


@dataclass(frozen=True)
class Split:
    style: str      # "colwise" | "rowwise"
    rank: int
    world: int

    def bounds(self, n: int) -> tuple[int, int]:
        step = n // self.world
        return self.rank * step, (self.rank + 1) * step

    def local_shape(self, shape) -> tuple[int, int]:
        out, inp = shape
        return (out // self.world, inp) if self.style == "colwise" else (out, inp // self.world)


def _need(name: str, split: Split, what: str, n: int, multiple: int, why: str) -> None:
    """n features split `world` ways must give each rank a multiple of `multiple`."""
    if n % split.world or (n // split.world) % multiple:
        raise PlacementError(
            f"{name}: {split.style} over {split.world} ranks splits {what} {n} into {n / split.world:g} per rank, "
            f"which must be a whole multiple of {multiple} ({why}); use a rank count N with "
            f"{what} % (N*{multiple}) == 0, or leave this module out of tp_plan")


class PieceReader:
    """Lazy pieces of one module (suffix -> zero-copy view) and the bytes actually copied out of them."""

    def __init__(self, get: Callable[[str], torch.Tensor], have: set[str]):
        self._get = get
        self.have = have
        self.bytes_read = 0
        self.used: set[str] = set()

    def take(self, suffix: str, slicer=None) -> torch.Tensor:
        view = self._get(suffix)
        part = view if slicer is None else slicer(view)
        out = part.clone(memory_format=torch.contiguous_format)  # only the slice's pages are touched
        self.bytes_read += out.numel() * out.element_size()
        self.used.add(suffix)
        return out


# --- dense ------------------------------------------------------------------------------------------
def check_dense(name: str, shape, split: Split) -> None:
    out, inp = shape
    if split.style == "colwise":
        _need(name, split, "out_features", out, 1, "an even split")
    else:
        _need(name, split, "in_features", inp, 1, "an even split")


def shard_dense(t: torch.Tensor, split: Split, kind: str = "weight") -> torch.Tensor:
    """The rank's slice of a plain tensor (a view; the caller copies): weight [O, I] or bias [O]. A rowwise
    layer's bias is whole on every rank (load.py keeps it on rank 0 only, as it is added once)."""
    if kind == "bias":
        if split.style == "colwise":
            a, b = split.bounds(t.shape[0])
            return t[a:b]
        return t
    if split.style == "colwise":
        a, b = split.bounds(t.shape[0])
        return t[a:b]
    a, b = split.bounds(t.shape[1])
    return t[:, a:b]


class ShardSpec:
    """check(): refuse before reading; shard(): the rank's pieces; scheme_for_shard(): the scheme that
    decodes them (the same one unless the shard changes a parameter, e.g. GPTQ act-order rowwise)."""

    def check(self, scheme, name: str, shape, split: Split) -> None:
        raise NotImplementedError

    def shard(self, scheme, reader: PieceReader, shape, split: Split, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scheme_for_shard(self, scheme, shape, split: Split):
        return scheme


# --- GPTQ: qweight [I*b/32, O] packed down the inputs, qzeros [G, O*b/32] along the outputs, scales [G, O]
class GPTQShard(ShardSpec):
    def _gs(self, scheme, n_in):
        return n_in if scheme.group_size == -1 else scheme.group_size

    def check(self, scheme: GPTQScheme, name, shape, split):
        out, inp = shape
        word = 32 // math.gcd(32, scheme.bits)   # values per whole number of int32 words
        if split.style == "colwise":
            _need(name, split, "out_features", out, word, f"qzeros pack {scheme.bits}-bit zero-points "
                  f"{word} per whole word run along the outputs")
            return
        _need(name, split, "in_features", inp, word, f"qweight packs {scheme.bits}-bit codes {word} per whole "
              "word run down the inputs")
        gs = self._gs(scheme, inp)
        if scheme.group_size == -1:
            return
        if scheme.desc_act:
            # act-order: a rank's columns belong to any group, so every rank keeps all scales/zeros and
            # decodes with g_idx; the shard's group size is gs/N so that ceil(I/N / (gs/N)) = G still holds
            if gs % split.world or inp % gs:
                raise PlacementError(f"{name}: rowwise over {split.world} ranks of a GPTQ act-order (desc_act) "
                                     f"layer keeps all {inp // gs if gs else 0} groups on every rank, which needs "
                                     f"group_size {gs} divisible by {split.world} and in_features {inp} by {gs}")
            return
        _need(name, split, "in_features", inp, gs, f"whole quantization groups of {gs} inputs")

    def scheme_for_shard(self, scheme: GPTQScheme, shape, split):
        if split.style == "rowwise" and scheme.desc_act and scheme.group_size != -1:
            s = copy.copy(scheme)
            s.group_size = scheme.group_size // split.world
            return s
        return scheme

    def shard(self, scheme: GPTQScheme, reader, shape, split, name):
        out, inp = shape
        b = scheme.bits
        pieces = {}
        if split.style == "colwise":
            o0, o1 = split.bounds(out)
            pieces["qweight"] = reader.take("qweight", lambda t: t[:, o0:o1])
            pieces["scales"] = reader.take("scales", lambda t: t[:, o0:o1])
            pieces["qzeros"] = reader.take("qzeros", lambda t: t[:, o0 * b // 32:o1 * b // 32])
            if "g_idx" in reader.have:
                pieces["g_idx"] = reader.take("g_idx")
            return pieces
        c0, c1 = split.bounds(inp)
        pieces["qweight"] = reader.take("qweight", lambda t: t[c0 * b // 32:c1 * b // 32])
        if scheme.group_size == -1:          # one group: every rank keeps it
            pieces["scales"], pieces["qzeros"] = reader.take("scales"), reader.take("qzeros")
            if "g_idx" in reader.have:
                pieces["g_idx"] = reader.take("g_idx", lambda t: t[c0:c1])
        elif scheme.desc_act:                # all groups, the rank's g_idx entries as they are
            pieces["scales"], pieces["qzeros"] = reader.take("scales"), reader.take("qzeros")
            if "g_idx" in reader.have:
                pieces["g_idx"] = reader.take("g_idx", lambda t: t[c0:c1])
            else:
                pieces["g_idx"] = (torch.arange(c0, c1, dtype=torch.int32) // scheme.group_size)
        else:
            gs = scheme.group_size
            pieces["scales"] = reader.take("scales", lambda t: t[c0 // gs:c1 // gs])
            pieces["qzeros"] = reader.take("qzeros", lambda t: t[c0 // gs:c1 // gs])
            if "g_idx" in reader.have:   # trivial i // gs (desc_act off): renumbered from the shard's first group
                pieces["g_idx"] = reader.take("g_idx", lambda t: t[c0:c1]) - c0 // gs
        return pieces


# --- AWQ GEMM: qweight [I, O/8] and qzeros [I/G, O/8] packed along the outputs, scales [I/G, O] ------
class AWQShard(ShardSpec):
    def check(self, scheme: AWQScheme, name, shape, split):
        out, inp = shape
        if scheme.layout != "gemm":
            raise PlacementError(f"{name}: AWQ {scheme.version!r} layout has no shard spec (only GEMM)")
        if split.style == "colwise":
            _need(name, split, "out_features", out, 8, "AWQ packs 8 output columns per int32 word")
        else:
            gs = inp if scheme.group_size == -1 else scheme.group_size
            if scheme.group_size == -1:
                raise PlacementError(f"{name}: rowwise AWQ with group_size -1 (one group over all inputs) is "
                                     "not supported")
            _need(name, split, "in_features", inp, gs, f"whole quantization groups of {gs} inputs")

    def shard(self, scheme: AWQScheme, reader, shape, split, name):
        out, inp = shape
        if split.style == "colwise":
            o0, o1 = split.bounds(out)
            sl = {"qweight": lambda t: t[:, o0 // 8:o1 // 8], "qzeros": lambda t: t[:, o0 // 8:o1 // 8],
                  "scales": lambda t: t[:, o0:o1]}
        else:
            c0, c1 = split.bounds(inp)
            g0, g1 = c0 // scheme.group_size, c1 // scheme.group_size
            sl = {"qweight": lambda t: t[c0:c1], "qzeros": lambda t: t[g0:g1], "scales": lambda t: t[g0:g1]}
        return {k: reader.take(k, f) for k, f in sl.items() if k in reader.have}


# --- bitsandbytes 4-bit: codes of the flattened weight, two a byte, one absmax per `blocksize` codes -----
class Bnb4Shard(ShardSpec):
    def check(self, scheme: Bnb4Scheme, name, shape, split):
        out, inp = shape
        bs = scheme.blocksize
        if split.style == "colwise":
            # a rank's rows are one contiguous run of rows*I codes: it must start and end on a block
            if out % split.world or ((out // split.world) * inp) % bs:
                raise PlacementError(f"{name}: colwise over {split.world} ranks gives each rank "
                                     f"{out / split.world:g} rows x {inp} = {out * inp / split.world:g} codes, which "
                                     f"must be a whole multiple of the {bs}-code blocksize")
        else:
            if inp % bs:
                raise PlacementError(f"{name}: rowwise needs whole blocks in each row: in_features {inp} is not a "
                                     f"multiple of the blocksize {bs}")
            _need(name, split, "in_features", inp, bs, f"whole {bs}-code blocks in each row")

    def shard(self, scheme: Bnb4Scheme, reader, shape, split, name):
        out, inp = shape
        qs = next(s for s in reader.have if s.startswith(QS_PREFIX + QS_TYPE_PREFIX))
        state = json.loads(bytes(reader.take(qs).numpy()).decode("utf-8"))
        bs = int(state["blocksize"])
        nb = -(-out * inp // bs)
        local = split.local_shape(shape)

        def as_bytes(t):
            return t.reshape(-1).view(torch.uint8)
        if split.style == "colwise":
            r0, r1 = split.bounds(out)
            e0, e1 = r0 * inp, r1 * inp
            b0, b1 = e0 // bs, -(-e1 // bs)
            pieces = {"weight": reader.take("weight", lambda t: as_bytes(t)[e0 // 2:e1 // 2]).unsqueeze(1)}
            absmax = self._absmax(reader, state, nb, b0, b1, pieces)
        else:
            c0, c1 = split.bounds(inp)
            pieces = {"weight": reader.take("weight", lambda t: as_bytes(t).view(out, inp // 2)[:, c0 // 2:c1 // 2])
                      .reshape(-1, 1)}
            def cols(t):
                return t.view(out, inp // bs)[:, c0 // bs:c1 // bs].reshape(-1)
            absmax = None
            if "nested_offset" not in state:
                pieces["weight.absmax"] = reader.take("weight.absmax", cols)
            else:   # each row's blocks sit in different nested blocks: decode all statistics, keep the rows' part
                absmax = cols(self._absmax(reader, state, nb, 0, nb, pieces, rederive=True)).clone()
        if absmax is not None:          # re-derived float32 statistics: the shard is plain (no double quant)
            pieces["weight.absmax"] = absmax
            for k in ("nested_blocksize", "nested_dtype", "nested_offset"):
                state.pop(k, None)
        pieces["weight.quant_map"] = reader.take("weight.quant_map")
        state["shape"] = list(local)
        pieces[qs] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return pieces

    def _absmax(self, reader, state, nb, b0, b1, pieces, rederive=False):
        """Keep blocks [b0, b1) of the statistics. Double quant: nested blocks of 256 absmax codes that a
        shard boundary would cut are re-derived as float32 (the exact values bnb decodes them to), so the
        shard is a plain NF4 tensor; whole nested blocks stay nested. Returns re-derived absmax or None."""
        if "nested_offset" not in state:
            pieces["weight.absmax"] = reader.take("weight.absmax", lambda t: t[b0:b1])
            return None
        nbs = int(state["nested_blocksize"])
        if not rederive and b0 % nbs == 0 and (b1 % nbs == 0 or b1 == nb):
            pieces["weight.absmax"] = reader.take("weight.absmax", lambda t: t[b0:b1])
            pieces["weight.nested_absmax"] = reader.take("weight.nested_absmax", lambda t: t[b0 // nbs:-(-b1 // nbs)])
            pieces["weight.nested_quant_map"] = reader.take("weight.nested_quant_map")
            return None
        n0, n1 = b0 // nbs, -(-b1 // nbs)
        codes = reader.take("weight.absmax", lambda t: t[n0 * nbs:min(n1 * nbs, nb)])
        nested = reader.take("weight.nested_absmax", lambda t: t[n0:n1])
        nmap = reader.take("weight.nested_quant_map")
        nmap = None if torch.equal(nmap.view(torch.int32), dynamic_map().view(torch.int32)) else nmap
        from ..config import parse_dtype
        ndt = parse_dtype(state.get("nested_dtype", "float32"))
        full = dequantize_nested_absmax(codes, nested, float(state["nested_offset"]), nbs, nmap, ndt)
        return full[b0 - n0 * nbs:b1 - n0 * nbs].clone()


assert NESTED_BLOCKSIZE == 256


# --- compressed-tensors pack-quantized: weight_packed [O, I*b/32] along the inputs; weight_scale per tensor
# [1], channel [O, 1] or group [O, G]; asymmetric zero-points packed along the OUTPUTS [O*b/32, G] ---------
class CTPackedShard(ShardSpec):
    def check(self, scheme: CTPackedScheme, name, shape, split):
        out, inp = shape
        a, b = scheme.args, scheme.bits
        word = 32 // math.gcd(32, b)
        if 32 % b:
            raise PlacementError(f"{name}: {b}-bit pack-quantized words have no shard spec (2, 4 or 8 bits)")
        if a.strategy == "block":
            raise PlacementError(f"{name}: pack-quantized with block scales has no shard spec")
        if split.style == "colwise":
            _need(name, split, "out_features", out, 1 if a.symmetric else word,
                  f"zero-points pack {word} outputs per word")
            return
        if a.actorder is not None and a.actorder != "weight":
            raise PlacementError(f"{name}: rowwise split of a pack-quantized layer with actorder={a.actorder!r} "
                                 "(weight_g_idx) has no shard spec; leave it out of tp_plan")
        _need(name, split, "in_features", inp, word, f"codes pack {word} inputs per int32 word")
        if a.strategy == "group":
            _need(name, split, "in_features", inp, a.group_size, f"whole quantization groups of {a.group_size}")

    def shard(self, scheme: CTPackedScheme, reader, shape, split, name):
        out, inp = shape
        b, st = scheme.bits, scheme.args.strategy
        local = split.local_shape(shape)
        if split.style == "colwise":
            o0, o1 = split.bounds(out)
            pieces = {"weight_packed": reader.take("weight_packed", lambda t: t[o0:o1])}
            by_scale = (lambda t: t) if st == "tensor" else (lambda t: t[o0:o1])
            packed_zp = lambda t: t[o0 * b // 32:o1 * b // 32]  # noqa: E731
        else:
            c0, c1 = split.bounds(inp)
            pieces = {"weight_packed": reader.take("weight_packed", lambda t: t[:, c0 * b // 32:c1 * b // 32])}
            if st == "group":
                g0, g1 = c0 // scheme.args.group_size, c1 // scheme.args.group_size
                by_scale = lambda t: t[:, g0:g1]  # noqa: E731
            else:   # tensor / channel: one scale a row, whole on every rank
                by_scale = lambda t: t  # noqa: E731
            packed_zp = by_scale
        scale = reader.take("weight_scale", by_scale)
        pieces["weight_scale"] = scale
        if "weight_zero_point" in reader.have:
            view = reader._get("weight_zero_point")
            is_packed = view.dtype == torch.int32 and view.ndim == 2 and st in ("group", "channel") \
                and tuple(view.shape) != (out, scale.shape[1] if scale.ndim == 2 else 1)
            pieces["weight_zero_point"] = reader.take("weight_zero_point", packed_zp if is_packed else
                                                      (by_scale if view.numel() > 1 else None))
        if "weight_g_idx" in reader.have:      # colwise only (check refuses rowwise act-order)
            pieces["weight_g_idx"] = reader.take("weight_g_idx")
        wshape = reader.take("weight_shape")
        pieces["weight_shape"] = torch.tensor(local, dtype=wshape.dtype)
        return pieces

# --- fine-grained FP8: weight float8 [O, I], weight_scale_inv one per [bh, bw] block (or one per tensor) ----
class FP8BlockShard(ShardSpec):
    def check(self, scheme: FP8BlockScheme, name, shape, split):
        out, inp = shape
        bh, bw = scheme.block or (1, 1)
        if split.style == "colwise":
            _need(name, split, "out_features", out, bh, f"whole {bh}-row FP8 scale blocks")
        else:
            _need(name, split, "in_features", inp, bw, f"whole {bw}-column FP8 scale blocks")

    def shard(self, scheme: FP8BlockScheme, reader, shape, split, name):
        out, inp = shape
        if split.style == "colwise":
            a, b = split.bounds(out)
            bh = scheme.block[0] if scheme.block else None
            pieces = {"weight": reader.take("weight", lambda t: t[a:b])}
            pieces["weight_scale_inv"] = reader.take("weight_scale_inv", None if bh is None else
                                                     (lambda t: t[a // bh:-(-b // bh)]))
        else:
            a, b = split.bounds(inp)
            bw = scheme.block[1] if scheme.block else None
            pieces = {"weight": reader.take("weight", lambda t: t[:, a:b])}
            pieces["weight_scale_inv"] = reader.take("weight_scale_inv", None if bw is None else
                                                     (lambda t: t[:, a // bw:-(-b // bw)]))
        if "activation_scale" in reader.have:
            pieces["activation_scale"] = reader.take("activation_scale")
        return pieces


SPECS: dict[type, ShardSpec] = {GPTQScheme: GPTQShard(), AWQScheme: AWQShard(), Bnb4Scheme: Bnb4Shard(),
                                CTPackedScheme: CTPackedShard(), FP8BlockScheme: FP8BlockShard()}


def spec_for(scheme, name: str) -> ShardSpec:
    for cls in type(scheme).__mro__:
        if cls in SPECS:
            return SPECS[cls]
    raise PlacementError(f"{name}: the {type(scheme).__name__} ({getattr(scheme, 'name', '?')}) format has no "
                         f"tensor-parallel shard spec yet (supported: dense, "
                         f"{', '.join(c.__name__ for c in SPECS)}); leave this module out of tp_plan")
