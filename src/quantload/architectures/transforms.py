"""What happens to a GGUF tensor on its way to the transformers parameter (and back, for the writer).

llama.cpp stores a few tensors differently from transformers:

- llama Q/K projections: `convert_hf_to_gguf.py` reorders the rows of each head from transformers' "two
  halves" RoPE layout to ggml's interleaved one. Undoing that only moves whole rows, so a loader can apply
  it to packed quantized rows (`blocks[perm]`) without dequantizing: `row_permutation` gives the index.
- Gemma RMSNorm weights are stored as `w + 1` (transformers adds the 1 at run time). Norms are F32 in
  files, so this one is applied to floats.

Every transform knows its inverse, which the GGUF writer applies before encoding.
"""
from __future__ import annotations

import torch

from ..errors import ShapeMismatchError


class Transform:
    """A change applied to a tensor in torch order (rows = dim 0)."""

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def row_permutation(self, n_rows: int) -> torch.Tensor | None:
        """The index `perm` with `apply(t) == t[perm]` when this transform only reorders rows; else None."""
        return None

    def inverse(self) -> "Transform":
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _RowPermutation(Transform):
    def apply(self, t: torch.Tensor) -> torch.Tensor:
        perm = self.row_permutation(t.shape[0])
        return t.index_select(0, perm.to(t.device))


def _check_head_rows(n_rows: int, n_head: int) -> None:
    if n_head <= 0 or n_rows % (2 * n_head):
        raise ShapeMismatchError(f"cannot split {n_rows} rows into {n_head} RoPE heads of two halves: "
                                 f"expected a multiple of {2 * n_head} rows")


class RopeUnpermute(_RowPermutation):
    """GGUF -> transformers for llama `attn_q`/`attn_k` (weights and biases): the inverse of
    llama.cpp's `permute()`; `n_head` is the head count of that projection (kv heads for k)."""

    def __init__(self, n_head: int):
        self.n_head = int(n_head)

    def row_permutation(self, n_rows: int) -> torch.Tensor:
        _check_head_rows(n_rows, self.n_head)
        half = n_rows // self.n_head // 2
        # gguf row (h, j, i) holds transformers row (h, i, j): gather transformers order from gguf rows
        return torch.arange(n_rows).reshape(self.n_head, half, 2).transpose(1, 2).reshape(-1)

    def inverse(self) -> "RopePermute":
        return RopePermute(self.n_head)


class RopePermute(_RowPermutation):
    """transformers -> GGUF: llama.cpp's `permute(w, n_head, n_head_kv)` in `convert_hf_to_gguf.py`."""

    def __init__(self, n_head: int):
        self.n_head = int(n_head)

    def row_permutation(self, n_rows: int) -> torch.Tensor:
        _check_head_rows(n_rows, self.n_head)
        half = n_rows // self.n_head // 2
        return torch.arange(n_rows).reshape(self.n_head, 2, half).transpose(1, 2).reshape(-1)

    def inverse(self) -> RopeUnpermute:
        return RopeUnpermute(self.n_head)


class AddScalar(Transform):
    """`t + value`, computed in float32 and returned in the input dtype (Gemma norms: -1 on load,
    +1 on save). Apply it to the file's float32 values to match transformers bit for bit."""

    def __init__(self, value: float):
        self.value = float(value)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 or t.dtype == torch.float64:
            return t + self.value
        return (t.float() + self.value).to(t.dtype)

    def inverse(self) -> "AddScalar":
        return AddScalar(-self.value)
