"""gpt-oss (openai/gpt-oss-20b, -120b) as llama.cpp's converter writes it: attention with biases and
per-head sinks (`attn_sinks`), alternating sliding-window / full layers (even layers slide, as both
llama.cpp and transformers build them), YaRN RoPE, a router with a bias (`ffn_gate_inp`), and experts
whose gate and up halves the converter de-interleaves into `ffn_gate_exps` / `ffn_up_exps` (MXFP4 blocks
in the released files), each with a bias. The experts run transformers' clamped SwiGLU (alpha 1.702,
limit 7), which is llama.cpp's SWIGLU_OAI.
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import TensorRule
from .decoder import DecoderFamily
from .moe import expert_rules, moe_writer_unsupported
from .qwen_moe import moe_kwargs


class GptOssFamily(DecoderFamily):
    gguf_archs = ("gpt-oss",)
    model_types = ("gpt_oss",)
    layer_norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}

    def config_class(self, meta):
        from transformers import GptOssConfig
        return GptOssConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.common_kwargs(meta, shapes)
        moe = moe_kwargs(meta, shapes)
        kwargs.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
                      intermediate_size=moe["moe_intermediate_size"], attention_bias=True)
        kwargs["sliding_window"] = meta.arch_int("attention.sliding_window")
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        scaling = kwargs.pop("rope_scaling", None)
        rope = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
        if scaling is not None:
            if scaling["rope_type"] != "yarn":
                raise UnsupportedError(f"gpt-oss with {scaling['rope_type']} RoPE scaling is not supported "
                                       "(released files use yarn)", file=meta.file, key="gpt-oss.rope.scaling.type")
            # transformers' gpt-oss YaRN does not truncate the correction range (the reference
            # implementation's rule); llama.cpp computes it the same way for this architecture
            rope.update(scaling, truncate=False)
        kwargs["rope_parameters"] = rope
        return kwargs, []

    def mlp_rules(self, config) -> list[TensorRule]:
        e, hidden = config.num_local_experts, config.hidden_size
        return [TensorRule("blk.{bid}.ffn_gate_inp.weight", "model.layers.{bid}.mlp.router.weight", (e, hidden)),
                TensorRule("blk.{bid}.ffn_gate_inp.bias", "model.layers.{bid}.mlp.router.bias", (e,)),
                ] + expert_rules(e, hidden, config.intermediate_size, bias=True)

    def attention_rules(self, config) -> list[TensorRule]:
        return super().attention_rules(config) + [
            TensorRule("blk.{bid}.attn_sinks.weight", "model.layers.{bid}.self_attn.sinks",
                       (config.num_attention_heads,))]

    def has_qkv_bias(self, config):
        return True

    def has_o_bias(self, config):
        return True

    def fields_from_config(self, config, arch):
        raise moe_writer_unsupported(arch)
