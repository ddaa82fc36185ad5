"""t5 (T5 v1.1 / Flan-T5, and UMT5 when the file's name says so): GGUF architecture `t5`.

An encoder-decoder: `enc.blk.*` and `dec.blk.*` with RMSNorms (T5's LayerNorm has no mean and no
bias), relative position buckets (`attn_rel_b`, in the first block for T5, in every block for UMT5),
cross attention in the decoder, and a gated-GELU (`ffn_gate`, Flan-T5 / v1.1) or ReLU FFN. llama.cpp
fixes the bucket distance at 128 (transformers' default). llama.cpp never rescales the decoder output
by d_model**-0.5, which transformers' T5 does for a tied head: `scale_decoder_outputs` is off here. Like transformers' GGUF loader, a file
whose `general.name` contains "umt5" becomes a UMT5 model. The encoder's and decoder's token tables
are the shared one (`adapt`), so it stays one set of blocks. Not written back (no writer mapping).
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import Family, TensorRule
from .decoder import finish_config, token_id_kwargs, vocab_size_from


def _is_umt5(meta) -> bool:
    name = meta.fields.get("general.name")
    return isinstance(name, str) and "umt5" in name.lower()


class T5Family(Family):
    gguf_archs = ("t5",)
    model_types = ()

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import T5Config, UMT5Config
        gated = "enc.blk.0.ffn_gate.weight" in shapes
        vocab = vocab_size_from(meta, shapes)
        layers = meta.arch_int("block_count")
        cls = UMT5Config if _is_umt5(meta) else T5Config
        config = cls(
            vocab_size=vocab, d_model=meta.arch_int("embedding_length"), d_kv=meta.arch_int("attention.key_length"),
            d_ff=meta.arch_int("feed_forward_length"), num_layers=layers,
            num_decoder_layers=meta.arch_int("decoder_block_count", layers), num_heads=meta.arch_int("attention.head_count"),
            relative_attention_num_buckets=meta.arch_int("attention.relative_buckets_count"),
            relative_attention_max_distance=128,   # llama.cpp: llama_relative_position_bucket's max_distance
            layer_norm_epsilon=meta.arch_float("attention.layer_norm_rms_epsilon"),
            feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=True,
            decoder_start_token_id=meta.arch_int("decoder_start_token_id", 0),
            n_positions=meta.arch_int("context_length", 512),
            # transformers 5 ties T5's head always; False here only turns off its d_model**-0.5 rescale of
            # the decoder output, which llama.cpp never applies
            tie_word_embeddings=False, **token_id_kwargs(meta, vocab))
        # a file's own head (Flan-T5) is loaded as such, beside the shared table (quantload keeps it)
        config.gguf_own_head = "output.weight" in shapes
        if "enc.blk.0.attn_rel_b.weight" not in shapes:
            raise UnsupportedError("t5 without relative attention buckets in its first block", file=meta.file,
                                   key="enc.blk.0.attn_rel_b.weight")
        return finish_config(config, "UMT5ForConditionalGeneration" if cls is UMT5Config else
                             "T5ForConditionalGeneration"), []

    def adapt(self, model) -> None:
        """The encoder's and decoder's embed_tokens become the `shared` module itself (transformers ties
        their weights), so a quantized table is one QEmbedding under all three names."""
        model.set_input_embeddings(model.shared)

    def rules(self, config):
        e, ff, v = config.d_model, config.d_ff, config.vocab_size
        inner, heads, buckets = config.num_heads * config.d_kv, config.num_heads, config.relative_attention_num_buckets
        umt5 = config.model_type == "umt5"
        rules = [TensorRule("token_embd.weight", "shared.weight", (v, e)),
                 TensorRule("enc.output_norm.weight", "encoder.final_layer_norm.weight", (e,)),
                 TensorRule("dec.output_norm.weight", "decoder.final_layer_norm.weight", (e,))]
        if getattr(config, "gguf_own_head", False):
            rules.append(TensorRule("output.weight", "lm_head.weight", (v, e)))

        def attention(g, h):
            return [TensorRule(f"{g}_q.weight", f"{h}.q.weight", (inner, e)),
                    TensorRule(f"{g}_k.weight", f"{h}.k.weight", (inner, e)),
                    TensorRule(f"{g}_v.weight", f"{h}.v.weight", (inner, e)),
                    TensorRule(f"{g}_o.weight", f"{h}.o.weight", (e, inner))]

        def ffn(g, h):
            if config.is_gated_act:
                return [TensorRule(f"{g}.ffn_gate.weight", f"{h}.wi_0.weight", (ff, e)),
                        TensorRule(f"{g}.ffn_up.weight", f"{h}.wi_1.weight", (ff, e)),
                        TensorRule(f"{g}.ffn_down.weight", f"{h}.wo.weight", (e, ff))]
            return [TensorRule(f"{g}.ffn_up.weight", f"{h}.wi.weight", (ff, e)),
                    TensorRule(f"{g}.ffn_down.weight", f"{h}.wo.weight", (e, ff))]

        for stack, prefix, n in (("enc", "encoder", config.num_layers), ("dec", "decoder", config.num_decoder_layers)):
            for i in range(n):
                g, h = f"{stack}.blk.{i}", f"{prefix}.block.{i}.layer"
                rules += attention(f"{g}.attn", f"{h}.0.SelfAttention")
                rules.append(TensorRule(f"{g}.attn_norm.weight", f"{h}.0.layer_norm.weight", (e,)))
                if i == 0 or umt5:
                    rules.append(TensorRule(f"{g}.attn_rel_b.weight", f"{h}.0.SelfAttention.relative_attention_bias.weight",
                                            (buckets, heads)))
                ffn_layer = 1
                if stack == "dec":
                    rules += attention(f"{g}.cross_attn", f"{h}.1.EncDecAttention")
                    rules.append(TensorRule(f"{g}.cross_attn_norm.weight", f"{h}.1.layer_norm.weight", (e,)))
                    ffn_layer = 2
                rules += ffn(g, f"{h}.{ffn_layer}.DenseReluDense")
                rules.append(TensorRule(f"{g}.ffn_norm.weight", f"{h}.{ffn_layer}.layer_norm.weight", (e,)))
        return rules
