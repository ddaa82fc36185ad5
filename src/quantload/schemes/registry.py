"""quant_method -> parser of a transformers-style quantization_config dict into a QuantSpec.

Scheme families register themselves here (see schemes/__init__.py, which imports them all).
"""
from __future__ import annotations

import re
from typing import Callable

from ..errors import ConfigError, QuantloadError, UnsupportedError

_PARSERS: dict[str, Callable[[dict], "object"]] = {}


def register_method(*names: str):
    def deco(fn):
        for n in names:
            _PARSERS[n] = fn
        return fn
    return deco


def spec_from_dict(d: dict, *, file: str | None = None):
    """Parse a transformers-style quantization_config dict (from config.json, quantize_config.json,
    or BitsAndBytesConfig(...).to_dict()) into a QuantSpec."""
    if not isinstance(d, dict):
        raise ConfigError(f"quantization_config must be a dict, got {type(d).__name__}", file=file,
                          key="quantization_config")
    method = d.get("quant_method")
    if method is None and ("load_in_4bit" in d or "load_in_8bit" in d):
        method = "bitsandbytes"
    if method is None:
        raise ConfigError(f"quantization_config has no 'quant_method' (keys: {sorted(d)})", file=file,
                          key="quantization_config.quant_method")
    method = str(getattr(method, "value", method)).lower()  # transformers passes a QuantizationMethod enum
    if method not in _PARSERS:
        raise UnsupportedError(
            f"quant_method {method!r} is not supported; supported: {sorted(_PARSERS)}", file=file,
            key="quantization_config.quant_method")
    try:
        spec = _PARSERS[method](d)
        for name in _PROBE_MODULES:   # patterns are matched lazily: a bad one must fail here, not mid-load
            spec.scheme_for(name, None)
    except QuantloadError as e:
        if e.file is not None or file is None:
            raise
        # the parsers check values, not files: the error names the file the dict came from
        raise type(e)(e.detail, file=file, key=e.key or "quantization_config") from None
    except RecursionError:
        raise ConfigError("quantization_config is nested too deeply", file=file, key="quantization_config") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, re.error) as e:
        # a value of the wrong type deep in the dict (a list where a string goes, "x" for an int...)
        raise ConfigError(f"malformed {method} quantization_config: {type(e).__name__}: {str(e)[:200]}",
                          file=file, key="quantization_config") from None
    return spec


_PROBE_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head")


def known_methods() -> list[str]:
    return sorted(_PARSERS)
