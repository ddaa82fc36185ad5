"""Tensor-parallel GGUF: a rank reads whole rows of its colwise weights' blocks, or the blocks of its input
columns in every row of a rowwise weight (in_features / N must be a multiple of the type's block size).
llama.cpp's q/k row permutation (transformers' rotary half order) is kept per shard: it moves rows only
within a head, so a head-aligned shard's rows are the same file rows, permuted locally."""
from __future__ import annotations

import torch

from ..errors import PlacementError, UnsupportedError
from ..ggml_types import GGML_TYPES
from ..gguf_load import _FLOAT_TYPES, GGUFWeights
from ..schemes.gguf import GGUFScheme, gguf_scheme
from ..schemes.gguf.scheme import ROW_ORDER
from .shard_specs import Split, check_dense, shard_dense


def gguf_choose(source, mm):
    """load_gguf's choice for a file loaded as it is: the ggml block type of each quantized Linear."""
    def choose(name, mod):
        ref = mm.params.get(f"{name}.weight")
        if ref is None:
            return None
        info = source.info(ref.gguf_name)
        if info.ggml_type in _FLOAT_TYPES or GGML_TYPES[info.ggml_type].block_size == 1:
            return None
        if ref.transform is not None and ref.transform.row_permutation(info.shape[0]) is None:
            return None
        return gguf_scheme(info.ggml_type)
    return choose


def check_gguf(mm, name: str, scheme, full, split: Split) -> None:
    """Before reading: block alignment, and that a permuted weight's shard keeps its own rows."""
    check_dense(name, full, split)
    if scheme is None:
        return
    out, inp = full
    if split.style == "rowwise" and (inp // split.world) % scheme.block_size:
        raise PlacementError(f"{name}: rowwise over {split.world} ranks gives {inp / split.world:g} inputs per rank "
                             f"in each row, which must be a whole multiple of the {scheme.ggml.name} block size "
                             f"{scheme.block_size}")
    ref = mm.params.get(f"{name}.weight")
    if split.style == "colwise" and ref is not None and ref.transform is not None:
        perm = ref.transform.row_permutation(out)
        o0, o1 = split.bounds(out)
        if not torch.equal(perm[o0:o1].sort().values, torch.arange(o0, o1)):
            raise PlacementError(f"{name}: its GGUF row order moves rows across the {split.world}-way split "
                                 "(a shard must hold whole heads)")


class ShardedGGUFWeights(GGUFWeights):
    def __init__(self, source, model_map, dtype, splits: dict[str, Split]):
        super().__init__(source, model_map, dtype)
        self.splits = splits

    def qtensor(self, module_name, mod):
        split = self.splits.get(module_name)
        if split is None or not isinstance(mod.scheme, GGUFScheme):
            return super().qtensor(module_name, mod)
        ref = self.map.params.get(f"{module_name}.weight")
        if ref is None:
            return None
        scheme = mod.scheme
        out, inp = mod.tp_full_shape
        row_bytes = inp // scheme.block_size * scheme.type_size
        blocks = self.source.get(ref.gguf_name).view(out, row_bytes)
        if split.style == "colwise":
            o0, o1 = split.bounds(out)
            part = blocks[o0:o1]
        else:
            c0, c1 = split.bounds(inp)
            part = blocks[:, c0 // scheme.block_size * scheme.type_size:c1 // scheme.block_size * scheme.type_size]
        raw = part.clone(memory_format=torch.contiguous_format)   # only the shard's pages are touched
        self.used.add(ref.gguf_name)
        self.tensors_read += 1
        self.bytes_read += raw.numel()
        qt = scheme.decode({"weight": raw}, shape=tuple(mod._logical_shape), file=self.source.path,
                           prefix=ref.gguf_name)
        if ref.transform is not None:
            perm = ref.transform.row_permutation(out)
            qt.meta[ROW_ORDER] = perm[o0:o1] - o0 if split.style == "colwise" else perm
        qt.dtype = self.dtype
        return qt

    def tensor(self, name):
        """Float tensors of split modules: the whole tensor as load_gguf makes it (transforms applied),
        then the shard (F32/F16 weights of split layers are read whole: counted so)."""
        mod_name, _, kind = name.rpartition(".")
        split = self.splits.get(mod_name)
        t = super().tensor(name)
        if split is None or t is None or kind not in ("weight", "bias"):
            return t
        return shard_dense(t, split, kind).clone(memory_format=torch.contiguous_format)


def refuse_experts(mm, file):
    from ..architectures.moe import ExpertSlice
    if any(isinstance(ref.transform, ExpertSlice) for ref in mm.params.values()):
        raise UnsupportedError("tp_plan: GGUF mixture-of-experts files are not sharded yet", file=file)
