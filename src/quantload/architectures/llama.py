"""llama (Llama 2/3, SmolLM, TinyLlama, Mistral 7B...): GGUF architecture `llama`.

llama.cpp permutes the rows of Q and K for its RoPE layout (undone here, row-wise), and stores Llama 3.1+
RoPE scaling as a `rope_freqs.weight` tensor rather than metadata (recovered into the config here; that
needs `read_tensor`). Mistral models are converted as `llama` too; a file whose name says Mistral gets a
MistralConfig with no sliding window, which is what llama.cpp runs.
"""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import Metadata, UnsupportedArchitecture
from .decoder import DecoderFamily, head_dim_of, hf_rope, kv_heads_of, llama3_rope_factors, llama3_rope_from_factors
from .transforms import RopeUnpermute


def _named_mistral(meta: Metadata) -> bool:
    names = [meta.fields.get(k) for k in ("general.name", "general.basename")]
    return any(isinstance(n, str) and "mistral" in n.lower() for n in names)


class LlamaFamily(DecoderFamily):
    gguf_archs = ("llama",)
    model_types = ("llama", "mistral")

    def config_class(self, meta):
        if _named_mistral(meta):
            from transformers import MistralConfig
            return MistralConfig
        from transformers import LlamaConfig
        return LlamaConfig

    def config_kwargs(self, meta, shapes, read_tensor):
        if meta.arch_int("expert_count", 0) > 0:
            raise UnsupportedArchitecture("llama with experts (Mixtral-style MoE) is not supported yet",
                                          file=meta.file, key="llama.expert_count")
        kwargs = self.common_kwargs(meta, shapes)
        rope_dims = meta.arch_int("rope.dimension_count", kwargs["head_dim"])
        if rope_dims != kwargs["head_dim"]:
            raise UnsupportedError(f"partial RoPE ({rope_dims} of {kwargs['head_dim']} head dims) is not "
                                   "supported for llama", file=meta.file, key="llama.rope.dimension_count")
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in shapes
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
        if _named_mistral(meta):
            kwargs.pop("mlp_bias")
            if kwargs.pop("attention_bias"):
                raise UnsupportedError("Mistral with attention biases is not supported", file=meta.file,
                                       key="blk.0.attn_q.bias")
            kwargs["sliding_window"] = meta.arch_int("attention.sliding_window", None)
        consumed = []
        if "rope_freqs.weight" in shapes:
            if read_tensor is None:
                raise UnsupportedError("this file stores its RoPE scaling (Llama 3.1+) in rope_freqs.weight; "
                                       "pass read_tensor so it can be read into the config",
                                       file=meta.file, key="rope_freqs.weight")
            scaling = llama3_rope_from_factors(read_tensor("rope_freqs.weight"), kwargs["rope_theta"],
                                               kwargs["head_dim"], file=meta.file)
            if scaling["factor"] != 1.0:
                kwargs["rope_scaling"] = scaling
            consumed.append("rope_freqs.weight")
        return kwargs, consumed

    def qk_transforms(self, config):
        return RopeUnpermute(config.num_attention_heads), RopeUnpermute(kv_heads_of(config))

    def has_qkv_bias(self, config):
        return bool(getattr(config, "attention_bias", False))

    def fields_from_config(self, config, arch):
        # A Mistral's sliding_window is not written: llama.cpp's own converter drops it too.
        fields = super().fields_from_config(config, arch)
        rope = hf_rope(config)
        if rope["rope_type"] not in ("default", "linear", "yarn", "llama3"):
            raise UnsupportedError(f"RoPE type {rope['rope_type']!r} cannot be written for llama",
                                   key="rope_parameters")
        return fields

    def extra_tensors(self, config, arch):
        rope = hf_rope(config)
        if rope["rope_type"] == "llama3":
            return {"rope_freqs.weight": llama3_rope_factors(rope, head_dim_of(config))}
        return {}
