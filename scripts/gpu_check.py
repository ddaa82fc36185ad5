"""The CUDA checks, run where a GPU is at hand (CI has none): `python scripts/gpu_check.py kernels` and
`python scripts/gpu_check.py model PATH.gguf`. Each prints one line per check (PASS / FAIL / INFO) and
writes what it measured as JSON to $OUT (or the current directory); exit 1 when a check fails.

kernels: every GGUF block type and every fixture decodes on CUDA bit for bit as on the CPU (the same
torch code), quantizing on CUDA writes the CPU's bytes, the pinned staging copies are exact.
model: a real model (SmolLM2 Q4_1 GGUF, and the same weights quantized to NF4 while loading) split
across GPU, CPU and disk generates the same greedy tokens as the model loaded whole on the GPU.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

#: "cpu" runs the same flow without a GPU (a dry run of the script itself; the splits then only use cpu/disk)
DEV = os.environ.get("QL_GPU_CHECK_DEVICE", "cuda")
GPU0 = 0 if DEV == "cuda" else "cpu"
RESULTS: dict = {"checks": []}
FAILED = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    if not ok:
        FAILED.append(name)


def info(name: str, detail) -> None:
    print(f"INFO {name} {detail}", flush=True)
    RESULTS[name] = detail


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.numel() else True


def hwm_mib() -> int:
    from quantload.report import peak_rss_bytes
    return peak_rss_bytes() >> 20


def rss_mib() -> int:
    from quantload.report import current_rss_bytes
    return current_rss_bytes() >> 20


# --- kernels ----------------------------------------------------------------------------------------
def kernels() -> None:
    from quantload.schemes.base import QTensor
    from quantload.transfer import Staging
    dev = torch.device(DEV)

    from quantload.schemes.gguf.dequant import dequantize_blocks, supported_types, type_name
    from quantload.schemes.gguf.samples import random_blocks
    bad = []
    for t in supported_types():
        blocks = random_blocks(t, 512, seed=t)
        if not same_bits(dequantize_blocks(t, blocks), dequantize_blocks(t, blocks.to(dev))):
            bad.append(type_name(t))
    check("gguf dequantize CUDA == CPU, every type", not bad, f"{len(supported_types())} types; differ: {bad}")

    import quantload
    from test_read_state_dict import fixture_config
    fixtures = ROOT / "tests" / "fixtures"
    bad, n = [], 0
    for j in sorted(fixtures.glob("*.json")):
        name = j.name[:-5]
        try:
            sd = quantload.read_state_dict(fixtures / f"{name}.safetensors",
                                           quantization_config=fixture_config(json.loads(j.read_text()), name))
            qt = sd["layer.weight"]
            g = QTensor(qt.scheme, {k: v.to(dev) for k, v in qt.data.items()}, qt.shape, qt.dtype, qt.meta)
            ref = qt.dequantize(torch.float32)
            if not same_bits(ref, g.dequantize(torch.float32)):
                bad.append(name)
            x = torch.randn(3, qt.shape[1], generator=torch.Generator().manual_seed(0))
            y_cpu = qt.scheme.linear(x.to(qt.dtype), qt.scheme.prepare_runtime(qt), None).float()
            y_gpu = g.scheme.linear(x.to(qt.dtype).to(dev), g.scheme.prepare_runtime(g), None).float().cpu()
            if not torch.allclose(y_cpu, y_gpu, rtol=2e-2, atol=2e-2 * y_cpu.abs().max().item()):
                bad.append(f"{name} (linear)")
            n += 1
        except Exception as e:  # noqa: BLE001 -- report every fixture
            bad.append(f"{name}: {type(e).__name__}: {e}")
    check("fixtures decode on CUDA == CPU, linear close", not bad, f"{n} fixtures; bad: {bad}")

    from quantload.config import resolve_quantize
    bad, names = [], ["nf4", "nf4-nodq", "fp4", "int8", "int4", "int4-asym", "int4-channel", "int8-channel",
                      "int8-group"]
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for name in names:
        try:
            scheme = resolve_quantize(name).scheme_for("layer", None)
            a, b = scheme.quantize(w), scheme.quantize(w.to(dev))
            diff = [k for k in a.data if not same_bits(a.data[k], b.data[k])]
            if diff or not same_bits(a.dequantize(torch.float32), b.dequantize(torch.float32)):
                bad.append(f"{name}: {diff}")
        except Exception as e:  # noqa: BLE001
            bad.append(f"{name}: {type(e).__name__}: {e}")
    check("quantize on CUDA writes the CPU's bytes", not bad, f"{names}; bad: {bad}")

    s = Staging(slot_bytes=1 << 20, slots=2)
    src = torch.randn(5 << 20, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)  # 10 MiB: 10 slots
    moved = s.to(src, dev)
    cast = s.to(src, dev, torch.float32)
    cuda_sync()
    s.close()
    check("pinned staging: multi-slot copy and cast exact",
          same_bits(moved, src) and same_bits(cast, src.float()) and moved.device.type == dev.type,
          f"staged {s.staged_bytes >> 20} MiB through 2 x 1 MiB slots")

    try:
        import transformers
        from quantload.runtime import kernels as fast
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
            ids = torch.tensor([[1, 5, 9, 33, 2, 7]], device=dev)
            out = {}
            for on in (False, True):
                fast.set_fast_kernels(on)
                m = quantload.load(d, quantize="int4-channel", device_map=DEV, progress=False)
                with torch.no_grad():
                    out[on] = m(ids).logits.float().cpu()
            fast.set_fast_kernels(False)
        err = (out[True] - out[False]).abs().max().item() / out[False].abs().max().item()
        info("fast kernels on CUDA: int4 logits vs exact path (max rel diff)", f"{err:.2e}")
    except Exception as e:  # noqa: BLE001 -- informational
        info("fast kernels on CUDA", f"not run: {type(e).__name__}: {e}")


# --- model ------------------------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
NEW_TOKENS = 12


def input_device(model) -> torch.device:
    """Where the model computes: the offloader's compute device, else its first loaded parameter's."""
    off = getattr(model, "offloader", None)
    return off.compute if off is not None else next(p.device for p in model.parameters() if not p.is_meta)


def greedy(model, tok) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt")["input_ids"].to(input_device(model))
            g = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               temperature=None, top_p=None, top_k=None, pad_token_id=0)
            out.append(g[0, ids.shape[1]:].tolist())
    return out


def where_is(model) -> dict:
    counts: dict = {}
    for _, dv in getattr(model, "device_plan", None).device_map.items() if getattr(model, "device_plan", None) \
            else []:
        counts[str(dv)] = counts.get(str(dv), 0) + 1
    return counts


def split_map(n_layers: int) -> dict:
    third = n_layers // 3
    m = {"model.embed_tokens": GPU0, "model.norm": GPU0, "model.rotary_emb": GPU0, "lm_head": GPU0}
    for i in range(n_layers):
        m[f"model.layers.{i}"] = GPU0 if i < third else ("cpu" if i < 2 * third else "disk")
    return m


def cuda_sync(reset: bool = False) -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()


def model(gguf: str) -> None:
    import quantload
    tok = quantload.load_tokenizer(gguf)
    off = tempfile.mkdtemp()

    def run(label, path, **kw):
        cuda_sync(reset=True)
        t0, r0 = time.perf_counter(), rss_mib()
        m = quantload.load(path, progress=False, **kw)
        cuda_sync()
        dt = time.perf_counter() - t0
        toks = greedy(m, tok)
        info(f"{label}", {"load_s": round(dt, 2), "host_rss_before_mib": r0, "host_peak_mib": hwm_mib(),
                          "gpu_peak_mib": torch.cuda.max_memory_allocated() >> 20 if DEV == "cuda" else None,
                          "model_mib": round(m.load_report.model_bytes / 2**20, 1), "placed": where_is(m),
                          "text": [tok.decode(t) for t in toks]})
        del m
        cuda_sync(reset=True)
        return toks

    n_layers = 30
    whole = run("gguf whole on cuda", gguf, device_map=DEV)
    split = run("gguf split gpu/cpu/disk (dict)", gguf, device_map=split_map(n_layers), offload_folder=off + "/a")
    check("GGUF Q4_1: gpu/cpu/disk split generates the whole model's tokens", split == whole)
    # 300 MiB on the GPU: 84 MiB prefill activations + the KV cache of all 30 layers (4096 tokens) are
    # reserved there, room is left for about a third of the layers; the CPU takes 30 MiB, disk the rest
    auto = run("gguf auto, max_memory gpu 300MiB cpu 30MiB", gguf, device_map="auto",
               max_memory={GPU0: "300MiB", "cpu": "30MiB"} if DEV == "cuda" else {"cpu": "40MiB"},
               offload_folder=off + "/b")
    check("GGUF Q4_1: auto map under tight budgets generates the whole model's tokens", auto == whole)
    cpu = run("gguf whole on cpu", gguf, device_map="cpu")
    info("cpu whole == cuda whole (float rounding may differ)", cpu == whole)

    # the same weights as a float checkpoint, quantized to NF4 while loading (quantize on the GPU)
    fdir = tempfile.mkdtemp()
    m = quantload.load(gguf, dequantize=True, dtype=torch.bfloat16, progress=False)
    quantload.save(m, fdir)
    del m
    nf4_whole = run("bf16 -> nf4 while loading, whole on cuda", fdir, quantize="nf4", device_map=DEV)
    nf4_split = run("bf16 -> nf4 while loading, gpu/cpu/disk", fdir, quantize="nf4",
                    device_map=split_map(n_layers), offload_folder=off + "/c")
    check("NF4 on the fly: gpu/cpu/disk split generates the whole model's tokens", nf4_split == nf4_whole)
    # host memory while a float checkpoint streams to the GPU, in a fresh process (peaks are per process)
    r = subprocess.run([sys.executable, __file__, "stream", fdir], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OUT": tempfile.mkdtemp()})
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    size = sum(f.stat().st_size for f in pathlib.Path(fdir).glob("*.safetensors"))
    info("float checkpoint to the GPU: host memory", got if got else r.stderr[-2000:])
    check("float checkpoint streams to the GPU with host peak under half its size",
          bool(got) and got["peak_above_base_mib"] < size / 2**21, f"checkpoint {size >> 20} MiB")


def stream(fdir: str) -> None:
    import quantload
    import transformers.modeling_utils  # noqa: F401 -- the import baseline, before measuring
    if DEV == "cuda":  # the CUDA context and cuBLAS cost host memory whatever loads: not the load's
        x = torch.ones(64, 64, device=DEV)
        (x @ x).sum().item()
    # a first load pulls in the CUDA kernels it uses (lazily loaded code pages count as resident memory);
    # the second load, measured from a reset high-water mark, is what streaming the weights costs
    first_base = rss_mib()
    m = quantload.load(fdir, device_map=DEV, progress=False)
    first_peak = hwm_mib() - first_base
    del m
    cuda_sync(reset=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_mib()
    t0 = time.perf_counter()
    m = quantload.load(fdir, device_map=DEV, progress=False)
    cuda_sync()
    dt = time.perf_counter() - t0
    print(json.dumps({"load_s": round(dt, 2), "base_mib": base, "peak_mib": hwm_mib(),
                      "first_load_peak_above_base_mib": first_peak,
                      "peak_above_base_mib": hwm_mib() - base, "model_mib": m.load_report.model_bytes >> 20,
                      "workers": os.environ.get("QUANTLOAD_LOAD_WORKERS", "default")}))


def main(argv: list[str]) -> int:
    assert DEV != "cuda" or torch.cuda.is_available(), "no CUDA device"
    import transformers
    info("env", {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
                 "device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV})
    if argv[0] == "stream":  # a child of `model`: prints one JSON line
        stream(argv[1])
        return 0
    try:
        if argv[0] == "kernels":
            kernels()
        elif argv[0] == "model":
            model(argv[1])
        else:
            print(__doc__)
            return 2
    except Exception:  # noqa: BLE001 -- a crash is a failed check with its traceback
        traceback.print_exc()
        check(f"{argv[0]} ran to the end", False)
    out = pathlib.Path(os.environ.get("OUT", "."))
    (out / f"gpu_check_{argv[0]}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
