"""The shared machinery: typed access to GGUF metadata, the result types, and the family interface.

A *family* (llama.py, qwen.py, gemma.py, phi3.py) knows, for the GGUF architectures it covers, how to
build the transformers config from the metadata and which GGUF tensor feeds which parameter (with the
shape that parameter must have, and the transform on the way). `gguf_to_hf` and `hf_to_gguf` in
`__init__.py` drive those two answers in both directions.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import FileFormatError, UnsupportedError
from ..sources.gguf_strings import StringArray
from .transforms import Transform


class UnsupportedArchitecture(UnsupportedError):
    """A GGUF `general.architecture` (or a transformers model_type) we do not map yet."""


class ParamRef(NamedTuple):
    gguf_name: str
    transform: Transform | None
    shape: tuple[int, ...]      # the transformers parameter's shape (torch order; also the GGUF tensor's)


@dataclass
class GGUFModelMap:
    arch: str                                # general.architecture
    config: Any                              # a transformers PretrainedConfig
    params: dict[str, ParamRef]              # hf parameter name -> where it comes from
    tied: bool                               # lm_head shares the embedding (no entry for it in params)
    unused: list[str] = field(default_factory=list)   # GGUF tensors no parameter reads (e.g. rope_freqs,
                                                       # whose content went into the config)
    eos_token_ids: list[int] = field(default_factory=list)  # eos plus eot/eom, for a generation config
    consumed: list[str] = field(default_factory=list)   # GGUF tensors read into the config (rope_freqs)
    # the family's change to the freshly built model before weights load (GPT-2's Conv1D -> nn.Linear), or None
    adapt: Callable[[Any], None] | None = None


class TensorRule(NamedTuple):
    gguf: str
    hf: str
    shape: tuple[int, ...]
    transform: Transform | None = None


def tensor_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` from `{name: (shape, ggml_type)}` or from objects with a `.shape` (TensorInfo)."""
    out = {}
    for name, v in tensors.items():
        shape = v.shape if hasattr(v, "shape") else v[0]
        out[name] = tuple(int(d) for d in shape)
    return out


class Metadata:
    """Typed reads of GGUF key-values, raising FileFormatError with the key on anything unexpected.

    `arch_*` methods take the part after `{arch}.`, e.g. `meta.arch_int("block_count")`.
    """

    _MISSING = object()

    def __init__(self, fields: Mapping[str, Any], arch: str, file: str | None = None):
        self.fields = fields
        self.arch = arch
        self.file = file

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def _raw(self, key: str, default: Any):
        if key in self.fields:
            return self.fields[key]
        if default is self._MISSING:
            raise FileFormatError(f"required metadata key is missing (the {self.arch} config needs it)",
                                  file=self.file, key=key)
        return default

    def _bad(self, key: str, expected: str, value: Any):
        shown = repr(value) if not isinstance(value, (list, np.ndarray, StringArray)) else f"an array of {len(value)}"
        return FileFormatError(f"expected {expected}, found {shown}", file=self.file, key=key)

    def _uniform(self, key: str, value: Any):
        """Per-layer arrays (some files write head counts per layer) are accepted when all equal."""
        if isinstance(value, (list, tuple, np.ndarray)):
            values = np.asarray(value).reshape(-1)
            if values.size == 0:
                raise self._bad(key, "a number", value)
            if not (values == values[0]).all():
                raise UnsupportedError(f"per-layer values differ ({values.tolist()[:8]}...); "
                                       "only uniform layers are supported", file=self.file, key=key)
            return values[0].item()
        return value

    def int(self, key: str, default: Any = _MISSING) -> int:
        value = self._uniform(key, self._raw(key, default))
        if value is default and default is not self._MISSING:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self._bad(key, "an integer", value)
        if value < 0:
            raise self._bad(key, "a non-negative integer", value)
        return int(value)

    def float(self, key: str, default: Any = _MISSING) -> float:
        value = self._uniform(key, self._raw(key, default))
        if value is default and default is not self._MISSING:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._bad(key, "a number", value)
        if not math.isfinite(float(value)):
            raise self._bad(key, "a finite number", value)
        return float(value)

    def str(self, key: str, default: Any = _MISSING) -> str:
        value = self._raw(key, default)
        if value is default and default is not self._MISSING:
            return value
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def arch_int(self, suffix: str, default: Any = _MISSING) -> int:
        return self.int(f"{self.arch}.{suffix}", default)

    def arch_float(self, suffix: str, default: Any = _MISSING) -> float:
        return self.float(f"{self.arch}.{suffix}", default)

    def arch_str(self, suffix: str, default: Any = _MISSING) -> str:
        return self.str(f"{self.arch}.{suffix}", default)


ReadTensor = Callable[[str], torch.Tensor]

#: transformers config attribute -> the GGUF key (after `{arch}.`) it comes from, longest names first so
#: "num_key_value_heads" is found before "num_attention_heads" in an error message
_CONFIG_KEYS = {"original_max_position_embeddings": "rope.scaling.original_context_length",
                "max_position_embeddings": "context_length", "num_key_value_heads": "attention.head_count_kv",
                "num_attention_heads": "attention.head_count", "num_hidden_layers": "block_count",
                "intermediate_size": "feed_forward_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
                "hidden size": "embedding_length", "hidden_size": "embedding_length",
                "attention heads": "attention.head_count", "head_dim": "attention.key_length",
                "vocab_size": "vocab_size", "rope_theta": "rope.freq_base", "factor": "rope.scaling.factor",
                "rope": "rope.scaling.type"}


def config_rejected(e: Exception, arch: str, file) -> FileFormatError:
    """transformers refused the config the metadata describes: a FileFormatError naming the GGUF key the
    refused value most likely came from (the attribute its message names), and what transformers said."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    said = " ".join(lines[-2:])[:300] if lines else ""
    suffix = next((v for k, v in _CONFIG_KEYS.items() if k in text), None)
    key = f"{arch}.{suffix}" if suffix else "general.architecture"
    return FileFormatError(f"transformers rejects the {arch} config this metadata describes "
                           f"({type(e).__name__}: {said}); expected values transformers accepts", file=file, key=key)


class Family:
    """One model family: its GGUF architectures, its transformers model types, and both directions."""

    gguf_archs: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    def config_from_gguf(self, meta: Metadata, shapes: dict[str, tuple[int, ...]],
                         read_tensor: ReadTensor | None) -> tuple[Any, list[str]]:
        """The transformers config, and the GGUF tensors consumed into it (not parameters)."""
        raise NotImplementedError

    def rules(self, config) -> list[TensorRule]:
        """Every parameter of the model built from `config`, with its GGUF source (lm_head only when
        untied)."""
        raise NotImplementedError

    def gguf_arch_for(self, config) -> str:
        return self.gguf_archs[0]

    def fields_from_config(self, config, arch: str) -> dict[str, Any]:
        raise NotImplementedError

    def extra_tensors(self, config, arch: str) -> dict[str, torch.Tensor]:
        """Non-parameter tensors llama.cpp expects for this config (rope factors)."""
        return {}

    #: `adapt(model)`: changes the built skeleton (meta parameters) so `rules` describe it; None: none needed
    adapt = None


def u32(v) -> np.uint32:
    return np.uint32(int(v))


def f32(v) -> np.float32:
    return np.float32(float(v))


def expand_layers(n_layers: int, per_layer: Iterable[TensorRule]) -> list[TensorRule]:
    """Rules written with `{bid}` in both names, one copy per layer."""
    per_layer = list(per_layer)
    return [TensorRule(r.gguf.format(bid=i), r.hf.format(bid=i), r.shape, r.transform)
            for i in range(n_layers) for r in per_layer]
