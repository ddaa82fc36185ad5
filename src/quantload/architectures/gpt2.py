"""gpt2 (GPT-2 and its fine-tunes): GGUF architecture `gpt2`.

transformers' GPT-2 projects with `Conv1D`, whose weight is the transpose of an nn.Linear's;
`convert_hf_to_gguf.py` transposes c_attn/c_proj/c_fc into the Linear layout llama.cpp multiplies by.
Transposing packed blocks back is impossible without dequantizing, so the model built here has
nn.Linear modules where transformers has Conv1D (`adapt`): the same function (x @ W.T + b with W the
file's tensor), and the blocks stay the file's bytes. Its state dict therefore holds those four
weights as [out, in], llama.cpp's layout, not transformers' [in, out].
"""
from __future__ import annotations

from .base import Family, TensorRule, expand_layers
from .decoder import finish_config, token_id_kwargs, vocab_size_from


def linear_from_conv1d(model) -> None:
    """Every transformers `Conv1D` of `model` replaced by an nn.Linear of the same function (meta)."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            in_features, out_features = mod.weight.shape
            with torch.device("meta"):
                linear = nn.Linear(in_features, out_features, bias=mod.bias is not None, dtype=mod.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)


def layer_norm_rules(gguf: str, hf: str, width: int) -> list[TensorRule]:
    """A LayerNorm's weight and bias."""
    return [TensorRule(f"{gguf}.weight", f"{hf}.weight", (width,)), TensorRule(f"{gguf}.bias", f"{hf}.bias", (width,))]


def linear_rules(gguf: str, hf: str, rows: int, cols: int, bias: bool = True, transform=None) -> list[TensorRule]:
    rules = [TensorRule(f"{gguf}.weight", f"{hf}.weight", (rows, cols), transform)]
    if bias:
        rules.append(TensorRule(f"{gguf}.bias", f"{hf}.bias", (rows,), transform))
    return rules


class GPT2Family(Family):
    gguf_archs = ("gpt2",)
    # not written back: a transformers GPT-2 keeps Conv1D weights [in, out], which the GGUF writer would
    # store untransposed; until it can tell the two layouts apart, saving a gpt2 model is refused
    model_types = ()

    def config_from_gguf(self, meta, shapes, read_tensor):
        from transformers import GPT2Config
        hidden = meta.arch_int("embedding_length")
        ff = meta.arch_int("feed_forward_length", 4 * hidden)
        vocab = vocab_size_from(meta, shapes)
        config = GPT2Config(
            vocab_size=vocab, n_positions=shapes.get("position_embd.weight", (meta.arch_int("context_length"),))[0],
            n_embd=hidden,
            n_layer=meta.arch_int("block_count"), n_head=meta.arch_int("attention.head_count"),
            n_inner=None if ff == 4 * hidden else ff,
            layer_norm_epsilon=meta.arch_float("attention.layer_norm_epsilon"),
            activation_function="gelu_new",          # llama.cpp: ggml_gelu, the tanh approximation
            tie_word_embeddings="output.weight" not in shapes, **token_id_kwargs(meta, vocab))
        return finish_config(config, "GPT2LMHeadModel"), []

    def adapt(self, model) -> None:
        linear_from_conv1d(model)

    def rules(self, config):
        e, ff = config.n_embd, config.n_inner or 4 * config.n_embd
        rules = [TensorRule("token_embd.weight", "transformer.wte.weight", (config.vocab_size, e)),
                 TensorRule("position_embd.weight", "transformer.wpe.weight", (config.n_positions, e)),
                 *layer_norm_rules("output_norm", "transformer.ln_f", e)]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (config.vocab_size, e)))
        h = "transformer.h.{bid}"
        per_layer = [*layer_norm_rules("blk.{bid}.attn_norm", f"{h}.ln_1", e),
                     *linear_rules("blk.{bid}.attn_qkv", f"{h}.attn.c_attn", 3 * e, e),
                     *linear_rules("blk.{bid}.attn_output", f"{h}.attn.c_proj", e, e),
                     *layer_norm_rules("blk.{bid}.ffn_norm", f"{h}.ln_2", e),
                     *linear_rules("blk.{bid}.ffn_up", f"{h}.mlp.c_fc", ff, e),
                     *linear_rules("blk.{bid}.ffn_down", f"{h}.mlp.c_proj", e, ff)]
        return rules + expand_layers(config.n_layer, per_layer)
