"""The fused QKV row order of Falcon and BLOOM, and llama.cpp's.

transformers' Falcon/BLOOM `query_key_value` is grouped: for each of the `groups` KV groups, its
`q_per_group` query heads, then one key head, then one value head (BLOOM and Falcon without multi-query:
a group per head, one query each). `convert_hf_to_gguf.py` regroups the rows into all queries, then all
keys, then all values, the layout llama.cpp splits with views. Undoing that only moves whole rows, so a
quantized tensor keeps its blocks (the output is reordered instead, like llama's Q/K un-permute).
"""
from __future__ import annotations

import torch

from ..errors import ShapeMismatchError
from .transforms import _RowPermutation


def _gguf_row_of_hf_row(groups: int, q_per_group: int, head_dim: int, n_rows: int) -> torch.Tensor:
    if n_rows != groups * (q_per_group + 2) * head_dim:
        raise ShapeMismatchError(f"cannot split {n_rows} QKV rows into {groups} groups of {q_per_group} query "
                                 f"heads, one key and one value head of {head_dim}")
    q_rows, kv_rows = groups * q_per_group * head_dim, groups * head_dim
    q = torch.arange(q_rows).reshape(groups, q_per_group * head_dim)
    k = q_rows + torch.arange(kv_rows).reshape(groups, head_dim)
    v = q_rows + kv_rows + torch.arange(kv_rows).reshape(groups, head_dim)
    return torch.cat([q, k, v], dim=1).reshape(-1)


class QKVFromGGUF(_RowPermutation):
    """GGUF -> transformers: the grouped order back from llama.cpp's q|k|v (weights and biases)."""

    def __init__(self, groups: int, q_per_group: int, head_dim: int):
        self.groups, self.q_per_group, self.head_dim = int(groups), int(q_per_group), int(head_dim)

    def row_permutation(self, n_rows: int) -> torch.Tensor:
        return _gguf_row_of_hf_row(self.groups, self.q_per_group, self.head_dim, n_rows)

    def inverse(self) -> "QKVToGGUF":
        return QKVToGGUF(self.groups, self.q_per_group, self.head_dim)


class QKVToGGUF(_RowPermutation):
    """transformers -> GGUF: what the converter does to `query_key_value`."""

    def __init__(self, groups: int, q_per_group: int, head_dim: int):
        self.groups, self.q_per_group, self.head_dim = int(groups), int(q_per_group), int(head_dim)

    def row_permutation(self, n_rows: int) -> torch.Tensor:
        return torch.argsort(_gguf_row_of_hf_row(self.groups, self.q_per_group, self.head_dim, n_rows))

    def inverse(self) -> QKVFromGGUF:
        return QKVFromGGUF(self.groups, self.q_per_group, self.head_dim)
