"""PyTorch checkpoints (.bin/.pt/.pth, or sharded with pytorch_model.bin.index.json).

Only torch.load(weights_only=True) ever reads them: a file that needs arbitrary unpickling is refused, never
run. Zip-format files are memory-mapped (tensors page in on access); the legacy format cannot be, and is
read whole. Prefer safetensors for untrusted input: torch's zip reader is less strict than our own parser.
"""
from __future__ import annotations

import io
import os
import pickle
import re

import torch

from ..errors import FileFormatError, MissingTensorError, QuantloadError
from .files import check_not_lfs_pointer
from .base import Source, TensorInfo
from .safetensors import check_index_agrees, split_files

#: where training code nests the model's state dict, most specific first
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
#: prefixes wrappers add to every key: DDP/DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class _ReadNoMoreThanLeft(io.BufferedReader):
    """read(n) allocates n bytes before reading: a legacy file's pickle declaring a 700 MB string in a
    1 KB file must not make the unpickler allocate it. Reads are capped at what the file still holds."""

    def __init__(self, raw):
        super().__init__(raw)
        self._size = os.fstat(raw.fileno()).st_size

    def read(self, n=-1):
        if n is not None and n > 0:
            n = max(0, min(n, self._size - self.tell()))
        return super().read(n)


def load_torch_file(path: str):
    """torch.load with weights_only=True, mmap when the format allows; every failure a FileFormatError."""
    check_not_lfs_pointer(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            with _ReadNoMoreThanLeft(io.FileIO(path, "rb")) as f:   # legacy, non-zip format
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        kind, reason = refused_pickle_reason(str(e))
        if kind == "global":
            raise FileFormatError(f"the file contains objects that are not plain tensors ({reason}); "
                                  "quantload never unpickles arbitrary code. Convert it to safetensors "
                                  "where you trust it", file=path) from None
        raise FileFormatError(f"corrupt pickle data ({reason})", file=path) from None
    except QuantloadError:
        raise
    except Exception as e:  # any failure decoding the bytes (zip, pickle, storage records) is a bad file
        first_line = (str(e).strip().split("\n") or [""])[0][:200]
        raise FileFormatError(f"not a readable PyTorch checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {first_line})", file=path) from None


# torch's weights_only unpickler names what it refused in one of these forms (torch 2.6 .. 2.13: "Unsupported
# global: GLOBAL m.C was not an allowed global by default", "Trying to load unsupported GLOBAL posix.system
# whose module posix is blocked", "... must be m.C to load"); the text around it changes between releases.
_GLOBAL_PATTERNS = (re.compile(r"GLOBAL (\S+?)(?: was not an allowed global| whose module|[.,;]?\s|$)"),
                    re.compile(r"(\S+) must be (\S+) to load"))
_TORCH_BOILERPLATE = ("weights only load failed", "in pytorch 2.6", "re-running", "check the documentation",
                      "please file an issue", "this file can still be loaded", "(1)", "(2)")


def refused_pickle_reason(message: str) -> tuple[str, str]:
    """("global", "posix.system") when torch refused to import a global (a class or function the pickle
    names: never run), else ("corrupt", the line of torch's message that says what was wrong)."""
    for pattern in _GLOBAL_PATTERNS:
        m = pattern.search(message)
        if m:
            return "global", f"it names the global {m.group(1)!r}, which was not imported"
    detail = message.partition("WeightsUnpickler error:")[2] or message
    lines = [ln.strip() for ln in detail.split("\n") if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(_TORCH_BOILERPLATE)]
    return "corrupt", (useful[0] if useful else (lines[0] if lines else "no detail"))[:200]


def _find_state_dict(obj, depth: int = 0):
    """The dict of tensors: obj itself, or one nested under a usual key (a few levels at most)."""
    if not isinstance(obj, dict):
        return None
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for name in NESTED_STATE_DICT_KEYS:
        found = _find_state_dict(obj.get(name), depth + 1) if depth < 3 else None
        if found is not None:
            return found
    return None


def _strip_wrapper_prefixes(tensors: dict) -> dict:
    """Drop a wrapper prefix only when EVERY key has it, so no name can change meaning."""
    stripped = True
    while stripped and tensors:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def state_dict_of(obj, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint; non-tensor entries (step counters, configs) are ignored."""
    found = _find_state_dict(obj)
    if found is None:
        top = f"keys {list(obj)[:10]}" if isinstance(obj, dict) else type(obj).__name__
        raise FileFormatError(f"no state dict of tensors found (top level: {top}); expected a dict of "
                              f"tensors, or one under {list(NESTED_STATE_DICT_KEYS)}", file=path)
    return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class TorchFileSource(Source):
    kind = "torch"

    def __init__(self, files):
        self.path, shards, weight_map = split_files(files)
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}
        raw_files: dict[str, str] = {}  # key as saved -> file, to check the index before stripping
        for shard in shards:
            tensors = state_dict_of(load_torch_file(shard), shard)
            raw_files.update(dict.fromkeys(tensors, shard))
            for key, tensor in _strip_wrapper_prefixes(tensors).items():
                if key in self._files:
                    raise FileFormatError(f"tensor is also in {self._files[key]}; each tensor must be in "
                                          "exactly one file", file=shard, key=key)
                self._tensors[key], self._files[key] = tensor.detach(), shard
        if weight_map is not None:
            check_index_agrees(self.path, weight_map, raw_files)

    def keys(self) -> list[str]:
        return list(self._files)

    def info(self, key: str) -> TensorInfo:
        t = self.get(key)
        return TensorInfo(key, tuple(t.shape), t.dtype, t.numel() * t.element_size(), self._files[key])

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            if key in self._files:
                raise QuantloadError("the source is closed", file=self._files[key], key=key) from None
            raise MissingTensorError("no such tensor in the checkpoint", file=self.path, key=key) from None

    def close(self) -> None:
        # Our references only: torch's mmap is unmapped when the last tensor viewing it dies.
        self._tensors.clear()
