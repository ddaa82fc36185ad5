"""What the mixture-of-experts families share: expert N of a 3-D `ffn_*_exps` tensor, and the tensor
rules of a MoE block.

llama.cpp stacks each projection of all experts into one tensor, `blk.L.ffn_gate_exps.weight` of torch
shape [E, out, in] (`ffn_down_exps` [E, H, I]); the router is `ffn_gate_inp` [E, H]. Expert N is the
contiguous run of rows N*out .. (N+1)*out, so each expert projection is loaded as its own QTensor over
those rows of the file's blocks (nothing is dequantized, nothing copied). The model side is
runtime/experts.py's QExperts: `model.layers.L.mlp.experts.N.{gate_proj,up_proj,down_proj}`.

A rule whose transform is an `ExpertSlice` carries the GGUF tensor's full shape [E, out, in] (the
shape checked against the file); the parameter's shape is that without the leading E.
"""
from __future__ import annotations

import torch

from ..errors import ShapeMismatchError, UnsupportedError
from .base import TensorRule
from .transforms import Transform


class ExpertSlice(Transform):
    """GGUF [E, ...] -> expert `expert`'s [...]: a slice along dim 0 (for block types: a run of rows)."""

    def __init__(self, expert: int):
        self.expert = int(expert)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.expert]

    def rows_of(self, raw: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """This expert's bytes of a tensor's raw 1-D bytes of `shape` [E, ...], and its shape."""
        n = int(shape[0])
        if n <= self.expert or raw.numel() % n:
            raise ShapeMismatchError(f"cannot take expert {self.expert} of a tensor of shape {tuple(shape)} "
                                     f"({raw.numel()} bytes)")
        per = raw.numel() // n
        return raw[self.expert * per:(self.expert + 1) * per], tuple(shape[1:])

    def inverse(self) -> Transform:
        raise UnsupportedError("writing mixture-of-experts models to GGUF is not supported yet")


def expert_rules(num_experts: int, hidden: int, intermediate: int, *, bias: bool = False) -> list[TensorRule]:
    """`{bid}` rules for the experts: one per expert per projection (and bias)."""
    rules = []
    for e in range(num_experts):
        hf = f"model.layers.{{bid}}.mlp.experts.{e}"
        cut = ExpertSlice(e)
        up_shape, down_shape = (num_experts, intermediate, hidden), (num_experts, hidden, intermediate)
        rules += [
            TensorRule("blk.{bid}.ffn_gate_exps.weight", f"{hf}.gate_proj.weight", up_shape, cut),
            TensorRule("blk.{bid}.ffn_up_exps.weight", f"{hf}.up_proj.weight", up_shape, cut),
            TensorRule("blk.{bid}.ffn_down_exps.weight", f"{hf}.down_proj.weight", down_shape, cut),
        ]
        if bias:
            rules += [
                TensorRule("blk.{bid}.ffn_gate_exps.bias", f"{hf}.gate_proj.bias", (num_experts, intermediate), cut),
                TensorRule("blk.{bid}.ffn_up_exps.bias", f"{hf}.up_proj.bias", (num_experts, intermediate), cut),
                TensorRule("blk.{bid}.ffn_down_exps.bias", f"{hf}.down_proj.bias", (num_experts, hidden), cut),
            ]
    return rules


def moe_writer_unsupported(arch: str):
    return UnsupportedError(f"writing {arch} (mixture of experts) to GGUF is not supported yet; "
                            "load it from GGUF, or save it as safetensors")
