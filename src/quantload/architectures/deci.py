"""deci (DeciLM-7B, and Llama-3.1-Nemotron-51B/Ultra where every block is alike): GGUF architecture `deci`.

A Deci file is a llama one (the same tensor names and Q/K row permutation) whose head counts and FFN
widths may be per-layer arrays, with blocks that may have no attention or no FFN at all. transformers
has no Deci model class (its GGUF loader maps the keys but cannot build one), so a file whose blocks
are all alike becomes a LlamaForCausalLM, which computes what llama.cpp computes for it; per-layer
sizes that differ raise UnsupportedError (Metadata reads only uniform arrays), naming the key.
"""
from __future__ import annotations

from .llama import LlamaFamily


class DeciFamily(LlamaFamily):
    gguf_archs = ("deci",)
    model_types = ()          # a LlamaConfig is written back as `llama`

    def config_class(self, meta):
        from transformers import LlamaConfig
        return LlamaConfig
