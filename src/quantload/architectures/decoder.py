"""What every llama-like decoder shares: the common hyperparameter keys, RoPE settings, token ids,
the attention/MLP/norm tensor names, and the same keys written back for the writer.

Families subclass `DecoderFamily` and override the hooks for what differs (biases, QK norms, Gemma's
extra norms and `w+1` storage, Phi-3's fused projections).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import FileFormatError, UnsupportedError
from .base import Family, Metadata, ReadTensor, TensorRule, expand_layers, f32, u32

# transformers config attribute -> tokenizer.ggml key suffix
TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                 "pad_token_id": "padding_token_id", "unk_token_id": "unknown_token_id"}


def vocab_size_from(meta: Metadata, shapes: dict) -> int:
    """llama.cpp's rule: the vocabulary is the token list (`{arch}.vocab_size` when a file says so);
    the embedding must then agree, which the shape check of `token_embd.weight` enforces."""
    explicit = meta.arch_int("vocab_size", None)
    if explicit is not None:
        return explicit
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens):
        return len(tokens)
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][0]
    raise FileFormatError("cannot tell the vocabulary size: no vocab_size key, token list or token_embd.weight",
                          file=meta.file, key=f"{meta.arch}.vocab_size")


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def block_count_from(meta: Metadata, shapes: dict) -> int:
    """`{arch}.block_count`, checked against the blocks whose tensors the file holds (blk.0 .. blk.n-1)
    before anything is built per declared block: a count the tensors do not bear out is refused."""
    key = f"{meta.arch}.block_count"
    n = meta.arch_int("block_count")
    present = set()
    for name in shapes:
        m = _BLOCK_TENSOR.match(name)
        if m:
            present.add(int(m.group(1)))
    have = max(present) + 1 if present else 0
    if len(present) != have:   # a gap (or a stray huge index): the first missing blocks, without a range()
        holes = [i for i in range(min(have, len(present) + 5)) if i not in present][:5]
        raise FileFormatError(f"block_count is {n}, but the file's blk.* tensors stop at blk.{have - 1} with blocks "
                              f"{holes} missing; expected blk.0..blk.{n - 1} each present", file=meta.file, key=key)
    if n != have:
        found = f"tensors for {have} blocks (blk.0..blk.{have - 1})" if have else "no blk.* tensors"
        raise FileFormatError(f"block_count is {n}, but the file holds {found}; expected block_count={have}",
                              file=meta.file, key=key)
    if n < 1:
        raise FileFormatError("expected at least one block, found 0 (and no blk.* tensors)", file=meta.file, key=key)
    return n


def _positive(meta: Metadata, suffix: str, value):
    if value is not None and not value > 0:
        raise FileFormatError(f"expected a positive value, found {value!r}", file=meta.file,
                              key=f"{meta.arch}.{suffix}")
    return value


def token_id_kwargs(meta: Metadata, vocab_size: int) -> dict[str, int]:
    out = {}
    for attr, key in TOKEN_ID_KEYS.items():
        full = f"tokenizer.ggml.{key}"
        value = meta.int(full, None)
        if value is None:
            continue
        if value >= vocab_size:
            raise FileFormatError(f"token id {value} is outside the vocabulary of {vocab_size}",
                                  file=meta.file, key=full)
        out[attr] = value
    return out


def eos_token_ids(meta: Metadata) -> list[int]:
    """eos, then eot/eom: the ids generation should stop on (llama.cpp's end-of-generation set)."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.int(f"tokenizer.ggml.{key}", None)
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def rope_scaling_from(meta: Metadata) -> dict | None:
    """`{arch}.rope.scaling.*` as a transformers `rope_scaling` dict (None when unscaled)."""
    kind = meta.arch_str("rope.scaling.type", None)
    if kind is None:
        legacy = meta.arch_float("rope.scale_linear", None)   # pre-2024 files
        if legacy is not None and legacy != 1.0:
            return {"rope_type": "linear", "factor": legacy}
        return None
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _positive(meta, "rope.scaling.factor",
                                                           meta.arch_float("rope.scaling.factor"))}
    if kind == "yarn":
        scaling = {"rope_type": "yarn",
                   "factor": _positive(meta, "rope.scaling.factor", meta.arch_float("rope.scaling.factor")),
                   "original_max_position_embeddings": _positive(
                       meta, "rope.scaling.original_context_length",
                       meta.arch_int("rope.scaling.original_context_length"))}
        for hf_key, suffix in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                               ("attention_factor", "yarn_attn_factor")):
            value = meta.arch_float(f"rope.scaling.{suffix}", None)
            if value is not None:
                scaling[hf_key] = value
        return scaling
    if kind == "longrope":
        return {"rope_type": "longrope"}    # the factors live in tensors; the family completes it
    raise UnsupportedError(f"RoPE scaling type {kind!r} is not supported (supported: none, linear, yarn, "
                           "longrope for phi3, llama3 through rope_freqs)",
                           file=meta.file, key=f"{meta.arch}.rope.scaling.type")


def hf_rope(config, layer_type: str | None = None) -> dict:
    """The config's RoPE settings as one dict with `rope_theta` and `rope_type`, from transformers 5's
    `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    return out


def rope_scaling_fields(rope: dict, prefix: str) -> dict[str, Any]:
    """The inverse of `rope_scaling_from`, for the writer (llama3 and longrope go into tensors)."""
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return {f"{prefix}.rope.scaling.type": "linear", f"{prefix}.rope.scaling.factor": f32(rope["factor"])}
    if kind == "yarn":
        out = {f"{prefix}.rope.scaling.type": "yarn", f"{prefix}.rope.scaling.factor": f32(rope["factor"]),
               f"{prefix}.rope.scaling.original_context_length": u32(rope["original_max_position_embeddings"])}
        for hf_key, suffix in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                               ("attention_factor", "yarn_attn_factor")):
            if rope.get(hf_key) is not None:
                out[f"{prefix}.rope.scaling.{suffix}"] = f32(rope[hf_key])
        return out
    return {}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def finish_config(config, class_name: str):
    """Name the model class, and drop a class-default token id the vocabulary does not have (Phi3Config
    defaults pad to 32000; a file that states no pad id must not get an embedding padding_idx past its
    end)."""
    config.architectures = [class_name]
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, attr, None)
    return config


class DecoderFamily(Family):
    """A llama-shaped decoder: embeddings, N blocks of attention + gated MLP, final norm, lm_head."""

    #: GGUF norm tensor suffix -> transformers module name inside a layer
    layer_norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    #: Gemma stores RMSNorm weights as `w + 1`; the value added to the file's tensor on load
    norm_offset = 0.0
    #: the config attribute holding the norm epsilon, and the GGUF key (after `{arch}.`) it is written to
    eps_attr = "rms_norm_eps"
    gguf_eps_key = "attention.layer_norm_rms_epsilon"

    # --- GGUF -> transformers ------------------------------------------------------------------------
    def config_class(self, meta: Metadata):
        raise NotImplementedError

    def common_kwargs(self, meta: Metadata, shapes: dict) -> dict[str, Any]:
        hidden = meta.arch_int("embedding_length")
        heads = meta.arch_int("attention.head_count")
        if heads == 0:
            raise FileFormatError("expected at least one attention head, found 0", file=meta.file,
                                  key=f"{meta.arch}.attention.head_count")
        kv_heads = meta.arch_int("attention.head_count_kv", heads)
        if kv_heads == 0 or heads % kv_heads:
            raise FileFormatError(f"expected a divisor of attention.head_count ({heads}), found {kv_heads}",
                                  file=meta.file, key=f"{meta.arch}.attention.head_count_kv")
        key_length = meta.arch_int("attention.key_length", None)
        value_length = meta.arch_int("attention.value_length", key_length)
        if key_length is not None and value_length != key_length:
            raise UnsupportedError(f"key length {key_length} differs from value length {value_length}",
                                   file=meta.file, key=f"{meta.arch}.attention.value_length")
        vocab = vocab_size_from(meta, shapes)
        _positive(meta, "embedding_length", hidden)
        _positive(meta, "vocab_size", vocab)
        kwargs = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_positive(meta, "feed_forward_length", meta.arch_int("feed_forward_length")),
            num_hidden_layers=block_count_from(meta, shapes),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=key_length if key_length is not None else hidden // heads,
            max_position_embeddings=_positive(meta, "context_length", meta.arch_int("context_length")),
            rms_norm_eps=_positive(meta, "attention.layer_norm_rms_epsilon",
                                   meta.arch_float("attention.layer_norm_rms_epsilon")),
            rope_theta=_positive(meta, "rope.freq_base", meta.arch_float("rope.freq_base", 10000.0)),  # llama.cpp's default
            tie_word_embeddings="output.weight" not in shapes,
            **token_id_kwargs(meta, vocab),
        )
        scaling = rope_scaling_from(meta)
        if scaling is not None:
            kwargs["rope_scaling"] = scaling
        return kwargs

    def config_kwargs(self, meta: Metadata, shapes: dict, read_tensor: ReadTensor | None
                      ) -> tuple[dict[str, Any], list[str]]:
        """Family hook: the config kwargs, and the GGUF tensors consumed into them."""
        return self.common_kwargs(meta, shapes), []

    def config_from_gguf(self, meta, shapes, read_tensor):
        kwargs, consumed = self.config_kwargs(meta, shapes, read_tensor)
        if kwargs.get("rope_scaling", {}).get("rope_type") == "longrope":
            raise UnsupportedError(f"longrope RoPE scaling is not supported for {meta.arch}",
                                   file=meta.file, key=f"{meta.arch}.rope.scaling.type")
        config = self.config_class(meta)(**kwargs)
        return finish_config(config, self.causal_lm_class(config)), consumed

    def causal_lm_class(self, config) -> str:
        return type(config).__name__.replace("Config", "ForCausalLM")

    # --- tensor names -------------------------------------------------------------------------------
    def norm_transform(self):
        from .transforms import AddScalar
        return AddScalar(self.norm_offset) if self.norm_offset else None

    def attention_rules(self, config) -> list[TensorRule]:
        hidden, hd = config.hidden_size, head_dim_of(config)
        q_rows, kv_rows = config.num_attention_heads * hd, kv_heads_of(config) * hd
        q_t, k_t = self.qk_transforms(config)
        rules = [
            TensorRule("blk.{bid}.attn_q.weight", "model.layers.{bid}.self_attn.q_proj.weight", (q_rows, hidden), q_t),
            TensorRule("blk.{bid}.attn_k.weight", "model.layers.{bid}.self_attn.k_proj.weight", (kv_rows, hidden), k_t),
            TensorRule("blk.{bid}.attn_v.weight", "model.layers.{bid}.self_attn.v_proj.weight", (kv_rows, hidden)),
            TensorRule("blk.{bid}.attn_output.weight", "model.layers.{bid}.self_attn.o_proj.weight", (hidden, q_rows)),
        ]
        if self.has_qkv_bias(config):
            rules += [
                TensorRule("blk.{bid}.attn_q.bias", "model.layers.{bid}.self_attn.q_proj.bias", (q_rows,), q_t),
                TensorRule("blk.{bid}.attn_k.bias", "model.layers.{bid}.self_attn.k_proj.bias", (kv_rows,), k_t),
                TensorRule("blk.{bid}.attn_v.bias", "model.layers.{bid}.self_attn.v_proj.bias", (kv_rows,)),
            ]
        if self.has_o_bias(config):
            rules.append(TensorRule("blk.{bid}.attn_output.bias", "model.layers.{bid}.self_attn.o_proj.bias", (hidden,)))
        if self.has_qk_norm(config):
            rules += [
                TensorRule("blk.{bid}.attn_q_norm.weight", "model.layers.{bid}.self_attn.q_norm.weight", (hd,),
                           self.norm_transform()),
                TensorRule("blk.{bid}.attn_k_norm.weight", "model.layers.{bid}.self_attn.k_norm.weight", (hd,),
                           self.norm_transform()),
            ]
        return rules

    def mlp_rules(self, config) -> list[TensorRule]:
        hidden, ff = config.hidden_size, config.intermediate_size
        rules = [
            TensorRule("blk.{bid}.ffn_gate.weight", "model.layers.{bid}.mlp.gate_proj.weight", (ff, hidden)),
            TensorRule("blk.{bid}.ffn_up.weight", "model.layers.{bid}.mlp.up_proj.weight", (ff, hidden)),
            TensorRule("blk.{bid}.ffn_down.weight", "model.layers.{bid}.mlp.down_proj.weight", (hidden, ff)),
        ]
        if getattr(config, "mlp_bias", False):
            rules += [
                TensorRule("blk.{bid}.ffn_gate.bias", "model.layers.{bid}.mlp.gate_proj.bias", (ff,)),
                TensorRule("blk.{bid}.ffn_up.bias", "model.layers.{bid}.mlp.up_proj.bias", (ff,)),
                TensorRule("blk.{bid}.ffn_down.bias", "model.layers.{bid}.mlp.down_proj.bias", (hidden,)),
            ]
        return rules

    def norm_rules(self, config) -> list[TensorRule]:
        return [TensorRule(f"blk.{{bid}}.{g}.weight", f"model.layers.{{bid}}.{h}.weight", (config.hidden_size,),
                           self.norm_transform()) for g, h in self.layer_norms.items()]

    def rules(self, config) -> list[TensorRule]:
        hidden = config.hidden_size
        rules = [TensorRule("token_embd.weight", "model.embed_tokens.weight", (config.vocab_size, hidden)),
                 TensorRule("output_norm.weight", "model.norm.weight", (hidden,), self.norm_transform())]
        if not config.tie_word_embeddings:
            rules.append(TensorRule("output.weight", "lm_head.weight", (config.vocab_size, hidden)))
        per_layer = self.attention_rules(config) + self.mlp_rules(config) + self.norm_rules(config)
        return rules + expand_layers(config.num_hidden_layers, per_layer)

    # hooks
    def qk_transforms(self, config):
        return None, None

    def has_qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def has_o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def has_qk_norm(self, config) -> bool:
        return False

    # --- transformers -> GGUF (writer) --------------------------------------------------------------
    def fields_from_config(self, config, arch: str) -> dict[str, Any]:
        rope = hf_rope(config, "full_attention")
        fields: dict[str, Any] = {
            "general.architecture": arch,
            f"{arch}.vocab_size": u32(config.vocab_size),
            f"{arch}.context_length": u32(config.max_position_embeddings),
            f"{arch}.embedding_length": u32(config.hidden_size),
            f"{arch}.block_count": u32(config.num_hidden_layers),
            f"{arch}.feed_forward_length": u32(config.intermediate_size),
            f"{arch}.attention.head_count": u32(config.num_attention_heads),
            f"{arch}.attention.head_count_kv": u32(kv_heads_of(config)),
            f"{arch}.{self.gguf_eps_key}": f32(getattr(config, self.eps_attr)),
            f"{arch}.attention.key_length": u32(head_dim_of(config)),
            f"{arch}.attention.value_length": u32(head_dim_of(config)),
            f"{arch}.rope.dimension_count": u32(self.rope_dims(config)),
            f"{arch}.rope.freq_base": f32(rope.get("rope_theta", 10000.0)),
        }
        fields.update(rope_scaling_fields(rope, arch))
        return fields

    def rope_dims(self, config) -> int:
        rope = hf_rope(config)
        return int(head_dim_of(config) * rope.get("partial_rotary_factor",
                                                  getattr(config, "partial_rotary_factor", 1.0) or 1.0))


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """`rope_freqs.weight` as `convert_hf_to_gguf.py` computes it from a llama3 `rope_scaling`."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs),
                      torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), medium))
    return out.float()


def llama3_rope_from_factors(factors: torch.Tensor, theta: float, head_dim: int, *, file=None) -> dict:
    """Recover a llama3 `rope_scaling` from the `rope_freqs.weight` llama.cpp stores instead of it.

    The factors are 1 (short wavelengths), `factor` (long ones) and `1/((1-s)/factor + s)` between, with
    `s = (old_ctx/wavelen - low)/(high - low)` linear in 1/wavelen. Only the ratios low/old_ctx and
    high/old_ctx matter to the rotary frequencies, so we fix low_freq_factor = 1, fit the line through
    the in-between factors, and accept the result only if it reproduces every stored factor.
    """
    f = factors.double().reshape(-1)
    if f.numel() != head_dim // 2:
        raise FileFormatError(f"expected {head_dim // 2} RoPE factors (head_dim/2), found {f.numel()}",
                              file=file, key="rope_freqs.weight")
    factor = float(f.max())
    candidate = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    inv_wavelen = freqs / (2 * math.pi)
    medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor > 1 and int(medium.sum()) >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = torch.linalg.lstsq(torch.stack([inv_wavelen[medium], torch.ones_like(s)], 1), s[:, None]).solution[:, 0]
        if b < 0:
            old_ctx, high = float(-a / b), float(1 - 1 / b)
            candidate.update(original_max_position_embeddings=int(round(old_ctx)), high_freq_factor=round(high, 6))
    candidate["rope_theta"] = theta
    rebuilt = llama3_rope_factors(candidate, head_dim).double()
    if not torch.allclose(rebuilt, f, rtol=1e-4, atol=1e-6):
        raise UnsupportedError("rope_freqs.weight does not follow the llama3 RoPE scaling rule; "
                               "cannot express it as a transformers rope_scaling", file=file, key="rope_freqs.weight")
    del candidate["rope_theta"]
    return candidate
