"""LoadReport: what a load did, attached to the model as `model.load_report`."""
from __future__ import annotations

import resource
import sys
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
                f"peak RSS {self.peak_rss / 2**20:.0f} MiB; quantized: {q}")

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
