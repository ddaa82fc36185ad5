"""Greedy decode with the packed kernels (runtime/kernels.py) against the exact path, the float32 dense
model and transformers + bitsandbytes NF4, all in one process, measured alternately:

    python -m bench.decode [--threads 1 2] [--tokens 16] [--repeats 3] [--models dense,int4,nf4,gguf,hf-nf4]

The kernels are opt-in: they are switched on before the loads (so eligible weights are marked; each is
repacked on its first fast forward, in the logits comparison below, before any timing), then
every quantized model runs twice per round, with the fast kernels and with the exact path
(`set_fast_kernels(False)`: dequantize, then F.linear). Tokens/s is the median over the rounds of a
greedy decode of --tokens new tokens (after one warm-up per model). Ratios are taken within one thread
count of this run only: on a shared machine the absolute figures move with the load.

It also measures what the fast path changes: the logits of the 32 next-token predictions of a greedy
decode (the exact path's tokens fed to both paths, one token a step as in decoding) against the exact
path's, and whether the two greedy decodes give the same tokens. The models (SmolLM2-135M-Instruct):
the bf16 checkpoint quantized while loading with quantize="int4" (compressed-tensors, group 128) and
quantize="nf4", the GGUF Q4_1 file (its tied output layer is Q8_0), and the transformers +
bitsandbytes NF4 checkpoint of bench/inputs.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from . import inputs

MODELS = ("dense", "int4", "nf4", "gguf", "hf-nf4")


def load_model(name: str):
    import torch
    import quantload
    if name == "dense":
        return quantload.load(inputs.bf16_dir(), dtype="float32", progress=False)
    if name == "int4":
        return quantload.load(inputs.bf16_dir(), quantize="int4", dtype="float32", progress=False)
    if name == "nf4":
        return quantload.load(inputs.bf16_dir(), quantize="nf4", dtype="float32", progress=False)
    if name == "gguf":
        return quantload.load(inputs.smollm2_gguf(), progress=False)
    if name == "hf-nf4":
        if not inputs.provenance(inputs.nf4_dir()):
            inputs.build_nf4()
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(inputs.nf4_dir(), dtype=torch.float32)
    raise ValueError(name)


def decode(model, ids, n: int, cpu: list | None = None) -> tuple[float, list[int]]:
    """(tokens/s by the wall clock, the new tokens); `cpu` receives tokens per second of process CPU
    time (user + system), which leaves out the time other processes held the core on a shared machine."""
    import torch
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        c0, t0 = time.process_time(), time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if cpu is not None:
        cpu.append(n / dc)
    return n / dt, out[0, ids.shape[1]:].tolist()


def stepwise_logits(model, seq, prompt_len: int):
    """Logits of every next-token prediction along `seq`, one token a step with the KV cache (a greedy
    decode's shape: one input row per step), after a prefill of the first prompt_len tokens."""
    import torch
    with torch.inference_mode():
        out = model(seq[:, :prompt_len], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prompt_len, seq.shape[1] - 1):
            out = model(seq[:, t:t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(logits).float()


def logits_diff(model, ids, n: int) -> dict:
    """Fast vs exact logits over a greedy decode of n tokens (the exact path's tokens fed to both)."""
    import torch
    from quantload.runtime import kernels
    kernels.set_fast_kernels(False)
    _, toks = decode(model, ids, n)
    seq = torch.cat([ids, torch.tensor([toks])], 1)
    exact = stepwise_logits(model, seq, ids.shape[1])
    kernels.set_fast_kernels(True)
    fast = stepwise_logits(model, seq, ids.shape[1])
    d = (fast - exact).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "exact_std": exact.std().item(),
            "top1_agree": (fast.argmax(-1) == exact.argmax(-1)).float().mean().item(), "positions": len(exact)}


def packed_summary(model) -> dict:
    from quantload.runtime import kernels
    from quantload.runtime.modules import QLinear, qtensors_of
    kinds, extra = {}, 0
    for _, mod in qtensors_of(model):
        if not isinstance(mod, QLinear):
            continue
        k = mod.qweight.meta.get(kernels.FAST_KEY)
        label = k.describe() if k is not None else "exact: " + (mod.qweight.meta.get(kernels.SKIP_KEY) or "not packed")
        kinds[label] = kinds.get(label, 0) + 1
    seen = set()
    for _, mod in qtensors_of(model):
        k = mod.qweight.meta.get(kernels.FAST_KEY)
        if k is not None and id(k) not in seen:
            seen.add(id(k))
            extra += k.nbytes
    return {"layers": kinds, "packed_bytes": extra}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from quantload.runtime import kernels

    names = [m for m in a.models.split(",") if m]
    if "hf-nf4" in names and not inputs.installed("bitsandbytes"):
        names.remove("hf-nf4")
    tok = AutoTokenizer.from_pretrained(inputs.bf16_dir())
    ids = tok(inputs.PROMPT, return_tensors="pt")["input_ids"]

    models, out = {}, {"threads": {}, "logits": {}, "packed": {}, "tokens_same": {}}
    kernels.set_fast_kernels(True)            # opt-in: on while loading, so eligible weights are repacked
    for name in names:
        t0 = time.perf_counter()
        models[name] = load_model(name)
        print(f"loaded {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    variants = []
    for name in names:
        quantized = name not in ("dense", "hf-nf4")
        variants += [(name, "fast"), (name, "exact")] if quantized else [(name, "-")]
        if quantized:   # weights are repacked on their first fast forward: summarize after one
            out["logits"][name] = logits_diff(models[name], ids, 32)
            out["packed"][name] = packed_summary(models[name])
    torch.set_num_threads(a.threads[0])
    for name, path in variants:                          # warm-up (first-call costs)
        kernels.set_fast_kernels(path != "exact")
        decode(models[name], ids, 2)
    speeds = {t: {v: [] for v in variants} for t in a.threads}
    cpu_speeds = {t: {v: [] for v in variants} for t in a.threads}
    tokens = {}
    for r in range(a.repeats):
        for t in a.threads:
            torch.set_num_threads(t)
            for v in variants:
                kernels.set_fast_kernels(v[1] != "exact")
                tps, toks = decode(models[v[0]], ids, a.tokens, cpu_speeds[t][v])
                speeds[t][v].append(tps)
                tokens[v] = toks
        print(f"round {r + 1}/{a.repeats} done", flush=True)
    kernels.set_fast_kernels(True)
    for name in names:
        if (name, "fast") in tokens:
            out["tokens_same"][name] = tokens[(name, "fast")] == tokens[(name, "exact")]
    for t in a.threads:
        med = {f"{n} {p}".strip(" -"): statistics.median(s) for (n, p), s in speeds[t].items()}
        out["threads"][t] = med
        out.setdefault("cpu_threads", {})[t] = {f"{n} {p}".strip(" -"): statistics.median(s)
                                                for (n, p), s in cpu_speeds[t].items()}
    print_report(out, names)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


def _ratio(v, ref, width: int) -> str:
    return f"{v / ref:{width}.2f}" if ref else " " * width


def print_report(out: dict, names) -> None:
    for t, med in out["threads"].items():
        cpu = out.get("cpu_threads", {}).get(t, {})
        print(f"\n## torch threads = {t}: greedy decode tokens/s (median); by the wall clock, then per CPU second")
        dense, hf = med.get("dense"), med.get("hf-nf4")
        cdense, chf = cpu.get("dense"), cpu.get("hf-nf4")
        print(f"{'model/path':18s} {'tok/s':>7s} {'x dense':>8s} {'x hf-nf4':>9s} | {'cpu tok/s':>9s} {'x dense':>8s} "
              f"{'x hf-nf4':>9s}")
        for k, v in med.items():
            c = cpu.get(k)
            row = f"{k:18s} {v:7.2f} {_ratio(v, dense, 8)} {_ratio(v, hf, 9)} |"
            if c:
                row += f" {c:9.2f} {_ratio(c, cdense, 8)} {_ratio(c, chf, 9)}"
            print(row)
    print("\n## fast vs exact logits (32 greedy decode steps)")
    for name, d in out["logits"].items():
        print(f"{name:6s} max |diff| {d['max_abs']:.4f}  mean |diff| {d['mean_abs']:.4f}  "
              f"(exact logits std {d['exact_std']:.2f})  top-1 agree {d['top1_agree']:.3f} over {d['positions']} "
              f"steps; greedy tokens same: {out['tokens_same'].get(name)}")
    print("\n## what runs")
    for name, s in out["packed"].items():
        print(f"{name:6s} {s['layers']}  packed kernels hold {s['packed_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
