"""Load: stream every parameter from its source into the prepared skeleton.

For each quantized module the engine reads its pieces and decodes them (pre-quantized checkpoint) or
reads the float weight and quantizes it on its target device; every other parameter is read, cast and
placed. One tensor is in flight at a time, so the full-precision model never exists in memory; source
bytes are memory-mapped and let go as soon as the result owns its storage.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .errors import MissingTensorError, ShapeMismatchError
from .report import LoadReport
from .runtime.modules import _QModule, qtensors_of
from .schemes.base import QTensor


class Weights:
    """Where the engine gets tensors from. Implementations: CheckpointWeights (safetensors / torch
    files, model-named keys) and GGUFWeights (architectures/ maps GGUF names to the model's)."""

    source = None

    def qtensor(self, module_name: str, mod: _QModule) -> QTensor | None:
        """The module's pre-quantized weight, or None when the checkpoint holds it in float."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor | None:
        """A float (or other plain) tensor by model parameter name, or None when absent."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """`name` was consumed into a new tensor (quantized, cast): its source bytes may leave memory."""

    #: (data_ptr, nbytes, file, file offset) of the source tensors read for the current parameter
    recent: list = []

    def _remember(self, t: torch.Tensor, file: str, offset: int) -> None:
        if offset >= 0:
            self.recent.append((t.data_ptr(), t.numel() * t.element_size(), file, offset))

    def locate(self, t: torch.Tensor):
        """Where `t`'s bytes lie unchanged in a checkpoint file (a TensorRef), or None."""
        from .runtime.offload import TensorRef
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        p, n = t.data_ptr(), t.numel() * t.element_size()
        for ptr, size, file, offset in self.recent:
            if ptr <= p and p + n <= ptr + size:
                return TensorRef(file, offset + (p - ptr), t.dtype, tuple(t.shape))
        return None

    def unconsumed(self) -> list[str]:
        return []

    def consumed_companions(self) -> int:
        return 0


def load_weights(model: nn.Module, weights: Weights, *, dtype: torch.dtype,
                 device_of: Callable[[str], torch.device | str], report: LoadReport, progress=None,
                 offloader=None) -> None:
    """Fill every meta parameter of `model` from `weights`. Raises before returning if anything the
    model needs is missing or mismatched: the caller never sees a half-loaded model.
    With an `offloader`, tensors placed on "disk" (or on "cpu" while computing on a GPU) go to it and
    the module keeps meta placeholders until its forward."""
    qmods = dict(qtensors_of(model))
    total = len(qmods) + sum(1 for _ in model.named_parameters())
    bar = progress(total) if progress else None
    t0 = time.perf_counter()

    for name, mod in qmods.items():
        wname = f"{name}.{mod.scheme.param_name}" if name else mod.scheme.param_name
        where = str(device_of(wname))
        off = offloader is not None and offloader.is_offloaded(where)
        dev = torch.device("cpu" if off else where)
        weights.recent = []
        qt = weights.qtensor(name, mod)
        if qt is None:
            w = weights.tensor(wname)
            if w is None:
                report.missing_keys.append(wname)
                continue
            if tuple(w.shape) != tuple(mod._logical_shape):
                report.mismatched_keys.append(f"{wname}: checkpoint {tuple(w.shape)}, model "
                                              f"{tuple(mod._logical_shape)}")
                continue
            # quantize on the target device (fast on GPU), in the model dtype, then drop the float copy
            w = w.to(device=dev, dtype=mod._logical_dtype if w.is_floating_point() else w.dtype)
            qt = mod.scheme.quantize(w)
            del w
            weights.release(wname)
        # sources are copy-on-write memory maps that stay valid after close: a CPU weight may keep
        # viewing the file's bytes (zero copy, like llama.cpp), anything else moves to its device
        for w in qt.meta.get("warnings", ()):
            report.warnings.append(f"{name}: {w}")
        if off:
            mod.set_qweight(offloader.stash_qtensor(name, qt, where, {k: weights.locate(v)
                                                                      for k, v in qt.data.items()}))
        else:
            qt = QTensor(qt.scheme, {k: v.to(dev) for k, v in qt.data.items()}, qt.shape, qt.dtype, qt.meta)
            mod.set_qweight(qt.scheme.prepare_runtime(qt))
        weights.recent = []
        if bar:
            bar.update(1)

    for pname, p in list(model.named_parameters()):
        if not p.is_meta:
            if bar:
                bar.update(1)
            continue
        weights.recent = []
        t = weights.tensor(pname)
        if t is None:
            report.missing_keys.append(pname)
            continue
        if tuple(t.shape) != tuple(p.shape):
            report.mismatched_keys.append(f"{pname}: checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")
            continue
        where = str(device_of(pname))
        off = offloader is not None and offloader.is_offloaded(where)
        target = p.dtype if p.is_floating_point() else t.dtype
        converted = t.to(device="cpu" if off else torch.device(where), dtype=target)
        unchanged = converted.data_ptr() == t.data_ptr()
        if off:
            _assign(model, pname, offloader.stash_param(pname, converted, where,
                                                        weights.locate(converted) if unchanged else None))
        else:
            _assign(model, pname, nn.Parameter(converted, requires_grad=False))
        if not unchanged or off:
            weights.release(pname)
        weights.recent = []
        if bar:
            bar.update(1)

    # persistent buffers stored in the checkpoint (e.g. BatchNorm stats) overwrite their init values
    for bname, b in list(model.named_buffers()):
        t = weights.tensor(bname)
        if t is not None and tuple(t.shape) == tuple(b.shape):
            _assign_buffer(model, bname, t.to(device=b.device, dtype=b.dtype).clone())
    if bar:
        bar.close()
    report.seconds["load"] = time.perf_counter() - t0


def _assign(model: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = value


def _assign_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._buffers[attr] = value


def raise_if_incomplete(report: LoadReport, file: str) -> None:
    """Never return a half-loaded model."""
    if report.mismatched_keys:
        raise ShapeMismatchError(f"{len(report.mismatched_keys)} tensor(s) disagree with the model: "
                                 + "; ".join(report.mismatched_keys[:5]), file=file,
                                 key=report.mismatched_keys[0].split(":")[0])
    if report.missing_keys:
        raise MissingTensorError(f"{len(report.missing_keys)} parameter(s) the model needs are not in the "
                                 f"checkpoint: {', '.join(report.missing_keys[:8])}", file=file,
                                 key=report.missing_keys[0])
