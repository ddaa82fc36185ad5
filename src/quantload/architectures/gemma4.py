"""gemma4 (Gemma 4 dense text models, e.g. 31B): GGUF architecture `gemma4`.

Sliding and full attention layers with different head sizes (`attention.key_length_swa` /
`key_length`), Q/K RMSNorms and a scale-free V norm, four norms per block (stored as they are: Gemma 4
has no `w + 1`), a per-block output scalar (`layer_output_scale` <-> transformers' `layer_scalar`
buffer). The full layers' "proportional" RoPE is stored as `rope_freqs.weight` (1 for rotated
frequencies, 1e30 for the others); its partial rotary factor is read back from it (needs
`read_tensor`).

Not mapped yet, each raising UnsupportedError naming its key: per-layer input embeddings (E2B/E4B),
KV sharing between layers, K = V full layers (no `attn_v`), per-layer KV head counts, and experts
(26B-A4B). transformers' own GGUF loader cannot build these files (it keeps head_dim 256 and the E2B
per-layer inputs, and reads neither the layer pattern nor layer_output_scale): checked against
llama.cpp only.
"""
from __future__ import annotations

import numpy as np

from ..errors import FileFormatError, UnsupportedError
from .base import Family, TensorRule
from .decoder import finish_config, token_id_kwargs, vocab_size_from

_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


class Gemma4Family(Family):
    gguf_archs = ("gemma4",)
    model_types = ()

    def _refuse(self, meta, shapes):
        for suffix, what in (("embedding_length_per_layer_input", "per-layer input embeddings (E2B/E4B)"),
                             ("attention.shared_kv_layers", "KV sharing between layers"),
                             ("expert_count", "experts (26B-A4B)")):
            if meta.arch_int(suffix, 0):
                raise UnsupportedError(f"gemma4 with {what} is not supported yet", file=meta.file,
                                       key=f"gemma4.{suffix}")

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import Gemma4TextConfig
        self._refuse(meta, shapes)
        n = meta.arch_int("block_count")
        pattern = meta.fields.get("gemma4.attention.sliding_window_pattern")
        if pattern is None or len(pattern) != n:
            raise FileFormatError(f"expected {n} per-layer sliding flags", file=meta.file,
                                  key="gemma4.attention.sliding_window_pattern")
        layer_types = ["sliding_attention" if bool(p) else "full_attention" for p in np.asarray(pattern).reshape(-1)]
        for i, kind in enumerate(layer_types):
            if f"blk.{i}.attn_v.weight" not in shapes:
                raise UnsupportedError("gemma4 with K = V attention (no attn_v) is not supported yet",
                                       file=meta.file, key=f"blk.{i}.attn_v.weight")
        head_full, head_swa = meta.arch_int("attention.key_length"), meta.arch_int("attention.key_length_swa")
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": meta.arch_float("rope.freq_base_swa", 10000.0)},
                "full_attention": {"rope_type": "default", "rope_theta": meta.arch_float("rope.freq_base", 1000000.0)}}
        swa_rot = meta.arch_int("rope.dimension_count_swa", head_swa)
        if swa_rot != head_swa:
            rope["sliding_attention"]["partial_rotary_factor"] = swa_rot / head_swa
        consumed = []
        if "rope_freqs.weight" in shapes:
            if read_tensor is None:
                raise UnsupportedError("this file keeps its full-attention RoPE in rope_freqs.weight; pass read_tensor",
                                       file=meta.file, key="rope_freqs.weight")
            factors = read_tensor("rope_freqs.weight").float().reshape(-1)
            rotated = int((factors == 1).sum())
            if factors.numel() != head_full // 2 or not bool((factors[:rotated] == 1).all()) or \
                    not bool((factors[rotated:] > 1e20).all()):
                raise UnsupportedError("rope_freqs.weight is not Gemma 4's proportional RoPE (1s, then 1e30s)",
                                       file=meta.file, key="rope_freqs.weight")
            rope["full_attention"].update(rope_type="proportional", partial_rotary_factor=2 * rotated / head_full)
            consumed.append("rope_freqs.weight")
        vocab = vocab_size_from(meta, shapes)
        config = Gemma4TextConfig(
            vocab_size=vocab, hidden_size=meta.arch_int("embedding_length"),
            intermediate_size=meta.arch_int("feed_forward_length"), num_hidden_layers=n,
            num_attention_heads=meta.arch_int("attention.head_count"),
            num_key_value_heads=meta.arch_int("attention.head_count_kv"), head_dim=head_swa,
            global_head_dim=head_full, layer_types=layer_types,
            sliding_window=meta.arch_int("attention.sliding_window"),
            rms_norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon"),
            max_position_embeddings=meta.arch_int("context_length"), rope_parameters=rope,
            final_logit_softcapping=meta.arch_float("final_logit_softcapping", None),
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab, num_kv_shared_layers=0,
            attention_k_eq_v=False, enable_moe_block=False,
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        # callers that size things per model (the planner's KV cache estimate) read config.head_dim; the
        # sliding layers' value is what they get, the per-layer configs keep the truth for the model
        config.allow_global_per_layer_attribute_access = True
        return finish_config(config, "Gemma4ForCausalLM"), consumed

    def rules(self, config):
        e, ff, v = config.hidden_size, config.intermediate_size, config.vocab_size
        heads = config.num_attention_heads
        rules = [TensorRule("token_embd.weight", "model.embed_tokens.weight", (v, e)),
                 TensorRule("output_norm.weight", "model.norm.weight", (e,))]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (v, e)))
        for i, kind in enumerate(config.layer_types):
            layer = config.per_layer_config[i]      # head_dim and KV heads differ per layer type
            hd, kv = layer.head_dim, layer.num_key_value_heads
            b, h = f"blk.{i}", f"model.layers.{i}"
            rules += [TensorRule(f"{b}.{g}.weight", f"{h}.{t}.weight", (e,)) for g, t in _NORMS.items()]
            rules += [TensorRule(f"{b}.layer_output_scale.weight", f"{h}.layer_scalar", (1,)),
                      TensorRule(f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", (heads * hd, e)),
                      TensorRule(f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", (kv * hd, e)),
                      TensorRule(f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", (kv * hd, e)),
                      TensorRule(f"{b}.attn_output.weight", f"{h}.self_attn.o_proj.weight", (e, heads * hd)),
                      TensorRule(f"{b}.attn_q_norm.weight", f"{h}.self_attn.q_norm.weight", (hd,)),
                      TensorRule(f"{b}.attn_k_norm.weight", f"{h}.self_attn.k_norm.weight", (hd,)),
                      TensorRule(f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", (e, ff))]
        return rules
