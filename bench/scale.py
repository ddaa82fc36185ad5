"""The scale series: synthetic llama-shaped checkpoints of growing size (inputs.SCALE_CONFIGS), written
once (random bf16 weights, sharded safetensors, SmolLM2's tokenizer and vocabulary), then loaded

- quantized to NF4 while loading: quantload.load(quantize="nf4") against transformers + bitsandbytes
  BitsAndBytesConfig(nf4), load seconds, peak RSS and greedy decode tok/s (packed kernels on);
- as GGUF Q4_0 after `quantload convert`: quantload.load(.gguf) against llama.cpp, the same figures
  (transformers' GGUF loader would dequantize 7B to float32, 27 GB: not a comparison this series can run).

`python -m bench --scale 1.5b` (or 1.5b,7b) adds these cases; they are heavy (a 7B checkpoint is 14 GB
of disk and its GGUF another 4 GB; check `df`) and never in the default run. The weights are random
(N(0, 0.02)): the figures are about bytes and shapes, not text. Each runner runs in a fresh worker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import inputs
from .loads import _hf_bytes, _import_quantload, _import_transformers, _measure, _peak_rss, _quantload_bytes

DECODE_TOKENS = 8
SHARD_BYTES = 2 << 30


# --- the inputs ---------------------------------------------------------------------------------------
def _tensors(c: dict):
    """(name, shape) of a LlamaForCausalLM with config c, untied head, in checkpoint order."""
    h, i, v, hd = c["hidden"], c["intermediate"], inputs.SCALE_VOCAB, c["hidden"] // c["heads"]
    yield "model.embed_tokens.weight", (v, h)
    for n in range(c["layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (c["kv_heads"] * hd, h)
        yield p + "self_attn.v_proj.weight", (c["kv_heads"] * hd, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def parameter_count(size: str) -> int:
    import math
    return sum(math.prod(s) for _, s in _tensors(inputs.SCALE_CONFIGS[size]))


def build_checkpoint(size: str) -> dict:
    """Write the bf16 checkpoint tensor by tensor (never the whole model in memory), in shards of at most
    SHARD_BYTES, with a model.safetensors.index.json, config.json and SmolLM2's tokenizer files."""
    out = inputs.scale_dir(size)
    made_by = f"bench.scale: random N(0, 0.02) bf16, {parameter_count(size) / 1e9:.2f} B parameters"
    if (out / inputs.PROVENANCE).is_file():
        return {"path": str(out), "made_by": made_by}
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig
    if not inputs.provenance(inputs.bf16_dir()):
        inputs.build_bf16()
    c = inputs.SCALE_CONFIGS[size]
    g = torch.Generator().manual_seed(0)
    with inputs._building(out) as tmp:
        shards, shard, shard_bytes, weight_map = [], {}, 0, {}

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                shards.append(name)
                weight_map.update({k: name for k in shard})
                shard, shard_bytes = {}, 0
        total = 0
        for name, shape in _tensors(c):
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            if shard_bytes + t.nbytes > SHARD_BYTES:
                flush()
            shard[name], shard_bytes = t, shard_bytes + t.nbytes
            total += t.nbytes
        flush()
        n = len(shards)   # the names transformers writes: model-0000k-of-0000n.safetensors
        final = {s: s.replace(".safetensors", f"-of-{n:05d}.safetensors") for s in shards}
        for s, f in final.items():
            os.replace(tmp / s, tmp / f)
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        cfg = LlamaConfig(vocab_size=inputs.SCALE_VOCAB, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                          num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                          num_key_value_heads=c["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
        cfg.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(inputs.bf16_dir()).save_pretrained(tmp)
        inputs._write_provenance(tmp, made_by)
    return {"path": str(out), "made_by": made_by}


def build_gguf(size: str) -> dict:
    """`quantload convert CHECKPOINT scale.gguf --quantize q4_0`, in its own process as a user runs it."""
    out = inputs.scale_gguf(size)
    made_by = "quantload convert --quantize q4_0"
    if out.is_file():
        return {"path": str(out), "made_by": made_by}
    src = inputs.scale_dir(size)
    if not (src / inputs.PROVENANCE).is_file():
        build_checkpoint(size)
    tmp = out.with_name(out.name + ".tmp.gguf")
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "quantload.cli", "convert", str(src), str(tmp), "--quantize", "q4_0"],
                       check=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "made_by": made_by, "convert_s": time.perf_counter() - t0}


# --- runners (fresh worker each; the size comes after the function's name in the runner's fn) ---------
def ql_nf4(size: str) -> dict:
    from .loads import _ql_load
    return _measure(_import_quantload, _ql_load(inputs.scale_dir(size), quantize="nf4", fast_kernels=True),
                    _quantload_bytes, decode=True, decode_tokens=DECODE_TOKENS)


def hf_nf4(size: str) -> dict:
    def load():
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(inputs.scale_dir(size), quantization_config=qc,
                                                    dtype=torch.bfloat16)
    return _measure(lambda: _import_transformers(bnb=True), load, _hf_bytes, decode=True,
                    decode_tokens=DECODE_TOKENS)


def ql_gguf(size: str) -> dict:
    from .loads import _ql_load
    return _measure(_import_quantload, _ql_load(inputs.scale_gguf(size), fast_kernels=True), _quantload_bytes,
                    decode=True, decode_tokens=DECODE_TOKENS)


def llama_gguf(size: str) -> dict:
    """llama.cpp: load (it maps the file: the pages its first forwards touch count in the peak RSS after
    decoding), then a greedy decode of DECODE_TOKENS after a 2-token warm-up, on inputs.bench_threads()."""
    from llama_cpp import Llama
    threads = inputs.bench_threads()
    t0 = time.perf_counter()
    llm = Llama(model_path=str(inputs.scale_gguf(size)), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    out = {"seconds": time.perf_counter() - t0, "peak_rss": _peak_rss(), "threads": threads}
    ids = llm.tokenize(inputs.PROMPT.encode(), add_bos=True, special=False)

    def decode(n):
        toks = []
        for t in llm.generate(ids, temp=0.0, reset=True):
            toks.append(int(t))
            if len(toks) == n:
                return toks
    decode(2)
    t0 = time.perf_counter()
    toks = decode(DECODE_TOKENS)
    out.update(tokens_per_s=DECODE_TOKENS / (time.perf_counter() - t0), tokens=toks, peak_rss_decode=_peak_rss(),
               model_bytes=inputs.scale_gguf(size).stat().st_size)   # llama.cpp maps the file: its bytes
    return out
