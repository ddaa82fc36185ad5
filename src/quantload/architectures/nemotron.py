"""nemotron (Nemotron-3/4, Minitron): GGUF architecture `nemotron`.

A llama-shaped decoder with "LayerNorm1P" norms (transformers adds 1 to the weight in forward; the
converter stores `w + 1`, so each norm weight gets -1 on load, biases as they are), partial NEOX RoPE
(no row permutation) and a two-matrix squared-ReLU MLP (`up_proj`, `down_proj`).
"""
from __future__ import annotations

from .base import TensorRule
from .layernorm import LayerNormDecoderFamily, decoder_kwargs


class NemotronFamily(LayerNormDecoderFamily):
    gguf_archs = ("nemotron",)
    model_types = ("nemotron",)
    eps_attr = "norm_eps"
    norm_offset = -1.0

    def config_class(self, meta):
        from transformers import NemotronConfig
        return NemotronConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = decoder_kwargs(meta, shapes, self.eps_attr)
        kwargs.setdefault("partial_rotary_factor", 1.0)
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in shapes
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
        kwargs["hidden_act"] = "relu2"
        return kwargs, []

    def mlp_rules(self, config):
        hidden, ff = config.hidden_size, config.intermediate_size
        rules = [TensorRule("blk.{bid}.ffn_up.weight", "model.layers.{bid}.mlp.up_proj.weight", (ff, hidden)),
                 TensorRule("blk.{bid}.ffn_down.weight", "model.layers.{bid}.mlp.down_proj.weight", (hidden, ff))]
        if config.mlp_bias:
            rules += [TensorRule("blk.{bid}.ffn_up.bias", "model.layers.{bid}.mlp.up_proj.bias", (ff,)),
                      TensorRule("blk.{bid}.ffn_down.bias", "model.layers.{bid}.mlp.down_proj.bias", (hidden,))]
        return rules
