"""Weights from a safetensors / PyTorch checkpoint whose names are (nearly) the model's names."""
from __future__ import annotations

import bisect

import torch

from .engine import Weights
from .runtime.modules import _QModule
from .schemes.base import QTensor
from .sources.base import Source

# names older checkpoints used for LayerNorm parameters
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


def index_by_module(keys) -> dict[str, set[str]]:
    """{module prefix: {suffixes}} for every dotted prefix of every key ("a.b.weight.absmax" lands
    under "a.b" as "weight.absmax" and under "a" as "b.weight.absmax")."""
    out: dict[str, set[str]] = {}
    for k in keys:
        i = k.find(".")
        while i >= 0:  # each dot splits k into (prefix, suffix); slicing beats split + join
            out.setdefault(k[:i], set()).add(k[i + 1:])
            i = k.find(".", i + 1)
        out.setdefault("", set()).add(k)
    return out


class SuffixIndex:
    """index_by_module(keys)[prefix], built only for the prefixes asked about: the keys under a prefix
    are one run of the sorted keys (a load asks about its modules only, not every dotted prefix)."""

    def __init__(self, keys):
        self.keys = sorted(keys)
        self.cache: dict[str, set[str]] = {}

    def get(self, prefix: str) -> set[str]:
        found = self.cache.get(prefix)
        if found is None:
            if prefix:
                # the keys beginning with prefix + "." are exactly those in [prefix + ".", prefix + "/")
                lo = bisect.bisect_left(self.keys, prefix + ".")
                hi = bisect.bisect_left(self.keys, prefix + "/", lo)
                found = {k[len(prefix) + 1:] for k in self.keys[lo:hi]}
            else:  # every key, and what follows a leading dot
                found = set(self.keys) | {k[1:] for k in self.keys if k.startswith(".")}
            self.cache[prefix] = found
        return found


class KeyMap:
    """Model name -> checkpoint name. Handles a base-model prefix present on one side only
    ("bert.encoder..." vs "encoder...") and legacy gamma/beta names."""

    def __init__(self, model_names: list[str], ckpt_keys, base_prefix: str | None):
        self.ckpt = set(ckpt_keys)
        self.rename = {}
        legacy = tuple(_LEGACY_SUFFIXES)
        for k in self.ckpt:
            if not k.endswith(legacy):  # one test per key; nearly every checkpoint has none
                continue
            for old, new in _LEGACY_SUFFIXES.items():
                if k.endswith(old):
                    self.rename[k[: -len(old)] + new] = k
        self.add = self.strip = ""
        if base_prefix:
            p = base_prefix + "."
            direct = sum(1 for n in model_names if self._known(n))
            stripped = sum(1 for n in model_names if n.startswith(p) and self._known(n[len(p):]))
            added = sum(1 for n in model_names if self._known(p + n))
            if stripped > direct and stripped >= added:
                self.strip = p
            elif added > direct:
                self.add = p

    def _known(self, n: str) -> bool:
        return n in self.ckpt or n in self.rename

    def __call__(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip):]
        elif self.add:
            name = self.add + name
        return self.rename.get(name, name)


class CheckpointWeights(Weights):
    def __init__(self, source: Source, model_names: list[str], base_prefix: str | None = None):
        self.source = source
        self.keys = source.keys()
        self.by_module = SuffixIndex(self.keys)
        self.key_of = KeyMap(model_names, self.keys, base_prefix)
        self.used: set[str] = set()
        self.companions = 0
        self.recent = []
        self.tensors_read = 0
        self.bytes_read = 0

    def module_prefix(self, module_name: str) -> str:
        return self.key_of(module_name + ".x")[:-2] if module_name else ""

    def suffixes(self, module_name: str) -> set[str]:
        return self.by_module.get(self.module_prefix(module_name))

    def _read(self, key: str) -> torch.Tensor:
        t = self.source.get(key)
        info = self.source.info(key)
        self._remember(t, info.file, info.offset)
        self.used.add(key)
        self.tensors_read += 1
        self.bytes_read += t.numel() * t.element_size()
        return t

    def qtensor(self, module_name: str, mod: _QModule) -> QTensor | None:
        scheme = mod.scheme
        have = self.suffixes(module_name)
        if not scheme.present(have):
            return None
        prefix = self.module_prefix(module_name)
        sep = prefix + "." if prefix else ""
        wanted = (*scheme.required_keys(), *scheme.optional_keys())
        pieces = {s: self._read(sep + s) for s in wanted if s in have}
        self.companions += max(0, len(pieces) - 1)
        return scheme.decode(pieces, shape=tuple(mod._logical_shape), file=self._file_of(sep + wanted[0]),
                             prefix=prefix)

    def _file_of(self, key: str) -> str:
        try:
            return self.source.info(key).file
        except Exception:
            return getattr(self.source, "path", "")

    def tensor(self, name: str) -> torch.Tensor | None:
        key = self.key_of(name)
        if key not in self.source:
            return None
        return self._read(key)

    def release(self, name: str) -> None:
        self.source.release(self.key_of(name))

    def unconsumed(self) -> list[str]:
        return [k for k in self.keys if k not in self.used]

    def consumed_companions(self) -> int:
        return self.companions
