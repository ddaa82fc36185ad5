"""mamba (Mamba 1: state-spaces/mamba-*, falcon-mamba's layout without its B/C/dt norms): GGUF
architecture `mamba`.

No attention: each block is an RMSNorm and a selective-scan mixer. The converter stores `A` as
`-exp(A_log)` (`ssm_a`, log(-x) on load) and squeezes the depthwise conv kernel to [d_inner, K] (its
middle axis back on load); both are float tensors in the files llama.cpp writes. Files that ask for
the B/C/dt RMSNorms (`ssm.dt_b_c_rms`, Falcon-Mamba) raise UnsupportedError: transformers' Mamba
has none (Falcon-Mamba is its own model there). Not written back yet.
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import Family, TensorRule, expand_layers
from .decoder import finish_config, token_id_kwargs, vocab_size_from
from .lfm2 import InsertAxis
from .qwen35 import LogNegate


class MambaFamily(Family):
    gguf_archs = ("mamba",)
    model_types = ()

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import MambaConfig
        if meta.fields.get("mamba.ssm.dt_b_c_rms"):
            raise UnsupportedError("mamba with B/C/dt RMSNorms (Falcon-Mamba) is not supported yet",
                                   file=meta.file, key="mamba.ssm.dt_b_c_rms")
        hidden, inner = meta.arch_int("embedding_length"), meta.arch_int("ssm.inner_size")
        vocab = vocab_size_from(meta, shapes)
        config = MambaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, expand=inner // hidden,
            state_size=meta.arch_int("ssm.state_size"), num_hidden_layers=meta.arch_int("block_count"),
            conv_kernel=meta.arch_int("ssm.conv_kernel"), time_step_rank=meta.arch_int("ssm.time_step_rank"),
            layer_norm_epsilon=meta.arch_float("attention.layer_norm_rms_epsilon"),
            use_conv_bias="blk.0.ssm_conv1d.bias" in shapes, use_bias="blk.0.ssm_in.bias" in shapes,
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        return finish_config(config, "MambaForCausalLM"), []

    def rules(self, config):
        e, d, n, r = config.hidden_size, config.intermediate_size, config.state_size, config.time_step_rank
        rules = [TensorRule("token_embd.weight", "backbone.embeddings.weight", (config.vocab_size, e)),
                 TensorRule("output_norm.weight", "backbone.norm_f.weight", (e,))]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (config.vocab_size, e)))
        m = "backbone.layers.{bid}.mixer"
        per_layer = [TensorRule("blk.{bid}.attn_norm.weight", "backbone.layers.{bid}.norm.weight", (e,)),
                     TensorRule("blk.{bid}.ssm_in.weight", f"{m}.in_proj.weight", (2 * d, e)),
                     TensorRule("blk.{bid}.ssm_conv1d.weight", f"{m}.conv1d.weight", (d, config.conv_kernel),
                                InsertAxis(1)),
                     TensorRule("blk.{bid}.ssm_x.weight", f"{m}.x_proj.weight", (r + 2 * n, d)),
                     TensorRule("blk.{bid}.ssm_dt.weight", f"{m}.dt_proj.weight", (d, r)),
                     TensorRule("blk.{bid}.ssm_dt.bias", f"{m}.dt_proj.bias", (d,)),
                     TensorRule("blk.{bid}.ssm_a", f"{m}.A_log", (d, n), LogNegate()),
                     TensorRule("blk.{bid}.ssm_d", f"{m}.D", (d,)),
                     TensorRule("blk.{bid}.ssm_out.weight", f"{m}.out_proj.weight", (e, d))]
        if config.use_conv_bias:
            per_layer.append(TensorRule("blk.{bid}.ssm_conv1d.bias", f"{m}.conv1d.bias", (d,)))
        if config.use_bias:
            per_layer += [TensorRule("blk.{bid}.ssm_in.bias", f"{m}.in_proj.bias", (2 * d,)),
                          TensorRule("blk.{bid}.ssm_out.bias", f"{m}.out_proj.bias", (e,))]
        return rules + expand_layers(config.num_hidden_layers, per_layer)
