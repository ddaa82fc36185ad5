"""gemma2 and gemma3 (text): GGUF architectures `gemma2`, `gemma3`.

llama.cpp stores every Gemma RMSNorm weight as `w + 1` (transformers adds the 1 in forward), so each
norm gets -1 on load. Gemma has four norms per block, not two. What llama.cpp hard-codes rather than
stores is rebuilt here the same way: the attention scale of the 27B models (hidden/heads instead of
head_dim, chosen by layer count), the 2- and 6-layer sliding-window patterns, gemma3's local RoPE base.
"""
from __future__ import annotations

import numpy as np

from ..errors import FileFormatError, UnsupportedError
from .base import f32, u32
from .decoder import DecoderFamily, hf_rope

# llama.cpp picks the 27B attention scale by layer count (LLM_TYPE_27B): 46 layers for gemma2, 62 for gemma3
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}


class _GemmaFamily(DecoderFamily):
    layer_norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    norm_offset = -1.0

    def gemma_kwargs(self, meta, shapes) -> dict:
        kwargs = self.common_kwargs(meta, shapes)
        layers, hidden, heads = kwargs["num_hidden_layers"], kwargs["hidden_size"], kwargs["num_attention_heads"]
        is_27b = layers == _LAYERS_27B[meta.arch]
        kwargs["query_pre_attn_scalar"] = hidden // heads if is_27b else kwargs["head_dim"]
        kwargs["attention_bias"] = False
        return kwargs

    def fields_from_config(self, config, arch):
        fields = super().fields_from_config(config, arch)
        expected_scalar = (config.hidden_size // config.num_attention_heads
                           if config.num_hidden_layers == _LAYERS_27B[arch] else config.head_dim)
        if config.query_pre_attn_scalar != expected_scalar:
            raise UnsupportedError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} cannot be written: "
                                   f"llama.cpp uses {expected_scalar} for {config.num_hidden_layers} layers",
                                   key="query_pre_attn_scalar")
        if config.sliding_window is not None:
            fields[f"{arch}.attention.sliding_window"] = u32(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None) is not None:
            fields[f"{arch}.final_logit_softcapping"] = f32(config.final_logit_softcapping)
        return fields


class Gemma2Family(_GemmaFamily):
    gguf_archs = ("gemma2",)
    model_types = ("gemma2",)

    def config_class(self, meta):
        from transformers import Gemma2Config
        return Gemma2Config

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.gemma_kwargs(meta, shapes)
        # llama.cpp's defaults when a file omits them: the Gemma 2 paper's caps and a 4096 window
        kwargs["attn_logit_softcapping"] = meta.arch_float("attn_logit_softcapping", 50.0)
        kwargs["final_logit_softcapping"] = meta.arch_float("final_logit_softcapping", 30.0)
        kwargs["sliding_window"] = meta.arch_int("attention.sliding_window", 4096)
        return kwargs, []

    def fields_from_config(self, config, arch):
        fields = super().fields_from_config(config, arch)
        if config.attn_logit_softcapping is not None:
            fields[f"{arch}.attn_logit_softcapping"] = f32(config.attn_logit_softcapping)
        return fields


class Gemma3Family(_GemmaFamily):
    gguf_archs = ("gemma3",)
    model_types = ("gemma3_text",)

    def config_class(self, meta):
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig

    def causal_lm_class(self, config):
        return "Gemma3ForCausalLM"

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.gemma_kwargs(meta, shapes)
        kwargs["rope_local_base_freq"] = meta.arch_float("rope.freq_base_swa", 10000.0)
        window = meta.arch_int("attention.sliding_window", None)
        kwargs["sliding_window"] = window
        pattern_key = "gemma3.attention.sliding_window_pattern"
        pattern = meta.fields.get(pattern_key)
        n = kwargs["num_hidden_layers"]
        if pattern is None:
            kwargs["sliding_window_pattern"] = 6    # llama.cpp: set_swa_pattern(6)
        elif isinstance(pattern, (list, np.ndarray)):
            if len(pattern) != n:
                raise FileFormatError(f"expected {n} per-layer flags, found {len(pattern)}", file=meta.file,
                                      key=pattern_key)
            kwargs["layer_types"] = ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
        else:
            kwargs["sliding_window_pattern"] = meta.int(pattern_key)
        if window is None:  # no window written: llama.cpp runs every layer with full attention
            kwargs["layer_types"] = ["full_attention"] * n
        kwargs["final_logit_softcapping"] = meta.arch_float("final_logit_softcapping", None)
        return kwargs, []

    def has_qk_norm(self, config):
        return True

    def fields_from_config(self, config, arch):
        fields = super().fields_from_config(config, arch)
        local = hf_rope(config, "sliding_attention")
        if local.get("rope_type", "default") != "default":
            raise UnsupportedError("scaled RoPE on sliding layers cannot be written for gemma3",
                                   key="rope_parameters")
        fields[f"{arch}.rope.freq_base_swa"] = f32(local.get("rope_theta", 10000.0))
        types = list(config.layer_types)
        default = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(len(types))]
        if types != default:
            fields[f"{arch}.attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
        return fields
