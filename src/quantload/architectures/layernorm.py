"""What the llama-shaped decoders with LayerNorm (weight + bias) share: StarCoder2, StableLM, Nemotron.

Their GGUF metadata is the llama one with `attention.layer_norm_epsilon` where llama has
`layer_norm_rms_epsilon`, and every norm carries a bias (`*.bias` beside `*.weight`).
"""
from __future__ import annotations

from typing import Any

from ..errors import FileFormatError, UnsupportedError
from .base import Metadata, TensorRule
from .decoder import DecoderFamily, head_dim_of, rope_scaling_from, token_id_kwargs, vocab_size_from


def decoder_kwargs(meta: Metadata, shapes: dict, eps_attr: str) -> dict[str, Any]:
    """`DecoderFamily.common_kwargs` for a LayerNorm decoder: the epsilon goes to `eps_attr`, and
    `head_dim` to the caller (a config that derives it ignores it)."""
    hidden = meta.arch_int("embedding_length")
    heads = meta.arch_int("attention.head_count")
    if heads == 0:
        raise FileFormatError("expected at least one attention head, found 0", file=meta.file,
                              key=f"{meta.arch}.attention.head_count")
    key_length = meta.arch_int("attention.key_length", hidden // heads)
    if meta.arch_int("attention.value_length", key_length) != key_length:
        raise UnsupportedError("key length differs from value length", file=meta.file,
                               key=f"{meta.arch}.attention.value_length")
    vocab = vocab_size_from(meta, shapes)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=meta.arch_int("feed_forward_length"),
                  num_hidden_layers=meta.arch_int("block_count"), num_attention_heads=heads,
                  num_key_value_heads=meta.arch_int("attention.head_count_kv", heads), head_dim=key_length,
                  max_position_embeddings=meta.arch_int("context_length"),
                  rope_theta=meta.arch_float("rope.freq_base", 10000.0),
                  tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
    kwargs[eps_attr] = meta.arch_float("attention.layer_norm_epsilon")
    rope_dims = meta.arch_int("rope.dimension_count", key_length)
    if rope_dims != key_length:
        kwargs["partial_rotary_factor"] = rope_dims / key_length
    scaling = rope_scaling_from(meta)
    if scaling is not None:
        kwargs["rope_scaling"] = scaling
    return kwargs


class LayerNormDecoderFamily(DecoderFamily):
    #: the config attribute holding the LayerNorm epsilon, written as llama.cpp's LayerNorm key
    eps_attr = "layer_norm_eps"
    gguf_eps_key = "attention.layer_norm_epsilon"

    def norm_rules(self, config):
        rules = super().norm_rules(config)
        return rules + [TensorRule(r.gguf.replace(".weight", ".bias"), r.hf.replace(".weight", ".bias"), r.shape)
                        for r in rules]

    def rules(self, config):
        return super().rules(config) + [TensorRule("output_norm.bias", "model.norm.bias", (config.hidden_size,))]

    def rope_dims(self, config) -> int:
        factor = getattr(config, "partial_rotary_factor", None)
        if factor is None:
            factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        return int(head_dim_of(config) * factor)
