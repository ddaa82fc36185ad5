"""quantload: load quantized weights into PyTorch models."""
from .errors import (ConfigError, FileFormatError, MissingTensorError, PlacementError,  # noqa: F401
                     QuantloadError, QuantStateError, ShapeMismatchError, UnsupportedError)

__version__ = "0.1.0"
