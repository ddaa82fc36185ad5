"""transformers' BitsAndBytesConfig dict -> BnbSpec (docs/formats.md §1.6, §2).

Parses what `BitsAndBytesConfig(...).to_dict()` writes into config.json (and the subset users type), and
renders it back in exactly that form. The scheme is Bnb4Scheme or Bnb8Scheme; modules in
llm_int8_skip_modules (default: lm_head) stay dense.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import QuantSpec, parse_dtype
from ..errors import ConfigError, UnsupportedError
from .bnb4 import QUANT_TYPES, Bnb4Scheme
from .bnb8 import Bnb8Scheme
from .registry import register_method

# transformers accepts these names for bnb_4bit_quant_storage
_STORAGE = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8, "uint8": torch.uint8,
            "float64": torch.float64, "bfloat16": torch.bfloat16}
_BOOL_FIELDS = ("llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant")


class BnbSpec(QuantSpec):
    """A bitsandbytes config: 4-bit (NF4/FP4, optional double quant) or LLM.int8."""

    method = "bitsandbytes"

    def __init__(self, *, load_in_4bit: bool, load_in_8bit: bool, quant_type: str = "fp4",
                 double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                 quant_storage: torch.dtype = torch.uint8, threshold: float = 6.0, skip_modules=None,
                 enable_fp32_cpu_offload: bool = False, has_fp16_weight: bool = False):
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both true; a bitsandbytes config picks one")
        if not (load_in_4bit or load_in_8bit):
            raise ConfigError("bitsandbytes config with neither load_in_4bit nor load_in_8bit true quantizes nothing")
        if load_in_4bit:
            scheme = Bnb4Scheme(quant_type, 64, double_quant, compute_dtype, quant_storage)
        else:
            scheme = Bnb8Scheme(threshold, has_fp16_weight)
        self.load_in_4bit, self.load_in_8bit = load_in_4bit, load_in_8bit
        self.quant_type, self.double_quant = quant_type, double_quant
        self.quant_storage, self.threshold = quant_storage, threshold
        self.llm_int8_skip_modules = list(skip_modules) if skip_modules is not None else None
        self.enable_fp32_cpu_offload, self.has_fp16_weight = enable_fp32_cpu_offload, has_fp16_weight
        super().__init__(scheme, skip_modules=self.llm_int8_skip_modules or ["lm_head"], compute_dtype=compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Exactly `transformers.BitsAndBytesConfig(...).to_dict()`: same keys, order and values."""
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.threshold,
            "llm_int8_skip_modules": None if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.has_fp16_weight,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.compute_dtype).split(".")[1],
            "bnb_4bit_quant_storage": str(self.quant_storage).split(".")[1],
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }


def _flag(d: dict, name: str) -> bool:
    """load_in_4bit / load_in_8bit, also read from transformers' private `_load_in_*` copies."""
    public, private = d.get(name), d.get("_" + name)
    if public is not None and private is not None and public != private:
        raise ConfigError(f"{name}={public!r} contradicts _{name}={private!r}")
    value = public if public is not None else private
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a boolean")
    return value


def _storage(v) -> torch.dtype:
    if v is None:
        return torch.uint8
    if isinstance(v, torch.dtype) and v in _STORAGE.values():
        return v
    if isinstance(v, str) and v.removeprefix("torch.") in _STORAGE:
        return _STORAGE[v.removeprefix("torch.")]
    raise ConfigError(f"bnb_4bit_quant_storage={v!r}; expected one of {sorted(_STORAGE)}")


@register_method("bitsandbytes")
def parse_bnb_config(d: dict) -> BnbSpec:
    """A BitsAndBytesConfig dict (config.json form or user kwargs) -> BnbSpec. Unknown keys are ignored,
    as transformers does."""
    load_in_4bit, load_in_8bit = _flag(d, "load_in_4bit"), _flag(d, "load_in_8bit")
    for name in _BOOL_FIELDS:
        if not isinstance(d.get(name, False), bool):
            raise ConfigError(f"{name}={d[name]!r} must be a boolean")
    quant_type = d.get("bnb_4bit_quant_type", "fp4")
    if not isinstance(quant_type, str):
        raise ConfigError(f"bnb_4bit_quant_type={quant_type!r} must be a string")
    if load_in_4bit and quant_type not in QUANT_TYPES:
        raise UnsupportedError(f"bnb_4bit_quant_type={quant_type!r} is not supported; expected one of "
                               f"{list(QUANT_TYPES)}")
    threshold = d.get("llm_int8_threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(f"llm_int8_threshold={threshold!r} must be a number")
    skip = d.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise ConfigError(f"llm_int8_skip_modules={skip!r} must be a list of module names")
    compute = d.get("bnb_4bit_compute_dtype")
    compute = torch.float32 if compute is None else parse_dtype(compute, what="bnb_4bit_compute_dtype")
    return BnbSpec(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, quant_type=quant_type,
                   double_quant=d.get("bnb_4bit_use_double_quant", False), compute_dtype=compute or torch.float32,
                   quant_storage=_storage(d.get("bnb_4bit_quant_storage")), threshold=float(threshold),
                   skip_modules=skip, enable_fp32_cpu_offload=d.get("llm_int8_enable_fp32_cpu_offload", False),
                   has_fp16_weight=d.get("llm_int8_has_fp16_weight", False))
