"""Checkpoint containers: safetensors (single or sharded), PyTorch .bin/.pt, GGUF."""
from __future__ import annotations

from .base import Source, TensorInfo  # noqa: F401
from .files import LFS_MAGIC, check_not_lfs_pointer, find_weight_files, require_regular_file  # noqa: F401



def open_source(path) -> Source:
    """Open a checkpoint file or directory lazily (headers only, validated)."""
    kind, files = find_weight_files(path)
    for f in files:
        if not f.endswith(".json"):
            check_not_lfs_pointer(f)
    if kind == "safetensors":
        from .safetensors import SafetensorsSource
        return SafetensorsSource(files)
    if kind == "torch":
        from .torchfile import TorchFileSource
        return TorchFileSource(files)
    from .gguf import GGUFSource
    return GGUFSource(files[0])
