"""GGUF dequantization throughput: quantload's torch decoders vs gguf-py's numpy, same process.

    python bench/gguf_kernels.py [--rows 1024] [--cols 4096] [--threads N] [--device cpu|cuda] [--repeat 3]
                                 [--clock wall|cpu] [--types Q4_K,IQ2_XXS]

Each type decodes a rows x cols tensor laid out as GGUF stores it ([rows, row_bytes]); the table gives
million elements per second (best of --repeat) and the ratio. gguf-py is single-threaded numpy;
--threads sets torch's intra-op threads (default: torch's own choice). --clock cpu times process CPU
time instead of wall time: steadier on a shared machine (with one thread it excludes time spent
descheduled), meaningless with several threads.

Physical context, measured in the same run: `memcpy` copies a float32 tensor of the same size into a
fresh output, chunk by chunk as dequantize_blocks does (4 bytes read + 4 written per element: the
GB/s a decoder could at most move), and the
`eager floor` rows time the two or three passes that any decoder made of eager torch ops needs at
least: cast int8 codes (already in element order) to float32 into the fresh output, multiply by one
scale per 32 values (and subtract an offset). Per type, GB/s counts bytes read (the blocks) + float32
written, `%memcpy` compares that with memcpy's GB/s, and `5x needs` is the same for 5 x gguf-py's rate.
"""
from __future__ import annotations

import argparse
import time

import torch

from quantload.ggml_types import GGML_TYPES
from quantload.schemes.gguf._bits import chunks
from quantload.schemes.gguf.dequant import CHUNK_ELEMS, dequantize_blocks, empty_output, supported_types
from quantload.schemes.gguf.samples import random_blocks


def best_time(fn, repeat: int, clock=time.perf_counter) -> float:
    return best_times([fn], repeat, clock)[0]


def best_times(fns, repeat: int, clock=time.perf_counter) -> list[float]:
    """Best time of each function over `repeat` rounds, the functions taking turns within a round, so
    a change of load on a shared machine hits both sides of a ratio alike. Each timed call follows an
    untimed call of the same function: the first call after the other side pays for memory that side
    freed and the allocator gave back (measured: up to 15% on a 16 MB output), which would otherwise
    fall on whichever side runs second."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            fn()
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def reference_rates(n_el: int, device: str, repeat: int, clock, sync) -> tuple[float, float, float]:
    """(memcpy GB/s, eager floor cast+scale Melem/s, cast+scale+offset Melem/s), see the docstring.
    The floors use dequantize_blocks' chunk size and output allocation, so they compare like for like."""
    dev = torch.device(device)
    src = torch.rand(n_el, device=dev)
    codes = torch.randint(-8, 8, (n_el // 32, 32), dtype=torch.int8, device=dev)
    scale = torch.rand(n_el // 32, 1, device=dev)
    step = CHUNK_ELEMS.get(dev.type, CHUNK_ELEMS["cuda"]) // 32

    def memcpy():
        out = empty_output((n_el,), torch.float32, dev)
        for s, e in chunks(n_el, step * 32):
            out[s:e].copy_(src[s:e])
        sync()

    def floor(offset: bool):
        out = empty_output((n_el // 32, 32), torch.float32, dev)
        for s, e in chunks(n_el // 32, step):
            o = out[s:e]
            o.copy_(codes[s:e]).mul_(scale[s:e])
            if offset:
                o.sub_(scale[s:e])
        sync()
    return (8 * n_el / best_time(memcpy, repeat, clock) / 1e9,
            n_el / best_time(lambda: floor(False), repeat, clock) / 1e6,
            n_el / best_time(lambda: floor(True), repeat, clock) / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="", help="comma-separated type names (default: all)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import gguf.quants
        from gguf.constants import GGMLQuantizationType
    except ImportError:
        gguf = None
    wanted = {s.strip().upper() for s in args.types.split(",") if s.strip()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"tensor {args.rows}x{args.cols}, {args.clock} clock, best of {args.repeat}")
    n_el = args.rows * args.cols
    memcpy_gbs, floor2, floor3 = reference_rates(n_el, args.device, args.repeat, clock, sync)
    print(f"memcpy (f32 -> fresh f32): {memcpy_gbs:.1f} GB/s = {memcpy_gbs / 8 * 1e3:.0f} Melem/s; "
          f"eager floor: int8 cast + scale {floor2:.0f} Melem/s, + offset {floor3:.0f} Melem/s")
    print(f"{'type':8} {'quantload Melem/s':>18} {'gguf-py Melem/s':>16} {'ratio':>7} {'GB/s':>6} "
          f"{'%memcpy':>8} {'5x needs':>9}")
    for tid in supported_types():
        t = GGML_TYPES[tid]
        if wanted and t.name not in wanted:
            continue
        blocks = random_blocks(tid, n_el // t.block_size).reshape(args.rows, -1)
        dev_blocks = blocks.to(args.device)

        def ours(tid=tid, dev_blocks=dev_blocks):
            dequantize_blocks(tid, dev_blocks)
            sync()
        fns = [ours]
        if gguf is not None and t.name in GGMLQuantizationType.__members__:
            qtype = GGMLQuantizationType[t.name]
            arr = blocks.numpy()
            try:
                gguf.quants.dequantize(arr[:1], qtype)
                fns.append(lambda arr=arr, qtype=qtype: gguf.quants.dequantize(arr, qtype))
            except NotImplementedError:
                pass
        rates = [n_el / tm / 1e6 for tm in best_times(fns, args.repeat, clock)]
        ours_rate, ref_rate = rates[0], (rates[1] if len(rates) > 1 else float("nan"))
        ratio = ours_rate / ref_rate
        bytes_per_el = t.type_size / t.block_size + 4             # blocks read + float32 written
        gbs = ours_rate * bytes_per_el / 1e3
        need = 5 * ref_rate * bytes_per_el / 1e3 / memcpy_gbs
        if t.name == "F32":
            need = float("nan")   # gguf-py returns a view of the bytes; we copy
        note = "  (gguf-py returns a view of the bytes; we copy)" if t.name == "F32" else ""
        print(f"{t.name:8} {ours_rate:18.0f} {ref_rate:16.0f} {ratio:7.1f} {gbs:6.1f} "
              f"{gbs / memcpy_gbs:8.0%} {need:9.0%}{note}", flush=True)


if __name__ == "__main__":
    main()
