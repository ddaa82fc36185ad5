"""qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B: shared expert with a sigmoid gate, Q/K/V biases) and
qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B: QK RMSNorm, no shared expert) as llama.cpp's converter
writes them: experts stacked in `ffn_{gate,up,down}_exps`, router `ffn_gate_inp`, shared expert
`ffn_{gate,up,down}_shexp` and its gate `ffn_gate_inp_shexp`. Every layer is a MoE layer (llama.cpp
builds them all so). Routing follows llama.cpp: qwen2moe keeps the softmax top-k weights as they are,
qwen3moe renormalizes them (transformers' `norm_topk_prob`, whose Qwen3MoeConfig default is False)."""
from __future__ import annotations

from ..errors import FileFormatError, UnsupportedError
from .base import TensorRule
from .moe import expert_rules, moe_writer_unsupported
from .qwen import Qwen2Family, Qwen3Family


def moe_kwargs(meta, shapes) -> dict:
    experts = meta.arch_int("expert_count")
    used = meta.arch_int("expert_used_count")
    if experts == 0 or not 0 < used <= experts:
        raise FileFormatError(f"expected 0 < expert_used_count <= expert_count, found {used} of {experts}",
                              file=meta.file, key=f"{meta.arch}.expert_used_count")
    gate = shapes.get("blk.0.ffn_gate_exps.weight")
    default_ff = gate[1] if gate is not None and len(gate) == 3 else None
    ff = meta.arch_int("expert_feed_forward_length", default_ff)
    if ff is None:
        raise FileFormatError("cannot tell the experts' size: no expert_feed_forward_length and no "
                              "blk.0.ffn_gate_exps.weight", file=meta.file,
                              key=f"{meta.arch}.expert_feed_forward_length")
    return dict(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=ff, decoder_sparse_step=1,
                mlp_only_layers=[])


class _MoEMixin:
    """MoE blocks instead of the dense MLP rules."""

    def mlp_rules(self, config) -> list[TensorRule]:
        hidden = config.hidden_size
        rules = [TensorRule("blk.{bid}.ffn_gate_inp.weight", "model.layers.{bid}.mlp.gate.weight",
                            (config.num_experts, hidden))]
        return rules + expert_rules(config.num_experts, hidden, config.moe_intermediate_size)

    def fields_from_config(self, config, arch):
        raise moe_writer_unsupported(arch)


class Qwen2MoeFamily(_MoEMixin, Qwen2Family):
    gguf_archs = ("qwen2moe",)
    model_types = ("qwen2_moe",)

    def config_class(self, meta):
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.common_kwargs(meta, shapes)
        if kwargs["head_dim"] != kwargs["hidden_size"] // kwargs["num_attention_heads"]:
            raise UnsupportedError(f"head_dim {kwargs['head_dim']} differs from hidden/heads; Qwen2MoeConfig "
                                   "derives it", file=meta.file, key=f"{meta.arch}.attention.key_length")
        del kwargs["head_dim"]
        kwargs["qkv_bias"] = "blk.0.attn_q.bias" in shapes
        kwargs.update(moe_kwargs(meta, shapes))
        shared = shapes.get("blk.0.ffn_gate_shexp.weight")
        kwargs["shared_expert_intermediate_size"] = meta.arch_int(
            "expert_shared_feed_forward_length", shared[0] if shared is not None else None)
        if kwargs["shared_expert_intermediate_size"] is None:
            raise UnsupportedError("qwen2moe without a shared expert is not a model transformers can build",
                                   file=meta.file, key="blk.0.ffn_gate_shexp.weight")
        kwargs["norm_topk_prob"] = False      # llama.cpp's qwen2moe: softmax weights, not renormalized
        return kwargs, []

    def has_qkv_bias(self, config):
        return bool(config.qkv_bias)

    def mlp_rules(self, config):
        hidden, shared = config.hidden_size, config.shared_expert_intermediate_size
        return super().mlp_rules(config) + [
            TensorRule("blk.{bid}.ffn_gate_shexp.weight", "model.layers.{bid}.mlp.shared_expert.gate_proj.weight",
                       (shared, hidden)),
            TensorRule("blk.{bid}.ffn_up_shexp.weight", "model.layers.{bid}.mlp.shared_expert.up_proj.weight",
                       (shared, hidden)),
            TensorRule("blk.{bid}.ffn_down_shexp.weight", "model.layers.{bid}.mlp.shared_expert.down_proj.weight",
                       (hidden, shared)),
            TensorRule("blk.{bid}.ffn_gate_inp_shexp.weight", "model.layers.{bid}.mlp.shared_expert_gate.weight",
                       (1, hidden)),
        ]


class Qwen3MoeFamily(_MoEMixin, Qwen3Family):
    gguf_archs = ("qwen3moe",)
    model_types = ("qwen3_moe",)

    def config_class(self, meta):
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs, consumed = super().config_kwargs(meta, shapes, read_tensor)
        kwargs.update(moe_kwargs(meta, shapes))
        kwargs["norm_topk_prob"] = True       # llama.cpp's qwen3moe renormalizes the top-k weights
        return kwargs, consumed
