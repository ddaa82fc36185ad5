"""A Source is a checkpoint as named, lazy tensors plus file-level metadata.

Sources know nothing of models or quantization: they validate the container when opened (every header
against the file size, before anything is allocated) and read a tensor's bytes only when asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # logical shape, torch order (GGUF: reversed ne)
    dtype: torch.dtype              # element dtype as stored (GGUF block types: torch.uint8)
    nbytes: int                     # bytes on disk
    file: str
    offset: int = -1                # absolute byte offset in `file`, -1 when not addressable
    ggml_type: int | None = None    # GGUF only: the ggml type id


class Source:
    """Base class: a mapping from tensor names to lazily read tensors."""

    path: str
    #: what kind of container this is: "safetensors", "torch" or "gguf" (the load route dispatches on it)
    kind: str = ""
    #: file-level string metadata (safetensors __metadata__; GGUF key-values live on the GGUF source)
    metadata: dict

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor on CPU. May be a zero-copy view of a memory map: callers must not write to it
        and must copy (or quantize) before the source is closed."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """A hint that `key` was consumed and its bytes may leave resident memory (no-op by default)."""

    def close(self) -> None:
        pass

    # --- conveniences -----------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._keyset()

    def _keyset(self) -> set:
        ks = getattr(self, "_keyset_cache", None)
        if ks is None:
            ks = set(self.keys())
            self._keyset_cache = ks
        return ks

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def file_of(self, key: str) -> str:
        return self.info(key).file

    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
