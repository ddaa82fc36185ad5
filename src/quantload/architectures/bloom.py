"""bloom (BLOOM, BLOOMZ): GGUF architecture `bloom`.

ALiBi (no position table, no RoPE), LayerNorms with biases including one after the embedding
(`token_embd_norm`), and a fused QKV whose per-head q|k|v rows the converter regroups (fused_qkv.py).
transformers' GGUF loader always ties lm_head to the embedding for bloom; a file with `output.weight`
is untied here, as llama.cpp reads it.
"""
from __future__ import annotations

from .base import Family, TensorRule, expand_layers, f32, u32
from .decoder import finish_config, token_id_kwargs, vocab_size_from
from .fused_qkv import QKVFromGGUF
from .gpt2 import layer_norm_rules, linear_rules


class BloomFamily(Family):
    gguf_archs = ("bloom",)
    model_types = ("bloom",)

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import BloomConfig
        hidden = meta.arch_int("embedding_length")
        vocab = vocab_size_from(meta, shapes)
        heads = meta.arch_int("attention.head_count")
        ff = meta.arch_int("feed_forward_length", 4 * hidden)
        if ff != 4 * hidden:
            from ..errors import UnsupportedError
            raise UnsupportedError(f"bloom with feed_forward_length {ff} != 4 * {hidden} (transformers' BLOOM "
                                   "fixes it)", file=meta.file, key="bloom.feed_forward_length")
        config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=meta.arch_int("block_count"),
                             n_head=heads, layer_norm_epsilon=meta.arch_float("attention.layer_norm_epsilon"),
                             tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        config.seq_length = meta.arch_int("context_length", hidden)   # what the converter writes back
        return finish_config(config, "BloomForCausalLM"), []

    def rules(self, config):
        e, heads = config.hidden_size, config.n_head
        qkv = QKVFromGGUF(heads, 1, e // heads)
        rules = [TensorRule("token_embd.weight", "transformer.word_embeddings.weight", (config.vocab_size, e)),
                 *layer_norm_rules("token_embd_norm", "transformer.word_embeddings_layernorm", e),
                 *layer_norm_rules("output_norm", "transformer.ln_f", e)]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (config.vocab_size, e)))
        h = "transformer.h.{bid}"
        per_layer = [*layer_norm_rules("blk.{bid}.attn_norm", f"{h}.input_layernorm", e),
                     *linear_rules("blk.{bid}.attn_qkv", f"{h}.self_attention.query_key_value", 3 * e, e,
                                   transform=qkv),
                     *linear_rules("blk.{bid}.attn_output", f"{h}.self_attention.dense", e, e),
                     *layer_norm_rules("blk.{bid}.ffn_norm", f"{h}.post_attention_layernorm", e),
                     *linear_rules("blk.{bid}.ffn_up", f"{h}.mlp.dense_h_to_4h", 4 * e, e),
                     *linear_rules("blk.{bid}.ffn_down", f"{h}.mlp.dense_4h_to_h", e, 4 * e)]
        return rules + expand_layers(config.n_layer, per_layer)

    def fields_from_config(self, config, arch):
        e = config.hidden_size
        return {"general.architecture": arch,
                f"{arch}.context_length": u32(getattr(config, "seq_length", None) or e),
                f"{arch}.embedding_length": u32(e),
                f"{arch}.feed_forward_length": u32(4 * e),
                f"{arch}.block_count": u32(config.n_layer),
                f"{arch}.attention.head_count": u32(config.n_head),
                f"{arch}.attention.head_count_kv": u32(config.n_head),
                f"{arch}.attention.layer_norm_epsilon": f32(config.layer_norm_epsilon)}
