"""Mixtral (8x7B, 8x22B) and other llama-architecture files with experts: GGUF architecture `llama`
with `llama.expert_count` > 0, as llama.cpp's converter writes Mixtral (its `block_sparse_moe` experts
stacked into `ffn_{gate,up,down}_exps`, the router `ffn_gate_inp`; Q/K rows permuted as for llama).

This family takes over the `llama` architecture and is LlamaFamily for files without experts; with
experts it builds a MixtralConfig (llama.cpp's llama MoE renormalizes the top-k weights, as Mixtral does;
the experts' size is `expert_feed_forward_length`, else `feed_forward_length`).
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import TensorRule
from .llama import LlamaFamily
from .moe import expert_rules, moe_writer_unsupported
from .qwen_moe import moe_kwargs


def _has_experts(meta) -> bool:
    return meta.arch_int("expert_count", 0) > 0


class MixtralFamily(LlamaFamily):
    gguf_archs = ("llama",)
    model_types = ("llama", "mistral", "mixtral")

    def config_class(self, meta):
        if _has_experts(meta):
            from transformers import MixtralConfig
            return MixtralConfig
        return super().config_class(meta)

    def config_kwargs(self, meta, shapes, read_tensor):
        if not _has_experts(meta):
            return super().config_kwargs(meta, shapes, read_tensor)
        kwargs = self.common_kwargs(meta, shapes)
        rope_dims = meta.arch_int("rope.dimension_count", kwargs["head_dim"])
        if rope_dims != kwargs["head_dim"]:
            raise UnsupportedError(f"partial RoPE ({rope_dims} of {kwargs['head_dim']} head dims) is not "
                                   "supported for llama", file=meta.file, key="llama.rope.dimension_count")
        for name in ("blk.0.attn_q.bias", "blk.0.ffn_gate_exps.bias", "rope_freqs.weight"):
            if name in shapes:
                raise UnsupportedError(f"a llama MoE file with {name} is not a Mixtral transformers can build",
                                       file=meta.file, key=name)
        moe = moe_kwargs(meta, shapes)
        kwargs.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
                      intermediate_size=moe["moe_intermediate_size"],
                      sliding_window=meta.arch_int("attention.sliding_window", None))
        return kwargs, []

    def mlp_rules(self, config):
        if getattr(config, "model_type", None) != "mixtral":
            return super().mlp_rules(config)
        e, hidden = config.num_local_experts, config.hidden_size
        return [TensorRule("blk.{bid}.ffn_gate_inp.weight", "model.layers.{bid}.mlp.gate.weight", (e, hidden))
                ] + expert_rules(e, hidden, config.intermediate_size)

    def fields_from_config(self, config, arch):
        if getattr(config, "model_type", None) == "mixtral":
            raise moe_writer_unsupported("mixtral")
        return super().fields_from_config(config, arch)
