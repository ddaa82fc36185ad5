"""GGUF string arrays kept as their bytes and decoded on access.

A vocabulary is the bulk of a GGUF file's metadata: 49k tokens and 49k merges as Python strings cost
~10 MiB (about 100 bytes per str object), and loading a model never reads them; only the tokenizer does,
once. The parser validates every element (lengths inside the file, UTF-8) in its single pass, then keeps
one bytes copy of the array's region and the element bounds; elements are decoded when asked for.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StringArray(Sequence):
    """An immutable sequence of str, equal to the list of the same strings."""

    __slots__ = ("_data", "_starts", "_ends")

    def __init__(self, data: bytes, starts: np.ndarray, ends: np.ndarray):
        self._data = data
        self._starts = starts
        self._ends = ends

    @classmethod
    def of(cls, strings) -> "StringArray":
        encoded = [s.encode("utf-8") for s in strings]
        ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        return cls(b"".join(encoded), ends - [len(b) for b in encoded], ends)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._data[s:e].decode("utf-8") for s, e in
                    zip(self._starts[i].tolist(), self._ends[i].tolist())]
        return self._data[int(self._starts[i]):int(self._ends[i])].decode("utf-8")

    def __iter__(self):
        data = self._data
        for s, e in zip(self._starts.tolist(), self._ends.tolist()):
            yield data[s:e].decode("utf-8")

    def __eq__(self, other) -> bool:
        if isinstance(other, StringArray):
            return (self._data == other._data and np.array_equal(self._starts, other._starts)
                    and np.array_equal(self._ends, other._ends))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking equality with lists: unhashable like them

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], len={len(self)})"
