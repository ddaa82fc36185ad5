"""Kernel throughput, one fresh worker process per side: NF4 quantize/dequantize against bitsandbytes,
every GGUF block type's dequantize against gguf-py, and the machine's memory copy (the physical
reference every kernel's bytes moved are compared to).

Within a process each figure is the fastest of several calls after a warm-up call (the kernel's own
time, with the least interference from other work on a shared machine); the harness then takes the
median over processes. "Bytes moved" is what a kernel reads plus what it writes, so it is comparable
with memcpy's read + write traffic.
"""
from __future__ import annotations

import time

from . import inputs

NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit (transformers does not change it)


def timed(fn, *, min_total_s: float = 0.5, min_reps: int = 3, max_reps: int = 7, cpu: list | None = None):
    """(fastest seconds per call, last result): one warm-up call, then at least min_reps calls and
    more until min_total_s has passed (up to max_reps). `cpu`, when given, receives the fastest
    process CPU time per call (user + system, every thread): on a shared machine it leaves out the
    time other processes held the core, which the wall clock counts."""
    result = fn()
    times, cpu_times = [], []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_total_s):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if cpu is not None:
        cpu.append(min(cpu_times))
    return min(times), result


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _rate(prefix: str, seconds: float, elements: int, moved: int, cpu: list | None = None) -> dict:
    out = {f"{prefix}.elements_per_s": elements / seconds, f"{prefix}.gb_per_s": moved / seconds / 1e9,
           f"{prefix}.seconds": seconds}
    if cpu:
        out[f"{prefix}.cpu_seconds"] = cpu[-1]
    return out


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --- memcpy -------------------------------------------------------------------------------------------
def machine_memcpy() -> dict:
    """torch copy_ of 256 MiB between two resident buffers. copy_gb_per_s counts bytes copied (the usual
    memcpy figure); traffic_gb_per_s counts read + written bytes, the unit kernels are compared in."""
    import torch
    n = 256 * 2**20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    seconds, _ = timed(lambda: dst.copy_(src), min_reps=5)
    return {"copy_gb_per_s": n / seconds / 1e9, "traffic_gb_per_s": 2 * n / seconds / 1e9,
            "threads": torch.get_num_threads()}


# --- NF4 ----------------------------------------------------------------------------------------------
def _bnb_reference(w):
    import bitsandbytes.functional as BF
    q, state = BF.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
    return BF.dequantize_4bit(q, state)


def ql_nf4_kernels() -> dict:
    import torch
    from quantload.config import resolve_quantize
    w = inputs.nf4_weight()
    out: dict = {}
    try:
        scheme = resolve_quantize("nf4-nodq").scheme_for("layer", None)
        cpu: list = []
        seconds, qt = timed(lambda: scheme.quantize(w), cpu=cpu)
        out.update(_rate("quantize", seconds, w.numel(), _nbytes(w) + qt.nbytes, cpu))
        out["blocksize"] = qt.meta.get("blocksize")
    except Exception as e:
        out["quantize.error"] = out["dequantize.error"] = _error(e)
        return out
    try:
        seconds, deq = timed(lambda: qt.dequantize(torch.bfloat16), cpu=cpu)
        out.update(_rate("dequantize", seconds, w.numel(), qt.nbytes + _nbytes(deq), cpu))
        if inputs.installed("bitsandbytes"):  # outside the clock: the same work as the reference?
            out["matches_bitsandbytes"] = bool(torch.equal(deq, _bnb_reference(w)))
    except Exception as e:
        out["dequantize.error"] = _error(e)
    return out


def bnb_nf4_kernels() -> dict:
    import bitsandbytes.functional as BF
    w = inputs.nf4_weight()
    cpu: list = []
    seconds, (q, state) = timed(lambda: BF.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4"), cpu=cpu)
    packed = _nbytes(q, state.absmax)
    out = _rate("quantize", seconds, w.numel(), _nbytes(w) + packed, cpu)
    seconds, deq = timed(lambda: BF.dequantize_4bit(q, state), cpu=cpu)
    out.update(_rate("dequantize", seconds, w.numel(), packed + _nbytes(deq), cpu))
    out["blocksize"] = NF4_BLOCKSIZE
    return out


# --- GGUF ---------------------------------------------------------------------------------------------
def _gguf_py_dequantize(raw, type_name: str):
    import gguf
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])


def _ql_gguf_dequantizer():
    """(name of the entry point, fn(type_id, raw uint8 [rows, row_bytes]) -> float32 [rows, cols]):
    the scheme's decode + dequantize (what a load runs) when the GGUF schemes are importable, else the
    block kernel alone."""
    import torch
    try:
        from quantload.schemes.gguf import gguf_scheme
    except ImportError:
        from quantload.schemes.gguf.dequant import dequantize_blocks
        return "dequantize_blocks", lambda tid, raw: dequantize_blocks(tid, raw, torch.float32)

    def via_scheme(tid, raw):
        qt = gguf_scheme(tid).decode({"weight": raw.reshape(-1)}, shape=inputs.GGUF_SHAPE, file="<bench>",
                                     prefix="bench")
        return qt.dequantize(torch.float32)
    return "gguf_scheme(type).decode().dequantize()", via_scheme


def ql_gguf_kernels() -> dict:
    """Every block type in quantload's ggml table: raw bytes -> float32, and whether the result equals
    gguf-py's bit for bit."""
    import torch
    from quantload.ggml_types import GGML_TYPES
    blocks = [t for t in GGML_TYPES.values() if t.block_size > 1]
    try:
        api, dequantize = _ql_gguf_dequantizer()
    except Exception as e:
        return {f"{t.name}.error": f"quantload.schemes.gguf: {_error(e)}" for t in blocks}
    rows, cols = inputs.GGUF_SHAPE
    out: dict = {"api": api}
    for t in blocks:
        raw = inputs.gguf_blocks(t.name, t.type_size, t.block_size)
        raw_t = torch.from_numpy(raw)
        try:
            seconds, deq = timed(lambda: dequantize(t.id, raw_t))
        except Exception as e:
            out[f"{t.name}.error"] = _error(e)
            continue
        out.update(_rate(t.name, seconds, rows * cols, raw.nbytes + _nbytes(deq)))
        if inputs.installed("gguf"):
            try:
                ref = torch.from_numpy(_gguf_py_dequantize(raw, t.name)).reshape(-1)
                out[f"{t.name}.matches_gguf_py"] = bool(torch.equal(deq.reshape(-1), ref))
            except (NotImplementedError, KeyError):
                pass
    return out


def ggufpy_gguf_kernels() -> dict:
    """gguf-py's numpy dequantize for every block type it has a dequantizer for."""
    import gguf
    rows, cols = inputs.GGUF_SHAPE
    out: dict = {}
    for qtype in gguf.GGMLQuantizationType:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if block_size == 1:
            continue
        raw = inputs.gguf_blocks(qtype.name, type_size, block_size)
        try:
            seconds, deq = timed(lambda: gguf.quants.dequantize(raw, qtype))
        except NotImplementedError:
            out[f"{qtype.name}.error"] = f"gguf-py {gguf_version()} has no dequantizer for {qtype.name}"
            continue
        out.update(_rate(qtype.name, seconds, rows * cols, raw.nbytes + deq.nbytes))
    return out


def gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")
