"""Load: stream every parameter from its source into the prepared skeleton.

For each quantized module the engine reads its pieces and decodes them (pre-quantized checkpoint) or
reads the float weight and quantizes it on its target device; every other parameter is read, cast and
placed. A small pool of worker threads does the reading (page faults on the memory-mapped file), the
decoding and the quantizing, so reads overlap with compute; the pool is bounded by the bytes in flight,
not by a count, so the full-precision model never exists in memory. The main thread installs results in
order. Source bytes are memory-mapped and let go as soon as the result owns its storage. Tensors bound
for a CUDA device go through page-locked staging buffers (transfer.py).
"""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from .report import LoadReport
from .runtime.modules import _QModule, qtensors_of
from .schemes.base import QTensor
from .transfer import Staging

#: default cap on the bytes of weights being read / decoded / quantized at once
DEFAULT_BYTES_IN_FLIGHT = 128 << 20


class Weights:
    """Where the engine gets tensors from. Implementations: CheckpointWeights (safetensors / torch
    files, model-named keys) and GGUFWeights (architectures/ maps GGUF names to the model's).
    `qtensor` and `tensor` are called from the engine's worker threads, one call per parameter at a time
    per thread: per-call state lives in `recent`, which is per thread."""

    source = None
    _local = threading.local()

    def qtensor(self, module_name: str, mod: _QModule) -> QTensor | None:
        """The module's pre-quantized weight, or None when the checkpoint holds it in float."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor | None:
        """A float (or other plain) tensor by model parameter name, or None when absent."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """`name` was consumed into a new tensor (quantized, cast): its source bytes may leave memory."""

    @property
    def recent(self) -> list:
        """(data_ptr, nbytes, file, file offset) of the source tensors this thread read for its current
        parameter (what `locate` searches)."""
        return self._local.__dict__.setdefault("recent", [])

    @recent.setter
    def recent(self, value: list) -> None:
        self._local.recent = value

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


def load_workers() -> int:
    """Worker threads for a load: QUANTLOAD_LOAD_WORKERS, else one per core up to 4 (torch kernels
    release the GIL; more threads than cores only adds contention). 1 loads in the calling thread."""
    env = os.environ.get("QUANTLOAD_LOAD_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"QUANTLOAD_LOAD_WORKERS must be a positive integer, got {env!r}")
        return n
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                      (os.cpu_count() or 1)))


class _Pipeline:
    """Runs jobs on a thread pool, at most `budget` bytes of them at once (always at least one), and hands
    results back in submission order."""

    def __init__(self, workers: int, budget: int):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="quantload-load") if workers > 1 else None
        self.budget = budget
        self.pending: collections.deque[tuple[Future | tuple, int]] = collections.deque()
        self.in_flight = 0

    def submit(self, cost: int, fn, *args):
        """Queue fn(*args); returns the results that had to finish first to make room (in order)."""
        done = []
        while self.pending and self.in_flight + cost > self.budget:
            done.append(self._pop())
        if self.pool is None:
            self.pending.append(((fn(*args),), cost))
        else:
            self.pending.append((self.pool.submit(fn, *args), cost))
        self.in_flight += cost
        return done

    def _pop(self):
        job, cost = self.pending.popleft()
        self.in_flight -= cost
        return job[0] if isinstance(job, tuple) else job.result()

    def drain(self):
        while self.pending:
            yield self._pop()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def load_weights(model: nn.Module, weights: Weights, *, dtype: torch.dtype,
                 device_of: Callable[[str], torch.device | str], report: LoadReport, progress=None,
                 offloader=None, quantizing: bool = False, workers: int | None = None,
                 bytes_in_flight: int | None = None) -> None:
    """Fill every meta parameter of `model` from `weights`. Raises before returning if anything the
    model needs is missing or mismatched: the caller never sees a half-loaded model.
    With an `offloader`, tensors placed on "disk" (or on "cpu" while computing on a GPU) go to it and
    the module keeps meta placeholders until its forward. `quantizing`: float weights are quantized
    while loading (the heavy case the worker pool and the allocator pad are for)."""
    qmods = dict(qtensors_of(model))
    params = [(n, p) for n, p in model.named_parameters() if p.is_meta]
    total = len(qmods) + sum(1 for _ in model.named_parameters())
    bar = progress(total) if progress else None
    t0 = time.perf_counter()
    staging = Staging()
    if workers is None:
        # Decoding a pre-quantized checkpoint on the CPU is ~200 short, Python-bound jobs: threads only
        # add GIL hand-offs there (measured 45 -> 126 ms for SmolLM2 NF4). Quantizing, or feeding a GPU
        # (reads overlap the transfers), is where the pool pays.
        # (QUANTLOAD_LOAD_WORKERS, when set, decides in every case)
        explicit = bool(os.environ.get("QUANTLOAD_LOAD_WORKERS"))
        workers = load_workers() if explicit or quantizing or torch.cuda.is_available() else 1
    pipe = _Pipeline(workers, bytes_in_flight or DEFAULT_BYTES_IN_FLIGHT)
    pad = _AllocatorPad() if quantizing else None

    def where_of(name: str) -> tuple[str, bool, torch.device]:
        where = str(device_of(name))
        off = offloader is not None and offloader.is_offloaded(where)
        return where, off, torch.device("cpu" if off else where)

    # --- worker side: read, decode / quantize / cast, move; nothing here touches the model -------------
    def quantized_job(name: str, mod: _QModule):
        wname = f"{name}.{mod.scheme.param_name}" if name else mod.scheme.param_name
        where, off, dev = where_of(wname)
        weights.recent = []
        qt = weights.qtensor(name, mod)
        if qt is None:
            w = weights.tensor(wname)
            if w is None:
                return ("missing", wname)
            if tuple(w.shape) != tuple(mod._logical_shape):
                return ("mismatch", f"{wname}: checkpoint {tuple(w.shape)}, model {tuple(mod._logical_shape)}")
            # quantize on the target device (fast on GPU), in the model dtype, then drop the float copy
            w = staging.to(w, dev, mod._logical_dtype if w.is_floating_point() else w.dtype)
            qt = mod.scheme.quantize(w)
            del w
            weights.release(wname)
        refs = None
        if off:
            # sources are copy-on-write memory maps that stay valid after close: offloaded bytes that are
            # unchanged in the file are referenced there instead of copied
            refs = {k: weights.locate(v) for k, v in qt.data.items()}
        else:
            # a CPU weight may keep viewing the file's bytes (zero copy, like llama.cpp)
            qt = QTensor(qt.scheme, {k: staging.to(v, dev) for k, v in qt.data.items()}, qt.shape, qt.dtype,
                         qt.meta)
            qt = qt.scheme.prepare_runtime(qt)
        weights.recent = []
        return ("q", name, mod, qt, where, off, refs)

    def param_job(pname: str, p: torch.Tensor):
        weights.recent = []
        t = weights.tensor(pname)
        if t is None:
            return ("missing", pname)
        if tuple(t.shape) != tuple(p.shape):
            return ("mismatch", f"{pname}: checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")
        where, off, dev = where_of(pname)
        converted = staging.to(t, dev, p.dtype if p.is_floating_point() else t.dtype)
        unchanged = converted.data_ptr() == t.data_ptr()
        ref = weights.locate(converted) if off and unchanged else None
        if not unchanged or off:
            weights.release(pname)
        weights.recent = []
        return ("p", pname, converted, where, off, ref)

    # --- main thread: install in order ------------------------------------------------------------------
    def install(result) -> None:
        kind = result[0]
        if kind == "missing":
            report.missing_keys.append(result[1])
        elif kind == "mismatch":
            report.mismatched_keys.append(result[1])
        elif kind == "q":
            _, name, mod, qt, where, off, refs = result
            for w in qt.meta.get("warnings", ()):
                report.warnings.append(f"{name}: {w}")
            mod.set_qweight(offloader.stash_qtensor(name, qt, where, refs) if off else qt)
        else:
            _, pname, converted, where, off, ref = result
            _assign(model, pname, offloader.stash_param(pname, converted, where, ref) if off
                    else nn.Parameter(converted, requires_grad=False))
        if bar:
            bar.update(1)

    try:
        for name, mod in qmods.items():
            cost = mod._logical_shape.numel() * mod._logical_dtype.itemsize
            for r in pipe.submit(cost, quantized_job, name, mod):
                install(r)
        for pname, p in params:
            for r in pipe.submit(p.numel() * p.element_size(), param_job, pname, p):
                install(r)
        for r in pipe.drain():
            install(r)
    finally:
        pipe.close()
        staging.close()
        if pad is not None:
            pad.close()
    if bar:
        bar.update(total - len(qmods) - len(params))

    # persistent buffers stored in the checkpoint (e.g. BatchNorm stats) overwrite their init values
    for bname, b in list(model.named_buffers()):
        t = weights.tensor(bname)
        if t is not None and tuple(t.shape) == tuple(b.shape):
            _assign_buffer(model, bname, t.to(device=b.device, dtype=b.dtype).clone())
    if bar:
        bar.close()
    report.seconds["load"] = time.perf_counter() - t0


class _AllocatorPad:
    """While weights are quantized one after another, each one's temporaries (a few MiB to tens of MiB)
    are freed and then asked for again. glibc hands such blocks back to the kernel at once and the next
    weight page-faults them in anew: ~200k faults and ~0.5 s of system time for SmolLM2. A 64 MiB top pad
    keeps them in the heap for the load; afterwards the default comes back and the pad is trimmed away."""

    M_TOP_PAD = -2
    PAD = 64 << 20
    DEFAULT = 128 << 10

    def __init__(self):
        self.libc = None
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(self.M_TOP_PAD, self.PAD) == 1:
                self.libc = libc
        except (OSError, AttributeError):
            pass  # not glibc: nothing to tune

    def close(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_TOP_PAD, self.DEFAULT)
            self.libc.malloc_trim(0)
            self.libc = None


def _assign(model: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = value


def _assign_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._buffers[attr] = value


def raise_if_unconsumed(report: LoadReport, file: str) -> None:
    """A checkpoint whose tensors the declared model does not all consume is not the model it declares
    (a config with too few layers, quantized companions a dense layer ignores): refused, keys listed."""
    keys = report.unexpected_keys
    if keys:
        raise UnexpectedTensorError(
            f"{len(keys)} checkpoint tensor(s) are not used by the model the config declares: "
            f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}; expected every tensor to belong to a "
            "parameter or buffer (load(..., strict=False) drops them, listed in the load report)",
            file=file, key=keys[0])


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
