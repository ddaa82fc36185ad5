"""Model loads (and greedy decodes), one per fresh worker process, for quantload and transformers.

Every runner imports what its side needs (torch, transformers, plus quantload or bitsandbytes) before
the clock starts, records that import baseline, then times the load call alone, from just before it to
a runnable model. Peak RSS is the process's ru_maxrss after the load (it includes the imports, which
are reported separately as import_rss).
"""
from __future__ import annotations

import itertools
import resource
import sys
import time

from . import inputs

DECODE_TOKENS = 20


def _peak_rss() -> int:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss may carry the parent's size over
    the exec that started this worker). quantload.report.peak_rss_bytes does the same, but importing
    quantload here would load it into the alternative's workers and their import baseline."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure(import_side, load, model_bytes, *, decode: bool, decode_tokens: int = DECODE_TOKENS) -> dict:
    t = time.perf_counter()
    import_side()
    out = {"import_s": time.perf_counter() - t, "import_rss": _current_rss()}
    t0 = time.perf_counter()
    model = load()
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = _peak_rss()
    out["model_bytes"] = model_bytes(model)
    if decode:
        try:
            # the prompt's tokenizer comes after the load's figures: it is not part of either side's load
            out.update(greedy_decode(model, _prompt_ids(), decode_tokens))
            out["peak_rss_decode"] = _peak_rss()   # with what the first forwards add (repacked kernels, KV cache)
        except Exception as e:  # keep the load figures; the decode row shows the error
            out["tokens_per_s.error"] = f"{type(e).__name__}: {e}"
    return out


def _prompt_ids():
    """The same prompt ids on both sides (the bf16 checkpoint's tokenizer; the vocab is the GGUF's)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(inputs.bf16_dir())(inputs.PROMPT, return_tensors="pt")["input_ids"]


def greedy_decode(model, ids, n: int = DECODE_TOKENS) -> dict:
    """Tokens/s of a greedy decode of exactly n new tokens, after a 2-token warm-up (first-call costs)."""
    import torch
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return {"tokens_per_s": len(new) / dt, "decode_s": dt, "tokens": new}


# --- the two sides' imports and byte counts -------------------------------------------------------
def _import_transformers_core():
    """What every load needs from transformers, imported before the clock on BOTH sides: the model
    base class pulls in ~4 s of modules (core_model_loading, integrations) that bitsandbytes' import
    happens to load on the alternative's side, so without this the quantload side would pay them inside
    its timed load and the transformers side outside."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def _import_quantload():
    _import_transformers_core()  # quantload builds transformers models: same baseline as the alternative
    import quantload  # noqa: F401


def _import_transformers(bnb: bool = False):
    _import_transformers_core()
    if bnb:
        import bitsandbytes  # noqa: F401


def _quantload_bytes(model) -> int:
    return int(model.load_report.model_bytes)


def _hf_bytes(model) -> int:
    """Bytes held by parameters and buffers (each storage once: tied weights count once), plus the
    bitsandbytes quant_state tensors (absmax, code, nested state) of 4-bit parameters."""
    import torch
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in itertools.chain(model.parameters(), model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            add(qs.absmax)
            add(qs.code)
            qs = getattr(qs, "state2", None)
    return total


def _ql_load(path, fast_kernels: bool = False, **kw):
    def load():
        import quantload
        from quantload.runtime import kernels
        kernels.set_fast_kernels(fast_kernels)  # opt-in packed bf16 kernels (decode cases), repacked at load
        return quantload.load(path, progress=False, **kw)
    return load


# --- runners: quantload -----------------------------------------------------------------------------
def ql_gguf_smollm2() -> dict:
    return _measure(_import_quantload, _ql_load(inputs.smollm2_gguf()), _quantload_bytes, decode=True)


def ql_gguf_decode() -> dict:
    """GGUF Q4_1 on the opt-in packed kernels (Q4_1 maps onto torch's int4pack; repacked on first forward)."""
    return _measure(_import_quantload, _ql_load(inputs.smollm2_gguf(), fast_kernels=True), _quantload_bytes,
                    decode=True)


def ql_gguf_q4_k_decode() -> dict:
    """SmolLM2 Q4_K_M as llama.cpp quantizes it (inputs.build_q4_k), packed kernels on."""
    return _measure(_import_quantload, _ql_load(inputs.q4_k_gguf(), fast_kernels=True), _quantload_bytes,
                    decode=True)


def ql_gguf_gemma() -> dict:
    return _measure(_import_quantload, _ql_load(inputs.gemma_gguf()), _quantload_bytes, decode=False)


def ql_nf4_quantize_load() -> dict:
    return _measure(_import_quantload, _ql_load(inputs.bf16_dir(), quantize="nf4"), _quantload_bytes,
                    decode=False)


def ql_nf4_prequantized() -> dict:
    """The checkpoint's own dtype (bf16), as a user gets it by default."""
    return _measure(_import_quantload, _ql_load(inputs.nf4_dir()), _quantload_bytes, decode=False)


def ql_nf4_decode() -> dict:
    """Float32 compute (this CPU has no fast bf16 matmul); the NF4 checkpoint stores compute dtype float32."""
    return _measure(_import_quantload, _ql_load(inputs.nf4_dir(), fast_kernels=True, dtype="float32"),
                    _quantload_bytes, decode=True)


def ql_int4() -> dict:
    """int4 affine, symmetric, group 64: SmolLM2's 576-wide layers take no group of 128 (quantize="int4"
    leaves all but down_proj dense there), 64 divides every one of its layer widths."""
    from quantload.schemes.affine import ct_config
    return _measure(_import_quantload, _ql_load(inputs.bf16_dir(), quantize=ct_config(4, group_size=64),
                                                fast_kernels=True, dtype="float32"), _quantload_bytes, decode=True)


def ql_awq() -> dict:
    """The AWQ GEMM checkpoint of inputs.build_awq (4-bit, group 64), packed kernels on."""
    return _measure(_import_quantload, _ql_load(inputs.awq_dir(), fast_kernels=True, dtype="float32"),
                    _quantload_bytes, decode=True)


def ql_dense() -> dict:
    return _measure(_import_quantload, _ql_load(inputs.bf16_dir(), dtype="float32"), _quantload_bytes,
                    decode=True)


# --- runners: transformers (+ bitsandbytes) -------------------------------------------------------------
def _hf_gguf(path) -> dict:
    def load():
        import torch
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return load


def hf_gguf_smollm2() -> dict:
    return _measure(_import_transformers, _hf_gguf(inputs.smollm2_gguf()), _hf_bytes, decode=True)


def hf_gguf_gemma() -> dict:
    return _measure(_import_transformers, _hf_gguf(inputs.gemma_gguf()), _hf_bytes, decode=False)


def hf_nf4_quantize_load() -> dict:
    def load():
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(inputs.bf16_dir(), quantization_config=qc,
                                                    dtype=torch.bfloat16)
    return _measure(lambda: _import_transformers(bnb=True), load, _hf_bytes, decode=False)


def _hf_nf4(**kw):
    def load():
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(inputs.nf4_dir(), **kw)
    return load


def hf_nf4_prequantized() -> dict:
    return _measure(lambda: _import_transformers(bnb=True), _hf_nf4(), _hf_bytes, decode=False)


def hf_nf4_decode() -> dict:
    """dtype=float32 as asked of quantload (transformers keeps the unquantized bf16 tensors in bf16 anyway;
    bitsandbytes computes in the stored compute dtype, float32)."""
    import torch
    return _measure(lambda: _import_transformers(bnb=True), _hf_nf4(dtype=torch.float32), _hf_bytes, decode=True)


def hf_dense() -> dict:
    def load():
        import torch
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(inputs.bf16_dir(), dtype=torch.float32)
    return _measure(_import_transformers, load, _hf_bytes, decode=True)
