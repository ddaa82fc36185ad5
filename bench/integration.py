"""The two ways into quantload, side by side: `quantload.load(path, quantize=...)` and transformers'
`AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantloadConfig(quantize=...))`.

Each way runs in a fresh process (so neither sees the other's imports or memory), several times; a run
reports the wall time of the call, the imports it needs (torch + quantload, + transformers for the second way)
timed apart, and the process's peak RSS (VmHWM: the kernel's high-water mark of this process alone).

    python -m bench.integration [--path CHECKPOINT] [--quantize nf4] [--repeats 3] [--json out.json]

Default checkpoint: the bench's bf16 SmolLM2-135M-Instruct (bench/inputs.py builds it once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WAYS = ("quantload.load", "from_pretrained+QuantloadConfig")


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(way: str, path: str, quantize: str) -> dict:
    """One load in this (fresh) process."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import quantload
    if way == WAYS[1]:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM
        config = quantload.QuantloadConfig(quantize=quantize, progress=False)
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    if way == WAYS[0]:
        model = quantload.load(path, quantize=quantize, progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    seconds = time.perf_counter() - t1
    return {"way": way, "seconds": seconds, "import_seconds": t_import, "total_seconds": t_import + seconds,
            "peak_rss": _vmhwm(),
            "model_bytes": model.get_memory_footprint(), "load_peak_above_start": model.load_report.peak_above_start}


def _run_one(way: str, path: str, quantize: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), _src()) if p))
    # run as a module from the repository root: bench/ itself on sys.path would shadow packages that
    # transformers imports (bench/kernels.py vs the `kernels` package)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.integration", "--worker", way, "--path", path,
                          "--quantize", quantize], capture_output=True, text=True, env=env, check=False, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _src() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _default_path() -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import inputs
    d = inputs.bf16_dir()
    if not (d / "model.safetensors").exists():
        raise SystemExit(f"no bf16 checkpoint at {d}: run the bench once (python -m bench) or pass --path")
    return str(d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default=None)
    p.add_argument("--quantize", default="nf4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the runs and medians here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.path, a.quantize)))
        return 0
    path = os.path.abspath(a.path) if a.path else _default_path()
    runs = {w: [] for w in WAYS}
    for _ in range(a.repeats):
        for w in WAYS:  # interleaved, so drift on a shared machine hits both ways alike
            runs[w].append(_run_one(w, path, a.quantize))
    summary = {}
    for w, rs in runs.items():
        summary[w] = {k: statistics.median(r[k] for r in rs)
                      for k in ("seconds", "import_seconds", "total_seconds", "peak_rss", "model_bytes")}
        s = summary[w]
        print(f"{w:<34} imports + load {s['total_seconds']:.2f} s (load alone {s['seconds']:.2f} s; quantload.load "
              f"imports transformers inside), peak RSS "
              f"{s['peak_rss'] / 2**20:.0f} MiB, weights {s['model_bytes'] / 2**20:.1f} MiB "
              f"(median of {len(rs)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"path": path, "quantize": a.quantize, "runs": runs, "median": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
