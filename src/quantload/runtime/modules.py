"""QLinear and QEmbedding: nn.Modules whose weight is a QTensor.

The QTensor's tensors move with the module (`.to`, `.cuda`) but keep their storage dtypes (a float
cast of the model never touches packed codes or scales). `state_dict()` emits the scheme's encoded
pieces under the checkpoint's own key names, so saving a model writes the ecosystem's layout.
"""
from __future__ import annotations

import torch
from torch import nn

from ..schemes.base import QTensor, Scheme


class _QModule(nn.Module):
    """Shared plumbing: a QTensor in `self.qweight`, moved by `_apply`, encoded by `state_dict`."""

    qweight: QTensor | None

    def _init_q(self, scheme: Scheme, shape, dtype):
        self.scheme = scheme
        self.qweight = None
        self._logical_shape = torch.Size(shape)
        self._logical_dtype = dtype

    def set_qweight(self, qt: QTensor) -> None:
        self.qweight = qt
        self.scheme = qt.scheme

    @property
    def weight(self):
        """The quantized weight (a QTensor: .shape, .dtype, .device, .dequantize())."""
        return self.qweight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.qweight is not None:
            data = {}
            for k, t in self.qweight.data.items():
                moved = fn(t)
                # keep storage dtypes: a float cast of the model must not touch codes or scales
                data[k] = moved if moved.dtype == t.dtype else t.to(moved.device)
            self.qweight = QTensor(self.qweight.scheme, data, self.qweight.shape, self.qweight.dtype,
                                   self.qweight.meta)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is not None:
            for suffix, t in self.qweight.encode().items():
                destination[prefix + suffix] = t if keep_vars else t.detach()

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return self.qweight.dequantize(dtype)


class QLinear(_QModule):
    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_q(scheme, (out_features, in_features), dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, mod: nn.Linear, scheme: Scheme, dtype: torch.dtype) -> "QLinear":
        return cls(mod.in_features, mod.out_features, mod.bias is not None, scheme, dtype=dtype,
                   device=mod.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.scheme.linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme.name}")


class QEmbedding(_QModule):
    """An embedding table kept quantized; a lookup dequantizes only what the scheme needs (GGUF: the rows)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, padding_idx=None,
                 dtype: torch.dtype = torch.float32, embed_scale: torch.Tensor | float | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self._init_q(scheme, (num_embeddings, embedding_dim), dtype)
        # scaled embeddings (Gemma multiplies by sqrt(hidden)); kept so replacing the module keeps behaviour
        if isinstance(embed_scale, torch.Tensor):
            self.register_buffer("embed_scale", embed_scale.clone(), persistent=False)
        else:
            self.embed_scale = embed_scale

    @classmethod
    def from_embedding(cls, mod: nn.Embedding, scheme: Scheme, dtype: torch.dtype) -> "QEmbedding":
        scale = getattr(mod, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.is_meta:
            scale = None
        if getattr(scheme, "applies_embed_scale", False):
            scale = None  # the scheme scales its rows as its own tool does (gemma_quant: by a Python float)
        return cls(mod.num_embeddings, mod.embedding_dim, scheme, mod.padding_idx, dtype, scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.qweight.scheme.embedding(ids, self.qweight, self._logical_dtype)
        if self.embed_scale is not None:
            scale = self.embed_scale
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


def qtensors_of(model: nn.Module):
    """(module name, module) for every quantized module of a model."""
    for name, mod in model.named_modules():
        if isinstance(mod, _QModule):
            yield name, mod
