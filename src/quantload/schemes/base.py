"""The two abstractions every format plugs into: a `Scheme` (how one quantized parameter is stored,
decoded, encoded and computed with) and a `QTensor` (one quantized parameter in memory).

The engine, placement, runtime modules and writers talk to formats only through this file, so a new
format is one new scheme file plus its tests.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


class QTensor:
    """A quantized parameter: packed data and metadata tensors, plus the logical shape and dtype.

    `data` maps a role ("codes", "absmax", "scales", "blocks", ...) to a tensor; `meta` holds the
    non-tensor parameters (quant type, block size, bits...). All tensors of one QTensor live on one device.
    """

    __slots__ = ("scheme", "data", "shape", "dtype", "meta")

    def __init__(self, scheme: "Scheme", data: dict[str, torch.Tensor], shape, dtype: torch.dtype,
                 meta: dict[str, Any] | None = None):
        self.scheme = scheme
        self.data = data
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.meta = dict(meta or {})

    # --- tensor-like surface -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the packed data and every metadata tensor, plus the repacked copy a
        fast kernel keeps beside them (runtime/kernels.py; made on the first fast forward)."""
        fast = self.meta.get("fast")
        return (sum(t.numel() * t.element_size() for t in self.data.values())
                + (fast.nbytes if fast is not None else 0))

    @property
    def is_meta(self) -> bool:
        return any(t.is_meta for t in self.data.values())

    def to(self, device=None, *, non_blocking: bool = False) -> "QTensor":
        if device is None:
            return self
        data = {k: v.to(device, non_blocking=non_blocking) for k, v in self.data.items()}
        return QTensor(self.scheme, data, self.shape, self.dtype, self.meta)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.dequantize(self, dtype or self.dtype)

    def encode(self) -> dict[str, torch.Tensor]:
        return self.scheme.encode(self)

    def __repr__(self) -> str:
        return (f"QTensor({self.scheme.name}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, nbytes={self.nbytes})")


class Scheme:
    """How one kind of quantized parameter is stored and used.

    Keys are suffixes relative to the owning module's prefix: for a bitsandbytes NF4 Linear at
    "model.layers.0.mlp.down_proj" the pieces are "weight", "weight.absmax", "weight.quant_map", ...;
    for GPTQ they are "qweight", "qzeros", "scales", "g_idx".
    A scheme instance carries the parameters of one configuration (bits, group size, ...); per-layer
    facts read from the file (e.g. the bnb quant_state JSON) go into `QTensor.meta`.
    """

    name: str = "abstract"
    #: the module parameter this scheme produces
    param_name: str = "weight"

    # --- which checkpoint keys make one parameter ---------------------------------------------
    def required_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def optional_keys(self) -> tuple[str, ...]:
        return ()

    def present(self, suffixes: set[str]) -> bool:
        """Whether a checkpoint module with these key suffixes stores this scheme's pieces (a module
        with only a plain float `weight` is a dense layer even in a quantized checkpoint)."""
        return all(s in suffixes for s in self.required_keys())

    def keys(self, prefix: str) -> list[str]:
        """Full checkpoint keys (required, then optional) for the module at `prefix`."""
        sep = prefix + "." if prefix else ""
        return [sep + s for s in (*self.required_keys(), *self.optional_keys())]

    # --- the four operations -------------------------------------------------------------------
    def decode(self, pieces: dict[str, torch.Tensor], *, shape=None, file: str | None = None,
               prefix: str = "") -> QTensor:
        """Build a QTensor from the checkpoint pieces (keyed by suffix). `shape` is the logical shape the
        model expects, when known; a mismatch must raise ShapeMismatchError naming file and key."""
        raise NotImplementedError

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        """The inverse of decode: suffix -> tensor, exactly as the defining tool writes them."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Quantize a float weight (on its device) with this scheme's parameters."""
        raise NotImplementedError

    def dequantize(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # --- runtime ----------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W^T + b. Baseline: dequantize to x's dtype, then matmul. Schemes override with
        faster kernels."""
        w = qt.dequantize(x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

    def embedding(self, ids: torch.Tensor, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of a quantized embedding table. Baseline dequantizes the whole table; row-blocked
        schemes (GGUF) override to dequantize only the rows asked for."""
        return F.embedding(ids, qt.dequantize(dtype))

    def prepare_runtime(self, qt: QTensor) -> QTensor:
        """Called once after load on the final device: a scheme may repack into a faster layout.
        Must keep `encode` working (keep or rebuild what it needs)."""
        return qt

    # --- planning ---------------------------------------------------------------------------------
    def nbytes_for(self, shape, dtype: torch.dtype) -> int:
        """Bytes one parameter of this logical shape occupies once decoded, without loading it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
