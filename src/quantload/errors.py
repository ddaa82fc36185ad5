"""One error hierarchy for everything quantload refuses.

Every error names where it happened (file, key, byte offset when known), what was found and what was
expected, so a user can act on it without reading our source.
"""
from __future__ import annotations

import os


class QuantloadError(Exception):
    """Base class of every error quantload raises on purpose."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, key: str | None = None,
                 offset: int | None = None):
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        self.offset = offset
        self.detail = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if key is not None:
            where.append(f"key {key!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class FileFormatError(QuantloadError):
    """A file is malformed: truncated, a header that lies, overlapping data, wrong magic, LFS pointer."""


class MissingTensorError(QuantloadError):
    """A tensor the model or a quantized parameter needs is absent (e.g. absmax without its weight)."""


class ShapeMismatchError(QuantloadError):
    """A tensor's shape or dtype disagrees with the model, the config or its companions."""


class QuantStateError(QuantloadError):
    """Quantization metadata is malformed or contradicts itself (quant_state JSON, g_idx, scales...)."""


class UnsupportedError(QuantloadError):
    """A valid input we do not support: unknown quant type, block size, bits, architecture."""


class ConfigError(QuantloadError):
    """A user argument or a config file is invalid."""


class WriteError(QuantloadError):
    """A save could not be written: the target is not a directory (or is one where a file is expected),
    the disk is full, the folder is read-only. The previous checkpoint at the target is left intact."""


class PlacementError(QuantloadError):
    """A device map or memory budget cannot be satisfied."""


class UnexpectedTensorError(QuantloadError):
    """The checkpoint holds tensors the model it declares does not use (load(..., strict=False) drops them)."""
