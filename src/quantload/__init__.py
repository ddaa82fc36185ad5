"""quantload: load quantized weights into PyTorch models, keeping them quantized.

    model = quantload.load("path/to/checkpoint", quantize="nf4")
    tok = quantload.load_tokenizer("path/to/checkpoint")
"""
from .api import inspect, load, load_tokenizer, plan, read_state_dict, save  # noqa: F401
from .config import QuantSpec, short_names  # noqa: F401
from .errors import (ConfigError, FileFormatError, MissingTensorError, PlacementError,  # noqa: F401
                     QuantloadError, QuantStateError, ShapeMismatchError, UnsupportedError)
from .errors import WriteError  # noqa: F401
from .report import KernelChoice, LoadReport  # noqa: F401
from .runtime.kernels import exact_enabled, set_exact  # noqa: F401  (the fast/exact switch: docs/kernels.md)
from .runtime.modules import QEmbedding, QLinear  # noqa: F401
from .schemes.base import QTensor, Scheme  # noqa: F401

__version__ = "0.1.0"
from .quantize_model import quantize_  # noqa: F401,E402
from .scheme_fit import QuantloadWarning  # noqa: F401,E402


def __getattr__(name):
    # transformers is imported only when its integration is asked for (it costs ~1 s at import)
    if name in ("QuantloadConfig", "QuantloadHfQuantizer"):
        from .integrations import transformers as _tf
        return getattr(_tf, name)
    raise AttributeError(f"module 'quantload' has no attribute {name!r}")
