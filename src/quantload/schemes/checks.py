"""Validation shared by the integer schemes: every error names the file, the full key, what was found
and what was expected."""
from __future__ import annotations

import torch

from ..errors import MissingTensorError, QuantStateError, ShapeMismatchError


def full_key(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def need(pieces: dict, suffix: str, *, file, prefix, why: str = "") -> torch.Tensor:
    t = pieces.get(suffix)
    if t is None:
        raise MissingTensorError(f"missing {suffix!r}{' ' + why if why else ''}; got {sorted(pieces)}",
                                 file=file, key=full_key(prefix, suffix))
    return t


def expect_shape(t: torch.Tensor, expected, suffix: str, *, file, prefix, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ShapeMismatchError(
            f"shape {list(t.shape)}, expected {list(expected)}{' (' + why + ')' if why else ''}",
            file=file, key=full_key(prefix, suffix))


def expect_dtype(t: torch.Tensor, dtypes, suffix: str, *, file, prefix) -> None:
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ShapeMismatchError(f"dtype {str(t.dtype).removeprefix('torch.')}, expected {names}",
                                 file=file, key=full_key(prefix, suffix))


def expect_float(t: torch.Tensor, suffix: str, *, file, prefix) -> None:
    if not t.is_floating_point() or t.dtype.itemsize == 1:
        raise ShapeMismatchError(f"dtype {str(t.dtype).removeprefix('torch.')}, expected a float "
                                 "(float16, bfloat16 or float32)", file=file, key=full_key(prefix, suffix))


def check_group_index(g_idx: torch.Tensor, n_in: int, n_groups: int, suffix: str, *, file, prefix) -> None:
    """g_idx maps each input column to its group: shape [in_features], values in [0, n_groups)."""
    expect_shape(g_idx, (n_in,), suffix, file=file, prefix=prefix, why="one group per input column")
    if g_idx.is_floating_point() or g_idx.dtype == torch.bool:
        raise ShapeMismatchError(f"dtype {g_idx.dtype}, expected an integer dtype", file=file,
                                 key=full_key(prefix, suffix))
    if n_in and not g_idx.is_meta:
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= n_groups:
            raise QuantStateError(f"group indices span [{lo}, {hi}], expected values in [0, {n_groups - 1}] "
                                  f"({n_groups} groups)", file=file, key=full_key(prefix, suffix))
