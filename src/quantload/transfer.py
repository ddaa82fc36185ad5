"""Host-to-GPU copies of weights through page-locked (pinned) staging buffers.

A copy from pageable memory (a memory-mapped checkpoint) to a GPU is synchronous: the driver copies
through its own small bounce buffer, and the CPU waits for each piece. Staging through a buffer we pin
once per load makes the transfer asynchronous: the CPU fills one slot while the previous slot's DMA runs,
so reading the file and the PCIe transfer overlap, and host memory stays bounded by the slots (a few tens
of MiB per loading thread) whatever the model's size. Each loading thread has its own slots.
"""
from __future__ import annotations

import threading

import torch

#: tensors smaller than this are copied directly (the staging round-trip costs more than it saves)
DIRECT_COPY_BYTES = 1 << 20
SLOT_BYTES = 16 << 20
SLOTS = 2


class _Slots:
    """A thread's ring of pinned buffers, each with the event of the last copy out of it."""

    def __init__(self, slot_bytes: int, slots: int):
        self.slot_bytes = slot_bytes
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.events: list = [None] * slots
        self.next = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the DMA out of this slot is done: it may be overwritten
            self.events[i] = None
        if self.buffers[i] is None:
            self.buffers[i] = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
        return i, self.buffers[i][:nbytes]

    def wait(self) -> None:
        for e in self.events:
            if e is not None:
                e.synchronize()


class Staging:
    """`to(t, device, dtype)` like `t.to(device, dtype)`, staged through pinned memory on CUDA. The cast
    happens on the GPU after the transfer (a bf16 checkpoint crosses the bus at 2 bytes per value)."""

    def __init__(self, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS):
        self.slot_bytes = slot_bytes
        self.slots = slots
        self._local = threading.local()
        self._all: list[_Slots] = []
        self._lock = threading.Lock()
        self.staged_bytes = 0

    def _mine(self) -> _Slots:
        s = getattr(self._local, "slots", None)
        if s is None:
            s = self._local.slots = _Slots(self.slot_bytes, self.slots)
            with self._lock:
                self._all.append(s)
        return s

    def to(self, t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
        device = torch.device(device)
        dtype = dtype or t.dtype
        nbytes = t.numel() * t.element_size()
        if (device.type != "cuda" or t.device.type != "cpu" or nbytes < DIRECT_COPY_BYTES
                or not torch.cuda.is_available()):
            return t.to(device=device, dtype=dtype)
        src = t.contiguous().reshape(-1).view(torch.uint8)
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        dst = out.reshape(-1).view(torch.uint8)
        slots = self._mine()
        stream = torch.cuda.current_stream(device)
        for a in range(0, nbytes, self.slot_bytes):
            b = min(nbytes, a + self.slot_bytes)
            i, buf = slots.take(b - a)
            buf.copy_(src[a:b])  # the page faults on the mapped file happen here, on this thread
            dst[a:b].copy_(buf, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            slots.events[i] = ev
        with self._lock:
            self.staged_bytes += nbytes
        return out if dtype == t.dtype else out.to(dtype)

    def close(self) -> None:
        """Wait for every copy in flight, then let the pinned buffers go."""
        for s in self._all:
            s.wait()
        self._all.clear()
        self._local = threading.local()
