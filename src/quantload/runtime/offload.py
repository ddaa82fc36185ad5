"""CPU and disk offload that keeps weights quantized.

A module placed on "disk" keeps no bytes in memory between forwards: each of its tensors is a
`TensorRef` (file, offset, dtype, shape) pointing into the original checkpoint where the bytes are
unchanged (a float weight of the right dtype, GGUF blocks), else into a file in offload_folder written
while loading. A module placed on "cpu" while the model computes on a GPU keeps its (quantized) tensors
in CPU memory. Around each forward of an offloaded unit, its tensors are brought to the compute device
and released afterwards; the next unit is prefetched by a background thread while the current one
computes. Files are read with pread into fresh buffers (no memory map), so resident memory stays bounded
by the resident weights plus about two units.
"""
from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn

from ..schemes.base import QTensor
from .modules import _QModule

_ALIGN = 64


class TensorRef(NamedTuple):
    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def read(self, device: torch.device) -> torch.Tensor:
        pin = device.type == "cuda"
        t = torch.empty(self.shape, dtype=self.dtype, pin_memory=pin)
        if self.nbytes:
            buf = t.view(-1).view(torch.uint8).numpy()
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(buf)], self.offset)
            finally:
                os.close(fd)
            if got != self.nbytes:
                raise OSError(f"{self.path}: short read at {self.offset} ({got} of {self.nbytes} bytes)")
        return t.to(device, non_blocking=pin)


class OffloadStore:
    """An append-only file in offload_folder for offloaded tensors whose bytes are not in the source."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"quantload-offload-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        self._f = open(self.path, "wb")
        self._pos = 0
        self._lock = threading.Lock()

    def put(self, t: torch.Tensor) -> TensorRef:
        data = t.detach().to("cpu").contiguous()
        raw = data.view(-1).view(torch.uint8).numpy() if data.numel() else b""
        with self._lock:
            pad = (-self._pos) % _ALIGN
            if pad:
                self._f.write(b"\0" * pad)
                self._pos += pad
            ref = TensorRef(self.path, self._pos, data.dtype, tuple(data.shape))
            self._f.write(memoryview(raw) if len(raw) else b"")
            self._pos += len(raw)
        return ref

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold after large frees, so the buffers of each offloaded unit end up
    on the heap and the process never gives them back: resident memory would creep up to the whole
    model over a generate. A fixed threshold keeps large buffers in their own mappings, returned on free."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class Offloader:
    """Collects offloaded tensors during the load, then runs offloaded units with prefetch."""

    def __init__(self, plan, compute_device: torch.device, offload_folder: str | None):
        _return_freed_memory()
        self.plan = plan
        self.compute = torch.device(compute_device)
        self.folder = offload_folder
        self.store: OffloadStore | None = None
        # module name -> {attr: TensorRef | tensor} for params; {"qweight": {role: ref}} for QTensors
        self.params: dict[str, dict[str, object]] = {}
        self.qweights: dict[str, tuple[dict[str, object], QTensor]] = {}
        self.units: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantload-prefetch")
        self._pending: dict[int, object] = {}

    # --- during the load ---------------------------------------------------------------------------
    def is_offloaded(self, device: str) -> bool:
        return device == "disk" or (device == "cpu" and self.compute.type != "cpu")

    def _keep(self, t: torch.Tensor, device: str, where: TensorRef | None):
        if device != "disk":
            return t.to("cpu")
        if where is not None:
            return where
        if self.store is None:
            self.store = OffloadStore(self.folder)
        return self.store.put(t)

    def stash_param(self, name: str, t: torch.Tensor, device: str, where: TensorRef | None) -> nn.Parameter:
        mod, _, attr = name.rpartition(".")
        self.params.setdefault(mod, {})[attr] = self._keep(t, device, where)
        return nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)

    def stash_qtensor(self, module_name: str, qt: QTensor, device: str, where: dict) -> QTensor:
        kept = {k: self._keep(v, device, where.get(k)) for k, v in qt.data.items()}
        self.qweights[module_name] = (kept, qt)
        return QTensor(qt.scheme, {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                                   for k, v in qt.data.items()}, qt.shape, qt.dtype, qt.meta)

    # --- after the load --------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if self.store is not None:
            self.store.flush()
        self.model = model
        self.share_tied(model)
        no_split = set(getattr(model, "_no_split_modules", None) or ())
        units: list[str] = []
        for u, d in self.plan.device_map.items():
            if self.is_offloaded(d):
                units.extend(self._expand(model, u, no_split))
        owners = set(self.params) | set(self.qweights)
        self.units = []
        for u in dict.fromkeys(units):
            owned = [o for o in owners if o == u or o.startswith(u + ".") or u == ""]
            if not owned:
                continue
            self.units.append((u, owned))
            i = len(self.units) - 1
            mod = model.get_submodule(u)
            mod.register_forward_pre_hook(lambda m, args, i=i: self._enter(i, m))
            mod.register_forward_hook(lambda m, args, out, i=i: self._leave(i, m))

    def _expand(self, model: nn.Module, unit: str, no_split: set) -> list[str]:
        """Offloaded units small enough to run one at a time: a plan entry covering several blocks (or the
        whole model) is split into its children, down to no-split blocks and modules with own tensors."""
        try:
            mod = model.get_submodule(unit)
        except AttributeError:
            return [unit.rpartition(".")[0]]  # a tensor name: its module is the unit
        children = list(mod.named_children())
        own = any(p is not None for p in mod._parameters.values()) or isinstance(mod, _QModule)
        if type(mod).__name__ in no_split or not children or own:
            return [unit]
        out = []
        for name, _ in children:
            out.extend(self._expand(model, f"{unit}.{name}" if unit else name, no_split))
        return out

    def share_tied(self, model: nn.Module) -> None:
        """A tied parameter (lm_head.weight is embed_tokens.weight) was stashed once: every module that
        holds the same placeholder gets the same storage reference. The same for a quantized table: a
        GGUF lm_head tied to an offloaded QEmbedding holds its placeholder QTensor (finalize ties them)."""
        by_id = {}
        for owner, attrs in self.params.items():
            m = model.get_submodule(owner)
            for attr, ref in attrs.items():
                by_id[id(m._parameters[attr])] = ref
        q_by_id = {id(model.get_submodule(owner).qweight): kept for owner, kept in self.qweights.items()}
        for name, m in model.named_modules():
            for attr, p in m._parameters.items():
                if p is not None and id(p) in by_id and attr not in self.params.get(name, {}):
                    self.params.setdefault(name, {})[attr] = by_id[id(p)]
            if isinstance(m, _QModule) and name not in self.qweights and id(m.qweight) in q_by_id:
                self.qweights[name] = q_by_id[id(m.qweight)]

    def _materialize(self, i: int) -> dict:
        got = {}
        for owner in self.units[i][1]:
            for attr, v in self.params.get(owner, {}).items():
                got[(owner, attr)] = v.read(self.compute) if isinstance(v, TensorRef) else v.to(self.compute)
            if owner in self.qweights:
                kept, template = self.qweights[owner]
                data = {k: v.read(self.compute) if isinstance(v, TensorRef) else v.to(self.compute)
                        for k, v in kept.items()}
                got[(owner, None)] = QTensor(template.scheme, data, template.shape, template.dtype, template.meta)
        return got

    def _enter(self, i: int, module: nn.Module) -> None:
        fut = self._pending.pop(i, None)
        tensors = fut.result() if fut is not None else self._materialize(i)
        for (owner, attr), t in tensors.items():
            m = self.model.get_submodule(owner)
            if attr is None:
                m.qweight = t
            else:
                m._parameters[attr] = nn.Parameter(t, requires_grad=False)
        nxt = (i + 1) % len(self.units)
        if nxt != i and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self._materialize, nxt)

    def _leave(self, i: int, module: nn.Module) -> None:
        for owner in self.units[i][1]:
            m = self.model.get_submodule(owner)
            for attr in self.params.get(owner, {}):
                p = m._parameters[attr]
                m._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=False)
            if owner in self.qweights and isinstance(m, _QModule):
                q = m.qweight
                m.qweight = QTensor(q.scheme, {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                                               for k, v in q.data.items()}, q.shape, q.dtype, q.meta)

    def bytes_by_device(self) -> dict[str, int]:
        """Bytes kept by the offloader: "disk" (referenced in files) and "cpu" (held for a GPU)."""
        out: dict[str, int] = {}
        seen = set()
        items = [v for attrs in self.params.values() for v in attrs.values()]
        items += [v for kept, _ in self.qweights.values() for v in kept.values()]
        for v in items:
            if id(v) in seen:
                continue
            seen.add(id(v))
            where = "disk" if isinstance(v, TensorRef) else "cpu"
            out[where] = out.get(where, 0) + (v.nbytes if isinstance(v, TensorRef) else v.numel() * v.element_size())
        return out

    def offloaded_names(self) -> set[str]:
        return set(self.params) | set(self.qweights)
