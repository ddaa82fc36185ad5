"""stablelm (StableLM 2 1.6B/Zephyr, StableLM 3B 4E1T, StableCode): GGUF architecture `stablelm`.

A llama-shaped decoder with LayerNorms (weight + bias), partial NEOX RoPE (`rope.dimension_count`,
transformers' layout: no row permutation), optional Q/K/V biases and an optional parallel residual
(no `ffn_norm` then). The per-head Q/K LayerNorms of StableLM 2 12B (`attn_q_norm` [heads, head_dim])
are not mapped yet: such a file raises UnsupportedError.
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import u32
from .layernorm import LayerNormDecoderFamily, decoder_kwargs


class StableLmFamily(LayerNormDecoderFamily):
    gguf_archs = ("stablelm",)
    model_types = ("stablelm",)
    eps_attr = "layer_norm_eps"

    def config_class(self, meta):
        from transformers import StableLmConfig
        return StableLmConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        if "blk.0.attn_q_norm.weight" in shapes:
            raise UnsupportedError("stablelm with per-head Q/K LayerNorms (StableLM 2 12B) is not supported yet",
                                   file=meta.file, key="blk.0.attn_q_norm.weight")
        kwargs = decoder_kwargs(meta, shapes, self.eps_attr)
        del kwargs["head_dim"]                   # StableLmConfig derives it: hidden / heads
        kwargs.setdefault("partial_rotary_factor", 1.0)
        kwargs["use_qkv_bias"] = "blk.0.attn_q.bias" in shapes
        # the converter writes use_parallel_residual; transformers reads it from the missing ffn_norm
        parallel = bool(meta.fields.get("stablelm.use_parallel_residual", "blk.0.ffn_norm.weight" not in shapes))
        kwargs["use_parallel_residual"] = parallel
        kwargs["hidden_act"] = "silu"
        return kwargs, []

    def norm_rules(self, config):
        rules = super().norm_rules(config)
        if config.use_parallel_residual:   # one norm feeds both branches
            rules = [r for r in rules if ".ffn_norm." not in r.gguf]
        return rules

    def has_qkv_bias(self, config):
        return bool(config.use_qkv_bias)

    def has_o_bias(self, config):
        return False

    def fields_from_config(self, config, arch):
        fields = super().fields_from_config(config, arch)
        fields[f"{arch}.use_parallel_residual"] = bool(config.use_parallel_residual)
        return fields
