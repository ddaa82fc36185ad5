"""Modules that compute with quantized weights."""
from .modules import QEmbedding, QLinear, qtensors_of  # noqa: F401
