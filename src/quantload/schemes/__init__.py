"""Quantization schemes, one per file. Importing this package registers every family's
quantization_config parser (schemes/registry.py) by importing each module in it."""
import importlib
import pkgutil

from .base import QTensor, Scheme  # noqa: F401
from .registry import known_methods, register_method, spec_from_dict  # noqa: F401

for _m in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
    importlib.import_module(_m.name)
