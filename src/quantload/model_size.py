"""Parameter counts and memory footprints that see quantized weights.

transformers' `num_parameters()` and `get_memory_footprint()` walk `model.parameters()`, which do not hold
a QLinear's packed weight (it lives in a QTensor): for a 135M-parameter NF4 model they say 28.3M / 56.7 MB.
These count each quantized weight by its logical shape and its real bytes (codes, scales and any repacked
kernel copy), each shared weight once, and are bound onto loaded models under transformers' names.
"""
from __future__ import annotations

import types

from torch import nn

from .runtime.modules import QEmbedding, _QModule


def _qweights(model: nn.Module, exclude_embeddings: bool = False):
    """Each distinct quantized weight of `model` once (a tied head shares its table's QTensor)."""
    seen = set()
    for _, mod in model.named_modules():
        if not isinstance(mod, _QModule) or mod.qweight is None:
            continue
        if exclude_embeddings and isinstance(mod, QEmbedding):
            continue
        if id(mod.qweight.data) in seen:
            continue
        seen.add(id(mod.qweight.data))
        yield mod.qweight


def num_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """Logical parameter count: a quantized [576, 576] weight counts 331,776 whatever its packing.
    Quantized weights are never trainable."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    total = sum(p.numel() for p in model.parameters()
                if id(p) not in emb and (p.requires_grad or not only_trainable))
    if not only_trainable:
        total += sum(qt.numel() for qt in _qweights(model, exclude_embeddings))
    return total


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes the model's weights occupy: parameters, buffers (optional) and every quantized weight's
    packed data, metadata and fast-kernel copy."""
    mem = sum(p.numel() * p.element_size() for p in model.parameters())
    if return_buffers:
        mem += sum(b.numel() * b.element_size() for b in model.buffers())
    return mem + sum(qt.nbytes for qt in _qweights(model))


def attach_size_methods(model: nn.Module) -> nn.Module:
    """Bind `num_parameters` / `get_memory_footprint` (transformers' names and signatures) on `model`."""
    model.num_parameters = types.MethodType(num_parameters, model)
    model.get_memory_footprint = types.MethodType(memory_footprint, model)
    return model
