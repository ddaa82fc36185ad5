"""falcon (Falcon 7B/40B/180B and their fine-tunes): GGUF architecture `falcon`.

Parallel attention and MLP, LayerNorms with biases, NEOX RoPE (no row permutation), a fused QKV
whose grouped rows the converter regroups into q|k|v (fused_qkv.py). The 7B layout has one norm per
block and one KV head (multi-query); the 40B/180B "new decoder architecture" has two norms per block
(`attn_norm_2` before the attention, `attn_norm` before the MLP) and KV groups. Numerics follow llama.cpp: its MLP activation is the tanh
GELU (ggml_gelu) where transformers' Falcon uses the exact one, so the config here says
`gelu_pytorch_tanh`. transformers' GGUF loader builds the 7B layout only (it reads neither the second
norm nor the KV groups) and does not regroup the QKV rows, which matters only with several KV groups.
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import Family, TensorRule, expand_layers, f32, u32
from .decoder import finish_config, token_id_kwargs, vocab_size_from
from .fused_qkv import QKVFromGGUF
from .gpt2 import layer_norm_rules, linear_rules


class FalconFamily(Family):
    gguf_archs = ("falcon",)
    model_types = ("falcon",)

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import FalconConfig
        hidden = meta.arch_int("embedding_length")
        heads = meta.arch_int("attention.head_count")
        kv = meta.arch_int("attention.head_count_kv", 1)
        vocab = vocab_size_from(meta, shapes)
        if "blk.0.attn_qkv.bias" in shapes:
            raise UnsupportedError("falcon with QKV biases is not supported (llama.cpp reads none)", file=meta.file,
                                   key="blk.0.attn_qkv.bias")
        new_arch = "blk.0.attn_norm_2.weight" in shapes
        config = FalconConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=meta.arch_int("block_count"),
            num_attention_heads=heads, num_kv_heads=kv, new_decoder_architecture=new_arch,
            multi_query=kv == 1, parallel_attn=True, bias=False, alibi=False,
            layer_norm_epsilon=meta.arch_float("attention.layer_norm_epsilon"),
            ffn_hidden_size=meta.arch_int("feed_forward_length", 4 * hidden),
            max_position_embeddings=meta.arch_int("context_length", 2048),
            rope_theta=meta.arch_float("rope.freq_base", 10000.0), activation="gelu_pytorch_tanh",
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        if not new_arch and kv not in (1, heads):
            raise UnsupportedError(f"falcon with {kv} KV heads of {heads} needs the new decoder architecture "
                                   "(attn_norm_2)", file=meta.file, key="falcon.attention.head_count_kv")
        return finish_config(config, "FalconForCausalLM"), []

    def rules(self, config):
        e, heads = config.hidden_size, config.num_attention_heads
        hd = e // heads
        kv = config.num_kv_heads if (config.new_decoder_architecture or not config.multi_query) else 1
        ff = config.ffn_hidden_size
        rules = [TensorRule("token_embd.weight", "transformer.word_embeddings.weight", (config.vocab_size, e)),
                 *layer_norm_rules("output_norm", "transformer.ln_f", e)]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (config.vocab_size, e)))
        h = "transformer.h.{bid}"
        if config.new_decoder_architecture:
            # llama.cpp's names for 40B: attn_norm feeds the MLP, attn_norm_2 the attention
            norms = [*layer_norm_rules("blk.{bid}.attn_norm", f"{h}.ln_mlp", e),
                     *layer_norm_rules("blk.{bid}.attn_norm_2", f"{h}.ln_attn", e)]
        else:
            norms = layer_norm_rules("blk.{bid}.attn_norm", f"{h}.input_layernorm", e)
        qkv = QKVFromGGUF(kv, heads // kv, hd) if kv > 1 else None   # one group: the same order
        per_layer = [*norms,
                     *linear_rules("blk.{bid}.attn_qkv", f"{h}.self_attention.query_key_value", (heads + 2 * kv) * hd,
                                   e, bias=False, transform=qkv),
                     *linear_rules("blk.{bid}.attn_output", f"{h}.self_attention.dense", e, e, bias=False),
                     *linear_rules("blk.{bid}.ffn_up", f"{h}.mlp.dense_h_to_4h", ff, e, bias=False),
                     *linear_rules("blk.{bid}.ffn_down", f"{h}.mlp.dense_4h_to_h", e, ff, bias=False)]
        return rules + expand_layers(config.num_hidden_layers, per_layer)

    def fields_from_config(self, config, arch):
        for attr, ok in (("parallel_attn", True), ("alibi", False), ("bias", False)):
            if bool(getattr(config, attr)) != ok:
                raise UnsupportedError(f"falcon with {attr}={getattr(config, attr)} cannot be written: llama.cpp "
                                       f"runs {attr}={ok} only", key=attr)
        kv = config.num_kv_heads if (config.new_decoder_architecture or not config.multi_query) else 1
        return {"general.architecture": arch,
                f"{arch}.context_length": u32(config.max_position_embeddings),
                f"{arch}.tensor_data_layout": "jploski",
                f"{arch}.embedding_length": u32(config.hidden_size),
                f"{arch}.feed_forward_length": u32(config.ffn_hidden_size),
                f"{arch}.block_count": u32(config.num_hidden_layers),
                f"{arch}.attention.head_count": u32(config.num_attention_heads),
                f"{arch}.attention.head_count_kv": u32(kv),
                f"{arch}.attention.layer_norm_epsilon": f32(config.layer_norm_epsilon)}
