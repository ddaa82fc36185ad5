"""Write a model as a GGUF file llama.cpp loads: `save_gguf(model, "out.gguf", quantize="q8_0")`.

What goes in, following llama.cpp's convert_hf_to_gguf.py for the requested file type:
- every 2-D+ `.weight` (token embedding and output included) in the requested type, or F16 when its
  row length ne0 is not a multiple of the type's block size (convert's QuantError fallback);
- 1-D tensors, `*_norm.weight` and anything else in F32 (llama.cpp only quantizes matrices);
- the transformers -> GGUF names and inverse transforms of architectures/ (llama q/k row permutation,
  Gemma norm +1), `rope_freqs`-style extra tensors first, then the model's parameters in its order
  (token_embd, blk.0 .. blk.N-1, output_norm, output);
- `general.*` (architecture, type, name, file_type, quantization_version 2, alignment when not 32),
  the `{arch}.*` hyperparameters, and the tokenizer's `tokenizer.*` keys.

A weight already held as GGUF blocks of the requested type is copied (rows re-permuted when the name
map says so), never requantized. Anything else is dequantized/cast to float32 one tensor at a time and
quantized with the GGUF schemes, which write gguf-py's quantize() bytes.

Streaming: the header (tensor infos, offsets) is computed from shapes and types alone, then each tensor
is produced, written and dropped in turn, so at most one tensor's float copy exists. The file is
written to a hidden temporary name beside the target (`.out.gguf.quantload-tmp-<pid>-<rand>`, which no
loader picks up and the next save removes if a crash left it), synced, and renamed over it when complete.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ShapeMismatchError, UnsupportedError, WriteError
from ..ggml_types import GGML_TYPES, row_bytes
from ..schemes.base import QTensor
from .gguf_format import DEFAULT_ALIGNMENT, align_offset, check_alignment, encode_header, encode_tensor_info
from .staging import fsync_dir, make_parent, remove_leftovers, step, temp_name, writing

F32, F16, BF16 = 0, 1, 30
GGML_QNT_VERSION = 2

#: `quantize=` name -> (general.file_type (LlamaFileType), ggml type of the quantized matrices)
FILE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (0, F32), "f16": (1, F16), "bf16": (32, BF16), "q8_0": (7, 8),
    "q4_0": (2, 2), "q4_1": (3, 3), "q5_0": (8, 6), "q5_1": (9, 7),
}
#: general.* keys the writer sets itself; the rest of a GGUF-born model's general.* is carried over
_OWN_GENERAL = {"general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment"}


@dataclass
class PlannedTensor:
    """One tensor of the output: where it goes and how to make its bytes when its turn comes."""
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int
    produce: Callable[[], torch.Tensor]     # -> uint8 tensor of nbytes (any device)


def file_type_of(quantize: str | None) -> tuple[int, int]:
    key = (quantize or "q8_0").lower()
    if key not in FILE_TYPES:
        raise UnsupportedError(f"cannot write GGUF as {quantize!r}; supported: {', '.join(FILE_TYPES)}",
                               key="quantize")
    return FILE_TYPES[key]


def tensor_type(name: str, shape: tuple[int, ...], requested: int) -> int:
    """convert_hf_to_gguf's choice: matrices in the requested type (F16 when rows don't split into
    whole blocks), 1-D tensors, norms and non-weights in F32."""
    if requested == F32 or len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return F32
    if shape[-1] % GGML_TYPES[requested].block_size:
        return F16
    return requested


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    return math.prod(shape[:-1]) * row_bytes(ggml_type, shape[-1])


def model_weights(model: nn.Module) -> dict[str, torch.Tensor | QTensor]:
    """Every parameter by its state-dict name, quantized modules' weights as their QTensor (references
    only: nothing is copied or dequantized here)."""
    from ..runtime.modules import _QModule
    out: dict[str, torch.Tensor | QTensor] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, _QModule) and mod.qweight is not None:
            out[prefix + "weight"] = mod.qweight
        for pname, p in mod.named_parameters(recurse=False):
            out.setdefault(prefix + pname, p)
    return out


def _float32(weight, name: str) -> torch.Tensor:
    if weight.is_meta:
        raise ConfigError("cannot save: the weight is still on the meta device (offloaded or not loaded)",
                          key=name)
    if isinstance(weight, QTensor):
        return weight.dequantize(torch.float32)
    return weight.detach().float()


def _producer(weight, transform, gguf_name: str, ggml_type: int, hf_name: str) -> Callable[[], torch.Tensor]:
    from ..schemes.gguf import GGUFScheme, gguf_scheme
    from ..schemes.gguf.scheme import model_blocks

    if (isinstance(weight, QTensor) and isinstance(weight.scheme, GGUFScheme)
            and weight.scheme.type_id == ggml_type):
        perm = None
        if transform is not None:
            perm = transform.row_permutation(weight.data["blocks"].shape[0])
        if transform is None or perm is not None:
            def copy_blocks():
                if weight.is_meta:
                    raise ConfigError("cannot save: the weight is still on the meta device", key=hf_name)
                blocks = model_blocks(weight)
                return blocks.index_select(0, perm.to(blocks.device)) if perm is not None else blocks
            return copy_blocks

    def quantize():
        w = _float32(weight, hf_name)
        if transform is not None:
            w = transform.apply(w)
        return gguf_scheme(ggml_type).encode(gguf_scheme(ggml_type).quantize(w))["weight"]
    return quantize


def plan_tensors(model: nn.Module, config, requested: int) -> tuple[str, dict[str, Any], list[PlannedTensor]]:
    """The architecture, its metadata fields and the output tensors in file order."""
    from ..architectures import gguf_extra_tensors, hf_to_gguf
    weights = model_weights(model)
    arch, fields, names = hf_to_gguf(config, weights)
    planned: list[PlannedTensor] = []

    def add(gguf_name, shape, make_for_type):
        t = tensor_type(gguf_name, shape, requested)
        planned.append(PlannedTensor(gguf_name, shape, t, tensor_nbytes(shape, t), make_for_type(t)))

    for gguf_name, t in gguf_extra_tensors(config).items():
        add(gguf_name, tuple(t.shape), lambda ty, t=t, n=gguf_name: _producer(t, None, n, ty, n))
    for hf_name, (gguf_name, transform) in names.items():
        w = weights[hf_name]
        add(gguf_name, tuple(int(d) for d in w.shape),
            lambda ty, w=w, tr=transform, g=gguf_name, h=hf_name: _producer(w, tr, g, ty, h))
    return arch, fields, planned


# GGUF value type id -> numpy scalar type, to give carried-over scalars back their type
_SCALAR_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 10: np.uint64, 11: np.int64, 12: np.float64}


def _retyped(value: Any, value_type: int | None) -> Any:
    """A scalar read from a GGUF (a plain Python int/float) with its GGUF type again: the file's own
    type when the loader kept it, else llama.cpp's convention (non-negative ints are UINT32: token
    ids, counts; floats FLOAT32)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if value_type in _SCALAR_TYPES:
        return _SCALAR_TYPES[value_type](value)
    if isinstance(value, float):
        return np.float32(value)
    return np.uint32(value) if 0 <= value < 2**32 else value


def _source_fields(model: nn.Module) -> dict[str, Any]:
    """The key-values of the GGUF the model was loaded from (none for other models), typed."""
    fields = getattr(model, "gguf_fields", None) or {}
    types = getattr(model, "gguf_field_types", None) or {}
    return {k: _retyped(v, types.get(k)) for k, v in fields.items()}


def gguf_metadata(model: nn.Module, arch_fields: dict[str, Any], file_type: int, alignment: int,
                  tokenizer) -> dict[str, Any]:
    """general.*, then {arch}.*, then tokenizer.* (from `tokenizer`, else the GGUF the model came from)."""
    from ..gguf_tokenizer import tokenizer_fields
    source_fields = _source_fields(model)
    fields: dict[str, Any] = {"general.architecture": arch_fields["general.architecture"],
                              "general.type": "model"}
    for k, v in source_fields.items():
        if k.startswith("general.") and k not in _OWN_GENERAL:
            fields[k] = v
    if "general.name" not in fields:
        name = os.path.basename(str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").rstrip("/"))
        if name:
            fields["general.name"] = name
    fields.update((k, v) for k, v in arch_fields.items() if k != "general.architecture")
    fields["general.file_type"] = np.uint32(file_type)
    fields["general.quantization_version"] = np.uint32(GGML_QNT_VERSION)
    if alignment != DEFAULT_ALIGNMENT:
        fields["general.alignment"] = np.uint32(alignment)
    if tokenizer is not None:
        fields.update(tokenizer_fields(tokenizer))
    else:
        fields.update((k, v) for k, v in source_fields.items() if k.startswith("tokenizer."))
    return fields


def save_gguf(model: nn.Module, path, *, tokenizer=None, quantize: str | None = "q8_0",
              alignment: int = DEFAULT_ALIGNMENT, **_) -> list[str]:
    """Write `model` (a transformers causal LM of a mapped architecture, plain or quantload-quantized)
    as one GGUF v3 file at `path`; returns [path]. `quantize`: q8_0, q4_0, q4_1, q5_0, q5_1, f16,
    bf16 or f32 (what the matrices become; see the module docstring)."""
    path = os.fspath(path)
    file_type, requested = file_type_of(quantize)
    alignment = check_alignment(alignment)
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("cannot write GGUF: the model has no transformers config", key="config")
    arch, arch_fields, planned = plan_tensors(model, config, requested)
    fields = gguf_metadata(model, arch_fields, file_type, alignment, tokenizer)

    infos, offset = [], 0
    for t in planned:
        infos.append(encode_tensor_info(t.name, t.shape, t.ggml_type, offset))
        offset += align_offset(t.nbytes, alignment)
    header = encode_header(fields, infos, alignment)

    d = os.path.dirname(os.path.abspath(path))
    with writing(path):
        if os.path.isdir(path):
            raise WriteError("is a directory; a GGUF is written as one file", file=path)
        make_parent(path)
        remove_leftovers(d, os.path.basename(path))
        tmp = os.path.join(d, temp_name(os.path.basename(path)))
        # a plain create: the user's umask gives the mode (mkstemp made it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    step("staged")
    try:
        with writing(path), os.fdopen(fd, "wb") as f:
            f.write(header)
            for t in planned:
                data = t.produce()
                if data.dtype != torch.uint8 or data.numel() != t.nbytes:
                    raise ShapeMismatchError(
                        f"{GGML_TYPES[t.ggml_type].name} data of {data.numel()} {data.dtype} elements, "
                        f"expected {t.nbytes} bytes for shape {t.shape}", file=path, key=t.name)
                f.write(data.detach().contiguous().reshape(-1).cpu().numpy().data)
                del data
                f.write(b"\0" * (align_offset(t.nbytes, alignment) - t.nbytes))
                step(f"wrote {t.name}")
            f.flush()
            os.fsync(f.fileno())
        step("before-switch")
        with writing(path):
            os.replace(tmp, path)
        fsync_dir(d)
        step("switched")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return [path]
