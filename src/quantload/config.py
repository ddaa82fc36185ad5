"""User-facing quantization requests and the QuantSpec: which scheme each module gets.

A QuantSpec is built from a transformers-style quantization_config dict (a checkpoint's config.json,
or what the user passes as `quantize=`), from a short name ("nf4", "fp4", "int8", "int4", ...), or is a
config object of ours. It answers `scheme_for(module_name, module)` and renders itself back to the
transformers dict form for `model.config.quantization_config`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError


def module_matches(name: str, patterns) -> bool:
    """transformers' skip-module rule: a pattern matches a module name equal to it, or one of its
    dotted components, or a dotted prefix/suffix of it ("lm_head", "mlp.down_proj", "model.layers.3")."""
    if not patterns:
        return False
    dotted = "." + name + "."
    for p in patterns:
        if p.startswith("re:"):
            import re
            if re.match(p[3:], name):
                return True
            continue
        if name == p or ("." + p + ".") in dotted:
            return True
    return False


class QuantSpec:
    """Which scheme each module gets. Subclasses (one per family) override `scheme_for` when the
    family has richer targeting (compressed-tensors config_groups, GPTQ dynamic, GGUF per-tensor types)."""

    method: str = "none"

    def __init__(self, scheme=None, *, skip_modules=None, raw: dict | None = None,
                 compute_dtype: torch.dtype | None = None):
        self.scheme = scheme
        self.skip_modules = list(skip_modules) if skip_modules is not None else ["lm_head"]
        self.raw = dict(raw or {})
        self.compute_dtype = compute_dtype

    def scheme_for(self, module_name: str, module: nn.Module | None):
        """The scheme for this module, or None to leave it dense. `module` is None when there is no
        model (read_state_dict): the module is then assumed to be a Linear."""
        if module is not None and not isinstance(module, nn.Linear):
            return None
        if module_matches(module_name, self.skip_modules):
            return None
        return self.scheme

    def to_dict(self) -> dict[str, Any]:
        """The transformers form of this config (what goes into config.json)."""
        return dict(self.raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method}, scheme={self.scheme}, skip={self.skip_modules})"


# short names users type -> transformers-style dicts
_SHORT_NAMES: dict[str, dict] = {
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True},
    "nf4-nodq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                 "bnb_4bit_use_double_quant": False},
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "llm.int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
}


def register_short_name(name: str, config: dict) -> None:
    _SHORT_NAMES[name.lower()] = dict(config)


def short_names() -> list[str]:
    return sorted(_SHORT_NAMES)


def resolve_quantize(quantize, *, file: str | None = None) -> QuantSpec | None:
    """`quantize=` as the user gave it -> QuantSpec (or None for "leave as is")."""
    from .schemes.registry import spec_from_dict
    if quantize is None:
        return None
    if isinstance(quantize, QuantSpec):
        return quantize
    if isinstance(quantize, str):
        key = quantize.lower()
        if key not in _SHORT_NAMES:
            raise ConfigError(f"unknown quantize={quantize!r}; expected one of {short_names()}, "
                              "a quantization_config dict, or a QuantSpec")
        return spec_from_dict(dict(_SHORT_NAMES[key]), file=file)
    if hasattr(quantize, "to_dict") and not isinstance(quantize, dict):
        quantize = quantize.to_dict()
    if isinstance(quantize, dict):
        return spec_from_dict(quantize, file=file)
    raise ConfigError(f"quantize must be None, a name, a dict or a QuantSpec, got {type(quantize).__name__}")


_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def parse_dtype(d, *, what: str = "dtype", file: str | None = None, key: str | None = None) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    if isinstance(d, str):
        s = d.lower().removeprefix("torch.")
        if s in _DTYPES:
            return _DTYPES[s]
        if s == "auto":
            return None
    raise ConfigError(f"{what}={d!r} is not a float dtype; expected one of {sorted(set(_DTYPES))}", file=file,
                      key=key)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_quantize_request(checkpoint: QuantSpec | None, requested: QuantSpec | None, quantize, *,
                           file: str | None = None) -> None:
    """A `quantize=` request on an already quantized checkpoint is accepted only when it asks for what
    the checkpoint holds (same method and scheme: quantize="nf4" on an NF4 checkpoint); anything else
    would either be ignored or re-quantize codes, so it is refused with both named."""
    if checkpoint is None or requested is None:
        return
    def name(spec):
        return getattr(spec.scheme, "name", None)
    if checkpoint.method != requested.method or (name(checkpoint) is not None and name(requested) is not None
                                                 and name(checkpoint) != name(requested)):
        held = f"{checkpoint.method!r}" + (f" ({name(checkpoint)})" if name(checkpoint) else "")
        asked = f"{requested.method!r}" + (f" ({name(requested)})" if name(requested) else "")
        raise ConfigError(f"the checkpoint is already quantized with {held}; quantize={quantize!r} asks for "
                          f"{asked}, which would need a float checkpoint (pass quantize=None to load it as it is)",
                          file=file, key="quantization_config")
