"""GGUF dequantization throughput: quantload's torch decoders vs gguf-py's numpy, same process.

    python bench/gguf_kernels.py [--rows 1024] [--cols 4096] [--threads N] [--device cpu|cuda] [--repeat 3]
                                 [--clock wall|cpu] [--types Q4_K,IQ2_XXS]

Each type decodes a rows x cols tensor laid out as GGUF stores it ([rows, row_bytes]); the table gives
million elements per second (best of --repeat) and the ratio. gguf-py is single-threaded numpy;
--threads sets torch's intra-op threads (default: torch's own choice). --clock cpu times process CPU
time instead of wall time: steadier on a shared machine (with one thread it excludes time spent
descheduled), meaningless with several threads.
"""
from __future__ import annotations

import argparse
import time

import torch

from quantload.ggml_types import GGML_TYPES
from quantload.schemes.gguf.dequant import dequantize_blocks, supported_types
from quantload.schemes.gguf.samples import random_blocks


def best_time(fn, repeat: int, clock=time.perf_counter) -> float:
    fn()  # warm-up (tables, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


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
    print(f"{'type':8} {'quantload Melem/s':>18} {'gguf-py Melem/s':>16} {'ratio':>7}")
    for tid in supported_types():
        t = GGML_TYPES[tid]
        if wanted and t.name not in wanted:
            continue
        n_el = args.rows * args.cols
        blocks = random_blocks(tid, n_el // t.block_size).reshape(args.rows, -1)
        dev_blocks = blocks.to(args.device)

        def ours():
            dequantize_blocks(tid, dev_blocks)
            sync()
        ours_rate = n_el / best_time(ours, args.repeat, clock) / 1e6
        ref_rate = float("nan")
        if gguf is not None and t.name in GGMLQuantizationType.__members__:
            qtype = GGMLQuantizationType[t.name]
            arr = blocks.numpy()
            try:
                gguf.quants.dequantize(arr[:1], qtype)
                ref_rate = n_el / best_time(lambda: gguf.quants.dequantize(arr, qtype), args.repeat, clock) / 1e6
            except NotImplementedError:
                pass
        ratio = ours_rate / ref_rate if ref_rate == ref_rate else float("nan")
        note = "  (gguf-py returns a view of the bytes; we copy)" if t.name == "F32" else ""
        print(f"{t.name:8} {ours_rate:18.0f} {ref_rate:16.0f} {ratio:7.1f}{note}", flush=True)


if __name__ == "__main__":
    main()
