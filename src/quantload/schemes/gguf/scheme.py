"""GGUFScheme: every ggml block type as a quantload scheme, so a GGUF weight is a QTensor like any other.

A QTensor of this scheme holds the file's bytes untouched, as rows: data["blocks"] is uint8
[rows, row_bytes] with rows = prod(shape[:-1]) and row_bytes = shape[-1] / block_size * type_size. Rows
stay whole, so callers may permute or gather them (llama q/k un-permutation, embedding lookups) without
knowing the block layout. Dequantization is gguf-py's math in float32, then a cast to the asked dtype.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ...errors import MissingTensorError, ShapeMismatchError, UnsupportedError
from ...ggml_types import GGML_TYPES, GGMLType
from ...runtime import kernels
from ..base import QTensor, Scheme
from .dequant import decoder, dequantize_blocks
from .kquants import affine_k
from .legacy import affine_codes
from .quantize import quantize_blocks

#: plain float types whose blocks can be read in place as a torch tensor
_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}

#: qt.meta[ROW_ORDER]: int64 [rows], model row i is data["blocks"] row ROW_ORDER[i]. Set when the model's
#: rows are a permutation of the file's (llama q/k): the blocks stay the file's bytes, untouched in the
#: map, and the permutation is applied to each output instead (a gather of a few hundred values per token).
ROW_ORDER = "row_order"


class GGUFScheme(Scheme):
    """One ggml type. Keys: the tensor itself ("weight" relative to the module prefix)."""

    def __init__(self, t: GGMLType):
        self.ggml = t
        self.type_id = t.id
        self.block_size = t.block_size
        self.type_size = t.type_size
        self.name = "gguf-" + t.name.lower()

    def required_keys(self) -> tuple[str, ...]:
        return ("weight",)

    # --- shapes -----------------------------------------------------------------------------------
    def _rows(self, shape, file=None, key=None) -> tuple[int, int]:
        """(rows, row_bytes) for a logical shape, or ShapeMismatchError."""
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeMismatchError(f"invalid shape {shape}", file=file, key=key)
        ne0 = shape[-1] if shape else 1
        if ne0 % self.block_size:
            raise ShapeMismatchError(
                f"{self.ggml.name} row length {ne0} (shape {shape}) is not a multiple of its block size "
                f"{self.block_size}", file=file, key=key)
        return math.prod(shape[:-1]), ne0 // self.block_size * self.type_size

    def nbytes_for(self, shape, dtype: torch.dtype = torch.float32) -> int:
        rows, row_bytes = self._rows(shape)
        return rows * row_bytes

    # --- decode / encode ----------------------------------------------------------------------------
    def decode(self, pieces, *, shape=None, file=None, prefix="") -> QTensor:
        key = f"{prefix}.weight" if prefix else "weight"
        raw = pieces.get("weight")
        if raw is None:
            raise MissingTensorError(f"no tensor for this {self.ggml.name} weight", file=file, key=key)
        if raw.dtype != torch.uint8:             # a source may hand F32/F16 data typed; take its bytes
            raw = raw.contiguous().view(torch.uint8) if raw.dim() else raw.reshape(1).view(torch.uint8)
        raw = raw.reshape(-1)
        if shape is None:
            if raw.numel() % self.type_size:
                raise ShapeMismatchError(
                    f"{raw.numel()} bytes is not a whole number of {self.type_size}-byte {self.ggml.name} "
                    f"blocks", file=file, key=key)
            shape = (raw.numel() // self.type_size * self.block_size,)
        shape = tuple(int(s) for s in shape)
        rows, row_bytes = self._rows(shape, file, key)
        if raw.numel() != rows * row_bytes:
            raise ShapeMismatchError(
                f"{self.ggml.name} tensor of shape {shape} needs {rows * row_bytes} bytes ({rows} rows of "
                f"{row_bytes}), found {raw.numel()}", file=file, key=key)
        blocks = raw.view(rows, row_bytes)
        return QTensor(self, {"blocks": blocks}, shape, torch.float32, {"ggml_type": self.type_id})

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        """The raw bytes in the model's row order (1-D uint8)."""
        return {"weight": model_blocks(qt).contiguous().reshape(-1)}

    # --- dequantize -----------------------------------------------------------------------------------
    def _read_in_place(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight as a view of its bytes, when it is a plain float type already in `dtype` (no math)."""
        blocks = qt.data["blocks"]
        if (_PLAIN.get(self.type_id) != dtype or blocks.is_meta or not blocks.is_contiguous()
                or ROW_ORDER in qt.meta):
            return None
        if blocks.storage_offset() % blocks.new_empty((), dtype=dtype).element_size():
            return None
        return blocks.view(dtype).view(qt.shape)

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of qt.shape in `dtype` (gguf-py's float32 values, cast)."""
        return dequantize_blocks(self.type_id, model_blocks(qt), dtype).view(qt.shape)

    def linear(self, x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The packed kernel when prepare_runtime made one (runtime/kernels.py); else dequantize per call
        (nothing cached: the weight stays quantized in memory), then matmul."""
        y = kernels.fast_linear(x, qt, bias)
        if y is not None:
            return y
        order = qt.meta.get(ROW_ORDER)
        if order is not None:  # rows in the file's order: compute those outputs, then reorder them
            w = dequantize_blocks(self.type_id, qt.data["blocks"], x.dtype).view(qt.shape)
            y = F.linear(x, w).index_select(-1, order.to(x.device))
            return y + bias.to(x.dtype) if bias is not None else y
        w = self._read_in_place(qt, x.dtype)
        if w is None:
            w = self.dequantize(qt, x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

    def prepare_runtime(self, qt: QTensor) -> QTensor:
        """Every quantized matrix is marked for a packed kernel (runtime/kernels.py), repacked on its
        first forward: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K keep their codes (int4 kernel, group 32);
        the others (Q2_K, Q3_K, Q6_K, the i-quants, ...) are decoded exactly, then requantized to int8
        per row. Plain float types stay as they are. The blocks stay untouched for encode() and
        dequantize()."""
        if self.type_id in _PLAIN:
            return qt
        return kernels.attach_fast(qt, self.affine_weight, self.dense_rows)

    def affine_weight(self, qt: QTensor) -> kernels.AffineWeight:
        """Codes [rows, cols] with one scale and zero (or offset m) per block / 32-element sub-block."""
        if qt.ndim != 2:
            raise kernels.NotEligible(f"{qt.ndim}-d tensor", fallback=False)
        b = model_blocks(qt).reshape(-1, self.type_size)
        rows, cols = qt.shape
        parts = affine_codes(self.type_id, b)
        if parts is not None:
            codes, bits, scale, zero, bias = parts
            group = self.block_size
        else:
            k = affine_k(self.type_id, b)
            if k is None:
                raise kernels.NotEligible(f"{self.ggml.name} blocks are not affine integer codes in groups of 32+")
            codes, bits, scale, bias = k
            zero, group = None, 32
        per_group = [None if t is None else t.reshape(rows, cols // group) for t in (scale, zero, bias)]
        return kernels.AffineWeight(codes.reshape(rows, cols), per_group[0], bits, group,
                                    zero=per_group[1], bias=per_group[2])

    def dense_rows(self, qt: QTensor, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of the exact weight, float32 (the int8 requantization reads them a chunk at a time)."""
        blocks = qt.data["blocks"]
        order = qt.meta.get(ROW_ORDER)
        rows = blocks[r0:r1] if order is None else blocks.index_select(0, order[r0:r1].to(blocks.device))
        return dequantize_blocks(self.type_id, rows, torch.float32)

    def rows_at(self, qt: QTensor, idx: torch.Tensor) -> torch.Tensor:
        """The exact float32 rows `idx` (any order, repeats allowed) of a 2-D weight: [len(idx), cols]."""
        blocks = qt.data["blocks"]
        order = qt.meta.get(ROW_ORDER)
        idx = idx.to(blocks.device)
        if order is not None:
            idx = order.to(blocks.device)[idx]
        return dequantize_blocks(self.type_id, blocks.index_select(0, idx), torch.float32)

    def embedding(self, ids: torch.Tensor, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of a [num_embeddings, dim] table: gathers only the rows' blocks, then dequantizes them."""
        if qt.ndim != 2:
            raise ShapeMismatchError(f"an embedding table must be 2-D, this {self.ggml.name} weight has "
                                     f"shape {tuple(qt.shape)}")
        blocks = qt.data["blocks"]
        flat = ids.reshape(-1).to(blocks.device)
        order = qt.meta.get(ROW_ORDER)
        if order is not None:
            flat = order.to(blocks.device)[flat]
        rows = blocks.index_select(0, flat)
        return dequantize_blocks(self.type_id, rows, dtype).view(*ids.shape, qt.shape[1])

    # --- quantize -------------------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> QTensor:
        """Float weight -> blocks, the bytes gguf-py's quantize() writes (F32, F16, BF16, Q8_0, Q4_0,
        Q4_1, Q5_0, Q5_1)."""
        blocks = quantize_blocks(self.type_id, w)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        return QTensor(self, {"blocks": blocks}, w.shape, dtype, {"ggml_type": self.type_id})

    def __repr__(self) -> str:
        return f"GGUFScheme({self.ggml.name}, block {self.block_size} elems / {self.type_size} bytes)"


def model_blocks(qt: QTensor) -> torch.Tensor:
    """data["blocks"] in the model's row order (a copy only when a ROW_ORDER is set)."""
    blocks = qt.data["blocks"]
    order = qt.meta.get(ROW_ORDER)
    return blocks if order is None else blocks.index_select(0, order.to(blocks.device))


@functools.lru_cache(maxsize=None)
def gguf_scheme(type_id: int) -> GGUFScheme:
    """The (shared) scheme of ggml type `type_id`; UnsupportedError for a type we cannot decode."""
    t = GGML_TYPES.get(int(type_id))
    if t is None:
        raise UnsupportedError(f"unknown ggml type id {type_id} (known ids: {sorted(GGML_TYPES)})")
    decoder(t.id)   # raises UnsupportedError naming the supported types
    return GGUFScheme(t)
