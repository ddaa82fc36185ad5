"""lfm2 (LiquidAI LFM2, LFM2.5): GGUF architecture `lfm2`.

A hybrid: some blocks are gated short convolutions (`shortconv.in_proj`, a depthwise `conv`,
`out_proj`), the others attention with Q/K RMSNorms; the file tells them apart by a per-layer KV head
count of 0 (`lfm2.attention.head_count_kv` is an array). The final norm is transformers'
`embedding_norm` (`token_embd_norm`). The converter squeezes the depthwise kernel [hidden, 1, L] to
[hidden, L]; it gets its middle axis back on load (a float tensor in every file llama.cpp writes).
Not written back: transformers' LFM2 has no GGUF writer mapping here yet (the kernel's shape).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import FileFormatError
from .base import Family, TensorRule
from .decoder import finish_config, token_id_kwargs, vocab_size_from
from .transforms import Transform


class InsertAxis(Transform):
    """`t.unsqueeze(dim)`: a depthwise Conv1d kernel [channels, L] -> [channels, 1, L]."""

    def __init__(self, dim: int):
        self.dim = int(dim)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(self.dim)

    def inverse(self) -> "DropAxis":
        return DropAxis(self.dim)


class DropAxis(Transform):
    def __init__(self, dim: int):
        self.dim = int(dim)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.squeeze(self.dim)

    def inverse(self) -> InsertAxis:
        return InsertAxis(self.dim)


class Lfm2Family(Family):
    gguf_archs = ("lfm2",)
    model_types = ()

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import Lfm2Config
        n = meta.arch_int("block_count")
        key = "lfm2.attention.head_count_kv"
        kv = meta.fields.get(key)
        kv = np.atleast_1d(np.asarray(kv if kv is not None else meta.arch_int("attention.head_count")))
        if kv.size == 1:
            kv = np.repeat(kv, n)
        if kv.size != n or kv.dtype.kind not in "iu":
            raise FileFormatError(f"expected {n} per-layer KV head counts, found {kv.tolist()[:8]}", file=meta.file,
                                  key=key)
        vocab = vocab_size_from(meta, shapes)
        config = Lfm2Config(
            vocab_size=vocab, hidden_size=meta.arch_int("embedding_length"),
            intermediate_size=meta.arch_int("feed_forward_length"), block_auto_adjust_ff_dim=False,
            num_hidden_layers=n, num_attention_heads=meta.arch_int("attention.head_count"),
            num_key_value_heads=int(kv.max()), layer_types=["full_attention" if h else "conv" for h in kv],
            norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon"),
            conv_L_cache=meta.arch_int("shortconv.l_cache"),
            conv_bias=any(name.endswith("shortconv.in_proj.bias") for name in shapes),
            max_position_embeddings=meta.arch_int("context_length"),
            rope_theta=meta.arch_float("rope.freq_base", 10000.0),
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        return finish_config(config, "Lfm2ForCausalLM"), []

    def rules(self, config):
        e, ff, v = config.hidden_size, config.intermediate_size, config.vocab_size
        heads = config.num_attention_heads
        hd = e // heads
        kv_rows = config.num_key_value_heads * hd
        rules = [TensorRule("token_embd.weight", "model.embed_tokens.weight", (v, e)),
                 TensorRule("token_embd_norm.weight", "model.embedding_norm.weight", (e,))]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (v, e)))
        for i, kind in enumerate(config.layer_types):
            b, h = f"blk.{i}", f"model.layers.{i}"
            rules += [TensorRule(f"{b}.attn_norm.weight", f"{h}.operator_norm.weight", (e,)),
                      TensorRule(f"{b}.ffn_norm.weight", f"{h}.ffn_norm.weight", (e,)),
                      TensorRule(f"{b}.ffn_gate.weight", f"{h}.feed_forward.w1.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_up.weight", f"{h}.feed_forward.w3.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_down.weight", f"{h}.feed_forward.w2.weight", (e, ff))]
            if kind == "conv":
                rules += [TensorRule(f"{b}.shortconv.in_proj.weight", f"{h}.conv.in_proj.weight", (3 * e, e)),
                          TensorRule(f"{b}.shortconv.conv.weight", f"{h}.conv.conv.weight", (e, config.conv_L_cache),
                                     InsertAxis(1)),
                          TensorRule(f"{b}.shortconv.out_proj.weight", f"{h}.conv.out_proj.weight", (e, e))]
                if config.conv_bias:
                    rules += [TensorRule(f"{b}.shortconv.in_proj.bias", f"{h}.conv.in_proj.bias", (3 * e,)),
                              TensorRule(f"{b}.shortconv.conv.bias", f"{h}.conv.conv.bias", (e,)),
                              TensorRule(f"{b}.shortconv.out_proj.bias", f"{h}.conv.out_proj.bias", (e,))]
            else:
                rules += [TensorRule(f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", (e, e)),
                          TensorRule(f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", (kv_rows, e)),
                          TensorRule(f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", (kv_rows, e)),
                          TensorRule(f"{b}.attn_output.weight", f"{h}.self_attn.out_proj.weight", (e, e)),
                          TensorRule(f"{b}.attn_q_norm.weight", f"{h}.self_attn.q_layernorm.weight", (hd,)),
                          TensorRule(f"{b}.attn_k_norm.weight", f"{h}.self_attn.k_layernorm.weight", (hd,))]
        return rules
