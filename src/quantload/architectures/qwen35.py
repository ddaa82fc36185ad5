"""qwen35 (Qwen3.5 / 3.6 dense text models): GGUF architecture `qwen35`.

A hybrid: Gated DeltaNet linear-attention blocks and, every `full_attention_interval`-th block, gated
full attention (q_proj yields the query and its gate). llama.cpp's converter changes five things, each
undone here exactly as transformers' own GGUF mapping (`integrations/gguf/gguf_conversion_mapping.py`,
`_qwen35`) undoes them:

1. names (`attn_qkv`, `attn_gate`, `ssm_*`, ...);
2. zero-centred RMSNorms stored as `w + 1` (all but `ssm_norm`): -1 on load;
3. `ssm_a` holds `-exp(A_log)`: `log(-x)` on load;
4. the depthwise conv kernel squeezed to [channels, K]: its middle axis back;
5. value heads tiled (`v0k0 v0k1 v1k0 ...`) rather than grouped by key head: a row reorder on every
   tensor producing the value axis (kept in blocks: outputs are reordered), and a column reorder on
   `ssm_out`, the one consuming it. Columns cross quantization blocks, so `ssm_out` is dequantized at
   load (transformers' packed path permutes its input instead).

The multi-token-prediction block (`blk.{n_layers}`, `nextn_predict_layers`) has no transformers module:
it is left out and listed in `unused`. Not written back (no writer mapping for qwen3_5_text yet).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import FileFormatError, UnsupportedError
from .base import Family, TensorRule
from .decoder import finish_config, token_id_kwargs, vocab_size_from
from .lfm2 import InsertAxis
from .transforms import AddScalar, Transform, _RowPermutation


def _grouped_from_tiled(num_k_heads: int, per_k: int, head_dim: int) -> torch.Tensor:
    """perm with `grouped = tiled[perm]` over `num_k_heads * per_k * head_dim` rows."""
    tiled = torch.arange(num_k_heads * per_k * head_dim).reshape(num_k_heads, per_k, head_dim).transpose(0, 1)
    return torch.argsort(tiled.reshape(-1))


class ValueHeadRows(_RowPermutation):
    """Rows from `offset` on, from llama.cpp's tiled value-head order to transformers' grouped one."""

    def __init__(self, num_k_heads: int, per_k: int, head_dim: int = 1, offset: int = 0):
        self.num_k_heads, self.per_k, self.head_dim, self.offset = (int(num_k_heads), int(per_k), int(head_dim),
                                                                    int(offset))

    def row_permutation(self, n_rows: int) -> torch.Tensor:
        tail = self.num_k_heads * self.per_k * self.head_dim
        if n_rows != self.offset + tail:
            raise FileFormatError(f"expected {self.offset} + {tail} rows for the value-head reorder, found {n_rows}")
        return torch.cat([torch.arange(self.offset), self.offset + _grouped_from_tiled(
            self.num_k_heads, self.per_k, self.head_dim)])


class ValueHeadColumns(Transform):
    """The same reorder on columns (`ssm_out`): dense values only."""

    def __init__(self, num_k_heads: int, per_k: int, head_dim: int):
        self.num_k_heads, self.per_k, self.head_dim = int(num_k_heads), int(per_k), int(head_dim)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        perm = _grouped_from_tiled(self.num_k_heads, self.per_k, self.head_dim).to(t.device)
        return t.index_select(1, perm)


class LogNegate(Transform):
    """`log(-x)` in float32: llama.cpp stores `-exp(A_log)`."""

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(-t.float()).to(t.dtype)


class Chain(Transform):
    """`steps` applied in order."""

    def __init__(self, *steps: Transform):
        self.steps = tuple(steps)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            t = step.apply(t)
        return t

    def __hash__(self):
        return hash(self.steps)


class Qwen35Family(Family):
    gguf_archs = ("qwen35",)
    model_types = ()

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import Qwen3_5TextConfig
        if meta.arch_int("expert_count", 0) > 0:
            raise UnsupportedError("qwen35 with experts is the qwen35moe architecture", file=meta.file,
                                   key="qwen35.expert_count")
        mtp = meta.arch_int("nextn_predict_layers", 0)
        n = meta.arch_int("block_count") - mtp
        head_dim = meta.arch_int("attention.key_length")
        value_heads = meta.arch_int("ssm.time_step_rank")
        interval = meta.arch_int("full_attention_interval", 4)
        recurrent = meta.fields.get("qwen35.attention.recurrent_layers")
        if recurrent is not None:
            recurrent = [bool(r) for r in np.asarray(recurrent).reshape(-1)][:n]
            if len(recurrent) != n:
                raise FileFormatError(f"expected {n} per-layer flags", file=meta.file,
                                      key="qwen35.attention.recurrent_layers")
        else:
            recurrent = [(i + 1) % interval != 0 for i in range(n)]
        sections = meta.fields.get("qwen35.rope.dimension_sections")
        sections = [int(s) for s in np.asarray(sections).reshape(-1) if s] if sections is not None else [11, 11, 10]
        vocab = vocab_size_from(meta, shapes)
        config = Qwen3_5TextConfig(
            vocab_size=vocab, hidden_size=meta.arch_int("embedding_length"),
            intermediate_size=meta.arch_int("feed_forward_length"), num_hidden_layers=n,
            num_attention_heads=meta.arch_int("attention.head_count"),
            num_key_value_heads=meta.arch_int("attention.head_count_kv"), head_dim=head_dim,
            rms_norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon"),
            max_position_embeddings=meta.arch_int("context_length"),
            layer_types=["linear_attention" if r else "full_attention" for r in recurrent],
            full_attention_interval=interval, linear_conv_kernel_dim=meta.arch_int("ssm.conv_kernel"),
            linear_key_head_dim=meta.arch_int("ssm.state_size"), linear_num_key_heads=meta.arch_int("ssm.group_count"),
            linear_num_value_heads=value_heads, linear_value_head_dim=meta.arch_int("ssm.inner_size") // value_heads,
            rope_parameters={"rope_type": "default", "rope_theta": meta.arch_float("rope.freq_base", 10000.0),
                             "mrope_section": sections, "mrope_interleaved": True,
                             "partial_rotary_factor": meta.arch_int("rope.dimension_count") / head_dim},
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        return finish_config(config, "Qwen3_5ForCausalLM"), []

    def rules(self, config):
        e, ff, v = config.hidden_size, config.intermediate_size, config.vocab_size
        hd, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
        khd, vhd = config.linear_key_head_dim, config.linear_value_head_dim
        per_k, qk_rows = nv // nk, 2 * nk * khd
        norm = AddScalar(-1.0)
        rules = [TensorRule("token_embd.weight", "model.embed_tokens.weight", (v, e)),
                 TensorRule("output_norm.weight", "model.norm.weight", (e,), norm)]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (v, e)))
        for i, kind in enumerate(config.layer_types):
            b, h = f"blk.{i}", f"model.layers.{i}"
            rules += [TensorRule(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight", (e,), norm),
                      TensorRule(f"{b}.post_attention_norm.weight", f"{h}.post_attention_layernorm.weight", (e,), norm),
                      TensorRule(f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", (ff, e)),
                      TensorRule(f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", (e, ff))]
            if kind == "linear_attention":
                a = f"{h}.linear_attn"
                rules += [
                    TensorRule(f"{b}.attn_qkv.weight", f"{a}.in_proj_qkv.weight", (qk_rows + nv * vhd, e),
                               ValueHeadRows(nk, per_k, vhd, offset=qk_rows)),
                    TensorRule(f"{b}.attn_gate.weight", f"{a}.in_proj_z.weight", (nv * vhd, e), ValueHeadRows(nk, per_k, vhd)),
                    TensorRule(f"{b}.ssm_alpha.weight", f"{a}.in_proj_a.weight", (nv, e), ValueHeadRows(nk, per_k)),
                    TensorRule(f"{b}.ssm_beta.weight", f"{a}.in_proj_b.weight", (nv, e), ValueHeadRows(nk, per_k)),
                    TensorRule(f"{b}.ssm_conv1d.weight", f"{a}.conv1d.weight", (qk_rows + nv * vhd, config.linear_conv_kernel_dim),
                               Chain(ValueHeadRows(nk, per_k, vhd, offset=qk_rows), InsertAxis(1))),
                    TensorRule(f"{b}.ssm_norm.weight", f"{a}.norm.weight", (vhd,)),
                    TensorRule(f"{b}.ssm_out.weight", f"{a}.out_proj.weight", (e, nv * vhd), ValueHeadColumns(nk, per_k, vhd)),
                    TensorRule(f"{b}.ssm_a", f"{a}.A_log", (nv,), Chain(LogNegate(), ValueHeadRows(nk, per_k))),
                    TensorRule(f"{b}.ssm_dt.bias", f"{a}.dt_bias", (nv,), ValueHeadRows(nk, per_k))]
            else:
                s = f"{h}.self_attn"
                rules += [TensorRule(f"{b}.attn_q.weight", f"{s}.q_proj.weight", (2 * heads * hd, e)),
                          TensorRule(f"{b}.attn_k.weight", f"{s}.k_proj.weight", (kv * hd, e)),
                          TensorRule(f"{b}.attn_v.weight", f"{s}.v_proj.weight", (kv * hd, e)),
                          TensorRule(f"{b}.attn_output.weight", f"{s}.o_proj.weight", (e, heads * hd)),
                          TensorRule(f"{b}.attn_q_norm.weight", f"{s}.q_norm.weight", (hd,), norm),
                          TensorRule(f"{b}.attn_k_norm.weight", f"{s}.k_norm.weight", (hd,), norm)]
        return rules
