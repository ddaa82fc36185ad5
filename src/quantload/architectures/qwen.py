"""qwen2 (Qwen1.5/2/2.5: biases on Q/K/V) and qwen3 (QK RMSNorm, explicit head_dim). No row permutation:
llama.cpp runs these with NEOX-style RoPE, the transformers layout."""
from __future__ import annotations

from ..errors import UnsupportedError
from .decoder import DecoderFamily


class Qwen2Family(DecoderFamily):
    gguf_archs = ("qwen2",)
    model_types = ("qwen2",)

    def config_class(self, meta):
        from transformers import Qwen2Config
        return Qwen2Config

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.common_kwargs(meta, shapes)
        if "blk.0.attn_q.bias" not in shapes:
            raise UnsupportedError("qwen2 without Q/K/V biases is not a Qwen2 model transformers can build",
                                   file=meta.file, key="blk.0.attn_q.bias")
        if kwargs["head_dim"] == kwargs["hidden_size"] // kwargs["num_attention_heads"]:
            del kwargs["head_dim"]   # Qwen2Config has no such field; its attention derives it
        return kwargs, []

    def has_qkv_bias(self, config):
        return True

    def has_o_bias(self, config):
        return False


class Qwen3Family(DecoderFamily):
    gguf_archs = ("qwen3",)
    model_types = ("qwen3",)

    def config_class(self, meta):
        from transformers import Qwen3Config
        return Qwen3Config

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.common_kwargs(meta, shapes)
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in shapes
        return kwargs, []

    def has_qk_norm(self, config):
        return True

    def has_o_bias(self, config):
        return bool(getattr(config, "attention_bias", False))
