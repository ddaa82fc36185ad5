"""minimax-m2 (MiniMax-M2, M2.1) as llama.cpp's converter writes it: QK RMSNorm over the whole Q/K
projections (`attn_q_norm` [heads * head_dim], not per head), partial RoPE (`rope.dimension_count`, the
checkpoints' `rotary_dim`; NEOX layout, no row permutation), sigmoid routing with a per-expert score
correction bias (`exp_probs_b.bias`, transformers' `e_score_correction_bias` buffer) and experts stacked
in `ffn_{gate,up,down}_exps`."""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import TensorRule
from .decoder import DecoderFamily, head_dim_of, kv_heads_of
from .moe import expert_rules, moe_writer_unsupported
from .qwen_moe import moe_kwargs


class MiniMaxM2Family(DecoderFamily):
    gguf_archs = ("minimax-m2",)
    model_types = ("minimax_m2",)

    def config_class(self, meta):
        from transformers import MiniMaxM2Config
        return MiniMaxM2Config

    def config_kwargs(self, meta, shapes, read_tensor):
        gating = meta.arch_int("expert_gating_func", 2)
        if gating != 2:   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID; transformers' router is sigmoid only
            raise UnsupportedError(f"minimax-m2 with expert gating function {gating} is not supported (only 2, "
                                   "sigmoid, as MiniMax-M2 routes)", file=meta.file,
                                   key="minimax-m2.expert_gating_func")
        kwargs = self.common_kwargs(meta, shapes)
        moe = moe_kwargs(meta, shapes)
        kwargs.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
                      intermediate_size=moe["moe_intermediate_size"],
                      rotary_dim=meta.arch_int("rope.dimension_count", kwargs["head_dim"]))
        return kwargs, []

    def attention_rules(self, config):
        q_rows, kv_rows = config.num_attention_heads * head_dim_of(config), kv_heads_of(config) * head_dim_of(config)
        return super().attention_rules(config) + [
            TensorRule("blk.{bid}.attn_q_norm.weight", "model.layers.{bid}.self_attn.q_norm.weight", (q_rows,)),
            TensorRule("blk.{bid}.attn_k_norm.weight", "model.layers.{bid}.self_attn.k_norm.weight", (kv_rows,)),
        ]

    def mlp_rules(self, config):
        e, hidden = config.num_local_experts, config.hidden_size
        return [TensorRule("blk.{bid}.ffn_gate_inp.weight", "model.layers.{bid}.mlp.gate.weight", (e, hidden)),
                TensorRule("blk.{bid}.exp_probs_b.bias", "model.layers.{bid}.mlp.e_score_correction_bias", (e,)),
                ] + expert_rules(e, hidden, config.intermediate_size)

    def has_qkv_bias(self, config):
        return False

    def has_o_bias(self, config):
        return False

    def fields_from_config(self, config, arch):
        raise moe_writer_unsupported(arch)
