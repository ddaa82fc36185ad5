"""LoadReport: what a load did, attached to the model as `model.load_report`."""
from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass, field

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. On Linux VmHWM (the high-water mark of this
    program's own memory: ru_maxrss carries the parent's size at fork across exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


@dataclass
class KernelChoice:
    """Which kernel one quantized weight computes with, and why the others were not taken.

    kernel: "int4pack g32" / "int4pack g32 x2 planes" / "int8pack" / "int8pack rows" (a packed kernel,
    runtime/kernels.py), "exact" (dequantize, then matmul) or "pending" (marked at load, repacked on its
    first forward; the entry is updated then). reason: why this one. not_taken: kernel family -> why not.
    The report holds the live object, so it reads the final choice after the first forward."""
    kernel: str = "exact"
    reason: str = ""
    not_taken: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        others = "; ".join(f"not {k}: {v}" for k, v in self.not_taken.items())
        return self.kernel + why + (f"; {others}" if others else "")


@dataclass
class LoadReport:
    path: str = ""
    source_kind: str = ""
    quant_method: str | None = None
    prequantized: bool = False
    tensors_read: int = 0
    bytes_read: int = 0
    seconds: dict[str, float] = field(default_factory=dict)      # open / prepare / load / finalize
    peak_rss: int = 0                                             # process peak RSS after the load
    rss_before: int = 0
    peak_above_start: int | None = None                           # this load's peak RSS minus rss_before
    peak_cuda: dict[str, int] = field(default_factory=dict)
    model_bytes: int = 0                                          # bytes held by weights (all devices)
    quantized_modules: dict[str, int] = field(default_factory=dict)   # scheme name -> count
    devices: dict[str, int] = field(default_factory=dict)          # device -> bytes of weights
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    companion_keys: int = 0           # expected quantization companions consumed (absmax, scales, ...)
    warnings: list[str] = field(default_factory=list)
    kernels: dict[str, KernelChoice] = field(default_factory=dict)   # module name -> its kernel

    def kernel_counts(self) -> dict[str, int]:
        """kernel -> number of quantized modules on it (a tied table counts once per module)."""
        counts: dict[str, int] = {}
        for c in self.kernels.values():
            counts[c.kernel] = counts.get(c.kernel, 0) + 1
        return counts

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        q = ", ".join(f"{n} x{c}" for n, c in sorted(self.quantized_modules.items())) or "none"
        return (f"loaded {self.tensors_read} tensors ({self.bytes_read / 2**20:.1f} MiB read) in "
                f"{self.total_seconds:.2f}s; weights {self.model_bytes / 2**20:.1f} MiB; "
                f"{self._peak_text()}; quantized: {q}")

    def _peak_text(self) -> str:
        if self.peak_above_start is None:
            return f"peak RSS {self.peak_rss / 2**20:.0f} MiB"
        return (f"peak RSS +{self.peak_above_start / 2**20:.0f} MiB above the {self.rss_before / 2**20:.0f} MiB "
                "at start")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines.append("stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        if self.kernels:
            lines.append("kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernel_counts().items())))
        if self.devices:
            lines.append("devices: " + ", ".join(f"{d} {b / 2**20:.1f} MiB" for d, b in self.devices.items()))
        for title, items in (("missing", self.missing_keys), ("unexpected", self.unexpected_keys),
                             ("mismatched", self.mismatched_keys), ("warning", self.warnings)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"{title}: {shown}")
        return "\n".join(lines)


def cuda_peaks() -> dict[str, int]:
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}


class RssWatch:
    """This load's peak resident memory above the RSS it started at. The kernel's high-water mark (VmHWM)
    is the whole process's: when the load pushes it higher it is exact; when an earlier, bigger job had set
    it, a sampler thread (every 10 ms, started only then) measures the load's own peak instead."""

    INTERVAL = 0.01

    def __init__(self):
        self.start_rss = current_rss_bytes()
        self.hwm_before = peak_rss_bytes()
        self._peak = self.start_rss
        self._done = threading.Event()
        self._thread = None
        if self.hwm_before - self.start_rss > 1 << 20:
            self._thread = threading.Thread(target=self._sample, name="quantload-rss", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.INTERVAL):
            self._peak = max(self._peak, current_rss_bytes())

    def stop(self) -> int:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        hwm = peak_rss_bytes()
        peak = hwm if hwm > self.hwm_before or self._thread is None else max(self._peak, current_rss_bytes())
        return max(0, peak - self.start_rss)


class LoadProgress:
    """One progress bar over a whole load: opening, reading the config (transformers' import), building the
    model, the tensors (the engine's per-tensor steps) and the final checks. Like tqdm's `delay`, it shows
    only for loads that last over a second, from their start."""

    def __init__(self, enabled: bool = True, delay: float = 1.0):
        self.stages: list[str] = []
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=6, desc="loading", unit="step", delay=delay, leave=False)

    def stage(self, name: str) -> None:
        self.stages.append(name)
        if self.bar is not None:
            self.bar.set_description(f"loading: {name}", refresh=False)
            self.bar.update(1)

    def engine_progress(self):
        """What the engine's `progress=` takes: called with its number of steps, returns their bar."""
        if self.bar is None:
            return None

        def start(total: int):
            self.stage("tensors")
            self.bar.total = self.bar.n + total + 2
            self.bar.refresh()
            return _Steps(self.bar)
        return start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Steps:
    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass  # the whole load's bar closes at its end
