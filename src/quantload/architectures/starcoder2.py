"""starcoder2 (StarCoder2 3B/7B/15B): GGUF architecture `starcoder2`.

A llama-shaped decoder with LayerNorms (weight + bias), biases on every projection, and a two-matrix
GELU MLP (`c_fc`, `c_proj`). llama.cpp runs NEOX RoPE, transformers' layout: no row permutation. It has
no sliding window (transformers' config default is 4096), so none is set: llama.cpp attends to all.
"""
from __future__ import annotations

from .base import TensorRule
from .layernorm import LayerNormDecoderFamily, decoder_kwargs


class Starcoder2Family(LayerNormDecoderFamily):
    gguf_archs = ("starcoder2",)
    model_types = ("starcoder2",)
    eps_attr = "norm_epsilon"

    def config_class(self, meta):
        from transformers import Starcoder2Config
        return Starcoder2Config

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = decoder_kwargs(meta, shapes, self.eps_attr)
        kwargs["use_bias"] = "blk.0.attn_q.bias" in shapes
        kwargs["sliding_window"] = None
        kwargs["hidden_act"] = "gelu_pytorch_tanh"   # llama.cpp: ggml_gelu, the tanh approximation
        return kwargs, []

    def has_qkv_bias(self, config):
        return bool(config.use_bias)

    def has_o_bias(self, config):
        return bool(config.use_bias)

    def mlp_rules(self, config):
        hidden, ff = config.hidden_size, config.intermediate_size
        rules = [TensorRule("blk.{bid}.ffn_up.weight", "model.layers.{bid}.mlp.c_fc.weight", (ff, hidden)),
                 TensorRule("blk.{bid}.ffn_down.weight", "model.layers.{bid}.mlp.c_proj.weight", (hidden, ff))]
        if config.use_bias:
            rules += [TensorRule("blk.{bid}.ffn_up.bias", "model.layers.{bid}.mlp.c_fc.bias", (ff,)),
                      TensorRule("blk.{bid}.ffn_down.bias", "model.layers.{bid}.mlp.c_proj.bias", (hidden,))]
        return rules
