"""GGUF metadata and tensor names <-> transformers configs and parameter names, per model family.

    spec = gguf_to_hf(fields, tensors, file=path)       # config + {hf_param: ParamRef(gguf_name, transform)}
    arch, fields, names = hf_to_gguf(config, state_dict_names)   # for the GGUF writer
    extra = gguf_extra_tensors(config)                  # rope_freqs / rope factors the writer must add

`fields` is the GGUF key-value metadata (scalars as Python values, numeric arrays as numpy arrays,
string arrays as lists); `tensors` maps a GGUF tensor name to `(shape_in_torch_order, ggml_type)` or to
an object with `.shape` (a TensorInfo).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import FileFormatError, MissingTensorError, QuantloadError, ShapeMismatchError, UnsupportedError
from .base import (Family, GGUFModelMap, Metadata, ParamRef, ReadTensor, UnsupportedArchitecture,
                   config_rejected, tensor_shapes)
from .decoder import eos_token_ids
from .bloom import BloomFamily
from .deci import DeciFamily
from .falcon import FalconFamily
from .gemma import Gemma2Family, Gemma3Family
from .gemma4 import Gemma4Family
from .gpt2 import GPT2Family
from .lfm2 import Lfm2Family
from .llama import LlamaFamily
from .mamba import MambaFamily
from .nemotron import NemotronFamily
from .phi3 import Phi3Family
from .qwen import Qwen2Family, Qwen3Family
from .qwen35 import Qwen35Family
from .stablelm import StableLmFamily
from .starcoder2 import Starcoder2Family
from .t5 import T5Family
from .transforms import AddScalar, RopePermute, RopeUnpermute, Transform

__all__ = ["gguf_to_hf", "hf_to_gguf", "gguf_extra_tensors", "GGUFModelMap", "GGUFWriteMap", "ParamRef",
           "Transform", "RopeUnpermute", "RopePermute", "AddScalar", "UnsupportedArchitecture",
           "SUPPORTED_GGUF_ARCHITECTURES", "SUPPORTED_MODEL_TYPES"]

_FAMILIES: list[Family] = [LlamaFamily(), Qwen2Family(), Qwen3Family(), Gemma2Family(), Gemma3Family(),
                           Phi3Family()]
_FAMILIES += [GPT2Family(), Starcoder2Family(), StableLmFamily(), NemotronFamily(), FalconFamily(),
              BloomFamily(), DeciFamily(), Lfm2Family(), Qwen35Family(), Gemma4Family(), MambaFamily(), T5Family()]
_BY_GGUF_ARCH = {arch: fam for fam in _FAMILIES for arch in fam.gguf_archs}
_BY_MODEL_TYPE = {mt: fam for fam in _FAMILIES for mt in fam.model_types}

SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_BY_GGUF_ARCH))
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def _family_for_gguf(arch: str, file) -> Family:
    family = _BY_GGUF_ARCH.get(arch)
    if family is None:
        raise UnsupportedArchitecture(
            f"GGUF architecture {arch!r} is not mapped to a transformers model yet; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}", file=file, key="general.architecture")
    return family


def gguf_to_hf(fields: Mapping[str, Any], tensors: Mapping[str, Any], *, file=None,
               read_tensor: ReadTensor | None = None) -> GGUFModelMap:
    """The transformers config for a GGUF file and, for every parameter of the model built from it, the
    GGUF tensor it comes from and the transform to apply.

    `read_tensor(name) -> float Tensor` is needed only for files that keep RoPE scaling in tensors
    (Llama 3.1+ `rope_freqs`, Phi-3 128k `rope_factors_*`); without it those raise UnsupportedError.
    Raises UnsupportedArchitecture, FileFormatError (bad/missing metadata), MissingTensorError and
    ShapeMismatchError (tensors that do not fit the config), each naming the key.
    """
    file = str(file) if file is not None else None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise FileFormatError(f"expected a string architecture name, found {arch!r}", file=file,
                              key="general.architecture")
    family = _family_for_gguf(arch, file)
    shapes = tensor_shapes(tensors)
    meta = Metadata(fields, arch, file)
    try:
        config, consumed = family.config_from_gguf(meta, shapes, read_tensor)
    except QuantloadError:
        raise
    except Exception as e:  # transformers' own config validation (strict dataclasses, RoPE checks)
        raise config_rejected(e, arch, file) from e
    params: dict[str, ParamRef] = {}
    for rule in family.rules(config):
        found = shapes.get(rule.gguf)
        if found is None:
            raise MissingTensorError(f"tensor is missing (it holds {rule.hf}, shape {rule.shape})",
                                     file=file, key=rule.gguf)
        if found != rule.shape:
            raise ShapeMismatchError(f"shape {found} does not fit {rule.hf}: expected {rule.shape} from the "
                                     "file's metadata", file=file, key=rule.gguf)
        params[rule.hf] = ParamRef(rule.gguf, rule.transform, rule.shape)
    used = {ref.gguf_name for ref in params.values()}
    unused = sorted(name for name in shapes if name not in used)
    return GGUFModelMap(arch=arch, config=config, params=params, tied=bool(config.tie_word_embeddings),
                        unused=unused, eos_token_ids=eos_token_ids(meta), consumed=list(consumed),
                        adapt=family.adapt)


class GGUFWriteMap(NamedTuple):
    arch: str
    fields: dict[str, Any]                                # numpy scalars carry the GGUF type (uint32, float32)
    names: dict[str, tuple[str, Transform | None]]        # hf name -> (gguf name, transform to apply first)


def _family_for_config(config) -> Family:
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(
            f"transformers model_type {model_type!r} has no GGUF mapping yet; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}", key="model_type")
    return family


def hf_to_gguf(config, state_dict_names: Iterable[str]) -> GGUFWriteMap:
    """For the GGUF writer: the architecture, the `{arch}.*` metadata for `config` (tokenizer keys come
    from `gguf_tokenizer.tokenizer_fields`), and for each state-dict name the GGUF name and the
    transform (inverse of the load one) to apply before encoding. A tied lm_head is skipped; any other
    name the mapping does not know raises UnsupportedError rather than being dropped silently."""
    family = _family_for_config(config)
    arch = family.gguf_arch_for(config)
    fields = family.fields_from_config(config, arch)
    by_hf = {rule.hf: rule for rule in family.rules(config)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names: dict[str, tuple[str, Transform | None]] = {}
    for name in state_dict_names:
        rule = by_hf.get(name)
        if rule is None:
            if tied and name == "lm_head.weight":
                continue
            raise UnsupportedError(f"parameter {name!r} has no GGUF name for {arch}", key=name)
        names[name] = (rule.gguf, rule.transform.inverse() if rule.transform is not None else None)
    missing = sorted(set(by_hf) - set(names))
    if missing:
        raise MissingTensorError(f"{len(missing)} parameters the {arch} GGUF needs are absent from the state "
                                 f"dict, e.g. {missing[:3]}", key=missing[0])
    return GGUFWriteMap(arch, fields, names)


def gguf_extra_tensors(config) -> dict:
    """Tensors llama.cpp expects that are not parameters: `rope_freqs.weight` (llama3 RoPE) and
    `rope_factors_long/short.weight` (Phi-3 LongRoPE), as float32."""
    family = _family_for_config(config)
    return family.extra_tensors(config, family.gguf_arch_for(config))


# --- mixture-of-experts families (registered here, after the dense ones, so each list stays one edit) ---
def _register(*families: Family) -> None:
    global SUPPORTED_GGUF_ARCHITECTURES, SUPPORTED_MODEL_TYPES
    for fam in families:
        _FAMILIES.append(fam)
        _BY_GGUF_ARCH.update({arch: fam for arch in fam.gguf_archs})
        _BY_MODEL_TYPE.update({mt: fam for mt in fam.model_types})
    SUPPORTED_GGUF_ARCHITECTURES = tuple(sorted(_BY_GGUF_ARCH))
    SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


from .gpt_oss import GptOssFamily  # noqa: E402
from .minimax import MiniMaxM2Family  # noqa: E402
from .mixtral import MixtralFamily  # noqa: E402
from .qwen_moe import Qwen2MoeFamily, Qwen3MoeFamily  # noqa: E402

# MixtralFamily takes over `llama` (it is LlamaFamily for files without experts)
_register(Qwen2MoeFamily(), Qwen3MoeFamily(), GptOssFamily(), MixtralFamily(), MiniMaxM2Family())
