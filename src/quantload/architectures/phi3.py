"""phi3 (Phi-3, Phi-3.5, Phi-4-mini): fused QKV and gate/up projections in both formats, partial RoPE,
and for the 128k models LongRoPE factors stored as `rope_factors_long/short.weight` tensors (read into
the config; that needs `read_tensor`)."""
from __future__ import annotations

from ..errors import FileFormatError, UnsupportedError
from .base import TensorRule, f32, u32
from .decoder import DecoderFamily, finish_config, head_dim_of, hf_rope, kv_heads_of


class Phi3Family(DecoderFamily):
    gguf_archs = ("phi3",)
    model_types = ("phi3",)

    def config_class(self, meta):
        from transformers import Phi3Config
        return Phi3Config

    def config_kwargs(self, meta, shapes, read_tensor):
        kwargs = self.common_kwargs(meta, shapes)
        head_dim = kwargs.pop("head_dim")        # Phi3Config derives it: hidden / heads
        if head_dim != kwargs["hidden_size"] // kwargs["num_attention_heads"]:
            raise UnsupportedError(f"phi3 with head_dim {head_dim} != hidden/heads is not supported",
                                   file=meta.file, key="phi3.attention.key_length")
        if "blk.0.attn_qkv.weight" not in shapes and "blk.0.attn_q.weight" in shapes:
            raise UnsupportedError("phi3 with separate Q/K/V tensors is not supported (transformers' Phi3 "
                                   "has one fused qkv_proj)", file=meta.file, key="blk.0.attn_q.weight")
        rope_dims = meta.arch_int("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            kwargs["partial_rotary_factor"] = rope_dims / head_dim
        kwargs["original_max_position_embeddings"] = meta.arch_int(
            "rope.scaling.original_context_length", kwargs["max_position_embeddings"])
        window = meta.arch_int("attention.sliding_window", 0)
        kwargs["sliding_window"] = window or None   # the converter writes 0 for "none" (Phi-4)
        consumed = []
        kwargs.pop("rope_scaling", None)
        if "rope_factors_long.weight" in shapes:
            if read_tensor is None:
                raise UnsupportedError("this file stores LongRoPE factors in rope_factors_long/short.weight; "
                                       "pass read_tensor so they can be read into the config",
                                       file=meta.file, key="rope_factors_long.weight")
            factors = {}
            for which in ("long", "short"):
                name = f"rope_factors_{which}.weight"
                if name not in shapes:
                    raise FileFormatError(f"{name} is missing beside rope_factors_long.weight", file=meta.file,
                                          key=name)
                values = read_tensor(name).float().reshape(-1)
                if values.numel() != rope_dims // 2:
                    raise FileFormatError(f"expected {rope_dims // 2} factors, found {values.numel()}",
                                          file=meta.file, key=name)
                factors[f"{which}_factor"] = values.tolist()
                consumed.append(name)
            kwargs["rope_scaling"] = {"rope_type": "longrope", **factors}
        return kwargs, consumed

    def config_from_gguf(self, meta, shapes, read_tensor):
        # longrope is complete here (factors read), so skip the base class's refusal of it
        kwargs, consumed = self.config_kwargs(meta, shapes, read_tensor)
        return finish_config(self.config_class(meta)(**kwargs), "Phi3ForCausalLM"), consumed

    def attention_rules(self, config):
        hidden, hd = config.hidden_size, head_dim_of(config)
        q_rows, kv_rows = config.num_attention_heads * hd, kv_heads_of(config) * hd
        return [
            TensorRule("blk.{bid}.attn_qkv.weight", "model.layers.{bid}.self_attn.qkv_proj.weight",
                       (q_rows + 2 * kv_rows, hidden)),
            TensorRule("blk.{bid}.attn_output.weight", "model.layers.{bid}.self_attn.o_proj.weight", (hidden, q_rows)),
        ]

    def mlp_rules(self, config):
        hidden, ff = config.hidden_size, config.intermediate_size
        return [
            TensorRule("blk.{bid}.ffn_up.weight", "model.layers.{bid}.mlp.gate_up_proj.weight", (2 * ff, hidden)),
            TensorRule("blk.{bid}.ffn_down.weight", "model.layers.{bid}.mlp.down_proj.weight", (hidden, ff)),
        ]

    def fields_from_config(self, config, arch):
        fields = super().fields_from_config(config, arch)
        del fields[f"{arch}.attention.key_length"], fields[f"{arch}.attention.value_length"]
        rope = hf_rope(config)
        if rope["rope_type"] not in ("default", "longrope"):
            raise UnsupportedError(f"RoPE type {rope['rope_type']!r} cannot be written for phi3", key="rope_parameters")
        original = rope.get("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        fields[f"{arch}.rope.scaling.original_context_length"] = u32(original)
        fields[f"{arch}.attention.sliding_window"] = u32(config.sliding_window or 0)
        if rope["rope_type"] == "longrope":
            import math
            scale = config.max_position_embeddings / original
            attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
            fields[f"{arch}.rope.scaling.attn_factor"] = f32(rope.get("attention_factor") or attn)
        return fields

    def extra_tensors(self, config, arch):
        import torch
        rope = hf_rope(config)
        if rope["rope_type"] != "longrope":
            return {}
        return {"rope_factors_long.weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rope["short_factor"], dtype=torch.float32)}
