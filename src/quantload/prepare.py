"""Prepare: the model skeleton on the meta device and quantized modules in place.

Parameters are created on the meta device (no memory); buffers stay real, because many are computed in
`__init__` (rotary inv_freq, position ids, embedding scales) and never stored in checkpoints.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch
from torch import nn

from .errors import ConfigError, UnsupportedError
from .runtime.modules import QEmbedding, QLinear

#: torch.nn.init's in-place initializers, which module constructors call on their fresh parameters
_TORCH_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                         "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                         "orthogonal_", "sparse_")


def _skipping_meta(init):
    """`init` made a no-op on meta tensors (it writes nothing there anyway, but the meta decompositions
    cost ~0.1 ms a call: 20 ms for a 135M model's Linear.reset_parameters)."""
    @functools.wraps(init)
    def guarded(tensor, *args, **kwargs):
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return init(tensor, *args, **kwargs)
    return guarded


@contextlib.contextmanager
def meta_parameters():
    """Inside this context, every nn.Parameter registered is created on the meta device, and initializing
    it costs nothing (buffers stay real and are initialized as usual)."""
    original = nn.Module.register_parameter
    original_inits = {n: getattr(nn.init, n) for n in _TORCH_INIT_FUNCTIONS if hasattr(nn.init, n)}

    def register_parameter(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        if param is not None:
            # transformers' init functions skip flagged tensors: initializing a meta tensor writes nothing
            # but costs ~1 ms each through torch's meta decompositions (0.2 s for a 135M model)
            param._is_hf_initialized = True
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    for n, init in original_inits.items():
        setattr(nn.init, n, _skipping_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for n, init in original_inits.items():
            setattr(nn.init, n, init)


def model_class_for(config, *, causal_preferred: bool = True, file: str | None = None):
    """The transformers class named by config.architectures, else an Auto class for the model type."""
    import transformers
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"architectures={archs!r}; expected a list of transformers model class names",
                          file=file, key="architectures")
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ConfigError(f"architectures names {arch!r}, which is not a transformers model class; expected "
                              "e.g. 'LlamaForCausalLM'", file=file, key="architectures")
        if cls.__name__.endswith("PreTrainedModel"):   # the shared base of a family: no layers of its own
            raise ConfigError(f"architectures names {arch!r}, an abstract base class with no layers; expected a "
                              "concrete model class such as 'LlamaForCausalLM'", file=file, key="architectures")
        return cls
    from transformers import AutoModel, AutoModelForCausalLM
    if causal_preferred:
        try:
            return AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError:
            pass
    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        raise UnsupportedError(f"transformers has no model class for model_type "
                               f"{getattr(config, 'model_type', '?')!r}") from None


def build_skeleton(config, dtype: torch.dtype, *, trust_remote_code: bool = False, source=None,
                   file: str | None = None) -> nn.Module:
    """A transformers model from its config, parameters on meta, in `dtype`. With the checkpoint's
    `source`, the config is first checked against the tensors the checkpoint holds (check_config): a
    config that declares more than the checkpoint could hold is refused before anything is built."""
    if source is not None:
        check_config(config, source, file=file)
    cls = None
    try:
        if trust_remote_code and getattr(config, "auto_map", None):
            from transformers import AutoModelForCausalLM
            with meta_parameters():
                return AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=dtype)
        cls = model_class_for(config, file=file)
        with meta_parameters():
            model = cls._from_config(config, dtype=dtype)
    except (RuntimeError, MemoryError, ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        # a module constructor allocates (or divides by) what the config declares before the meta hook
        # applies; whatever the config got wrong, the file and the model class are named
        first = (str(e).strip().split("\n") or [""])[0][:300]
        raise ConfigError(f"transformers could not build {getattr(cls, '__name__', 'the model')} from this "
                          f"config ({type(e).__name__}: {first})", file=file) from e
    return model


# --- the config against the checkpoint, before the skeleton -------------------------------------------------
#: a layer stack in checkpoint keys: "model.layers.3.", "transformer.h.0.", "encoder.layer.11."
_LAYER_KEY = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")
#: the most layers a config may declare (the deepest released models have a few hundred)
MAX_LAYERS = 1 << 14
#: dimensions of weight matrices: each is at most the checkpoint's element count
_SIZE_ATTRS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "n_embd", "n_inner", "d_model", "ffn_dim", "moe_intermediate_size", "num_experts",
               "num_local_experts")
#: products that are the element count of one weight matrix
_PRODUCTS = (("hidden_size", "intermediate_size"), ("vocab_size", "hidden_size"),
             ("num_attention_heads", "head_dim", "hidden_size"))
#: context lengths: not a weight dimension, but some models size buffers by them
_MAX_POSITIONS = 1 << 26


def checkpoint_layer_stacks(keys) -> dict[str, set[int]]:
    """{"model.layers": {0, 1, ...}} for every numbered layer stack in the checkpoint's keys."""
    stacks: dict[str, set[int]] = {}
    for k in keys:
        m = _LAYER_KEY.search(k)
        if m:
            stacks.setdefault(k[:m.end(1)].lstrip("."), set()).add(int(m.group(2)))
    return stacks


def _config_int(cfg, attr, file):
    v = getattr(cfg, attr, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{attr}={v!r}; expected an integer", file=file, key=attr)
    return v


def check_config(config, source, *, file: str | None = None) -> None:
    """Counts and sizes config.json declares, checked against the tensors the checkpoint holds and sane
    bounds, before the skeleton is built (transformers builds every declared layer, and some modules
    allocate their declared size before the meta hook applies): the layer count must be the checkpoint's
    own (layers 0..n-1 of a stack in its keys), each matrix dimension and matrix size at most the
    checkpoint's element count (8 per byte covers every packed format down to 1 bit)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = source.keys()
    n = _config_int(text, "num_hidden_layers", file)
    if n is not None:
        if not 1 <= n <= MAX_LAYERS:
            raise ConfigError(f"num_hidden_layers={n}; expected between 1 and {MAX_LAYERS}", file=file,
                              key="num_hidden_layers")
        stacks = checkpoint_layer_stacks(keys)
        if stacks and not any(ids == set(range(n)) for ids in stacks.values()):
            name, ids = max(stacks.items(), key=lambda kv: len(kv[1]))
            have = len(ids)
            top = max(ids) + 1
            holes = [i for i in range(min(top, have + 5)) if i not in ids][:5] if top != have else []
            found = f"layers {sorted(ids)[:3]}... with {holes} missing" if holes else f"{have} layers (0-{have - 1})"
            raise ConfigError(f"num_hidden_layers={n}, but the checkpoint holds {found} under '{name}'; "
                              f"expected num_hidden_layers={have if not holes else 'a complete stack'}",
                              file=file, key="num_hidden_layers")
    capacity = 8 * source.total_bytes() + 4096
    values = {}
    for attr in _SIZE_ATTRS:
        v = _config_int(text, attr, file)
        if v is None:
            continue
        if v < 0 or v > capacity:
            raise ConfigError(f"{attr}={v}; expected a non-negative size that fits the checkpoint "
                              f"({source.total_bytes()} bytes of tensors hold at most {capacity} elements)",
                              file=file, key=attr)
        values[attr] = v
    for attrs in _PRODUCTS:
        if all(a in values for a in attrs):
            prod = 1
            for a in attrs:
                prod *= values[a]
            if prod > capacity:
                shown = " x ".join(f"{a}={values[a]}" for a in attrs)
                raise ConfigError(f"{shown} is a {prod}-element matrix; the checkpoint's "
                                  f"{source.total_bytes()} bytes of tensors hold at most {capacity}",
                                  file=file, key=attrs[0])
    mp = _config_int(text, "max_position_embeddings", file)
    if mp is not None and not 0 <= mp <= _MAX_POSITIONS:
        raise ConfigError(f"max_position_embeddings={mp}; expected between 0 and {_MAX_POSITIONS}", file=file,
                          key="max_position_embeddings")


def replace_modules(model: nn.Module, choose, dtype: torch.dtype) -> dict[str, object]:
    """Replace each nn.Linear / nn.Embedding for which `choose(name, module)` returns a scheme by a
    QLinear / QEmbedding. Returns {module name: scheme}."""
    chosen = {}
    # a module reachable under several names (T5's shared embedding, also encoder/decoder.embed_tokens
    # once the t5 family has aliased them) is replaced under every one of them
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(name)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        scheme = choose(name, mod)
        if scheme is None:
            continue
        if isinstance(mod, nn.Linear):
            new = QLinear.from_linear(mod, scheme, dtype)
        else:
            new = QEmbedding.from_embedding(mod, scheme, dtype)
        for alias in aliases.get(id(mod), [name]):
            set_submodule(model, alias, new)
        chosen[name] = scheme
    return chosen


def named_tensors(modules, kind: str):
    """What model.named_parameters() (kind "_parameters") or model.named_buffers() ("_buffers") yields,
    from an already listed model.named_modules(): each tensor once, under its first name. Walking the
    module tree costs ~1 ms per walk on a 30-layer model; callers that need several views list it once."""
    seen = set()
    for prefix, mod in modules:
        for name, t in getattr(mod, kind).items():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield (prefix + "." + name if prefix else name), t


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def read_config_dir(path: str):
    """transformers config from a checkpoint directory (or a file's directory), or None."""
    from transformers import AutoConfig
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(d, "config.json")):
        return None
    from .sources.files import require_regular_file
    require_regular_file(os.path.join(d, "config.json"))
    try:
        return AutoConfig.from_pretrained(d)
    except Exception as e:  # transformers raises many kinds here; ours names the file
        raise ConfigError(f"config.json could not be read by transformers: {e}",
                          file=os.path.join(d, "config.json")) from e


#: tensor suffixes only a quantized layer has, and what they are (a float model has none of them)
_QUANTIZED_SUFFIXES = {"SCB": "bitsandbytes LLM.int8", "weight_format": "bitsandbytes LLM.int8",
                       "weight.absmax": "bitsandbytes 4-bit", "weight.quant_map": "bitsandbytes 4-bit",
                       "weight.nested_absmax": "bitsandbytes 4-bit",
                       "weight.quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
                       "weight.quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
                       "qweight": "GPTQ/AWQ packed-integer", "qzeros": "GPTQ/AWQ packed-integer"}


def check_quantized_tensors(spec, keys, *, file: str | None = None) -> None:
    """Every layer whose tensors show a quantization (LLM.int8's SCB, bnb 4-bit's absmax, GPTQ's qweight)
    must get a scheme from `spec` (config.json's quantization_config) that reads those tensors; else
    the codes would load as float weights, or be dropped. Raises ConfigError naming the first such tensor."""
    import bisect
    flagged: dict[str, tuple[str, str]] = {}
    for k in keys:
        for suffix, what in _QUANTIZED_SUFFIXES.items():
            if k.endswith("." + suffix):
                flagged.setdefault(k[: -len(suffix) - 1], (k, what))
                break
    if not flagged:
        return
    ordered = sorted(keys)
    for prefix, (key, what) in sorted(flagged.items()):
        scheme = spec.scheme_for(prefix, None) if spec is not None else None
        if scheme is not None:
            lo = bisect.bisect_left(ordered, prefix + ".")
            hi = bisect.bisect_left(ordered, prefix + "/", lo)
            if scheme.present({k[len(prefix) + 1:] for k in ordered[lo:hi]}):
                continue
        if spec is None:
            held = "config.json has no quantization_config"
        elif scheme is None:
            held = f"its quantization_config ({spec.method}) leaves '{prefix}' unquantized"
        else:
            held = f"its quantization_config gives '{prefix}' {getattr(scheme, 'name', spec.method)}, which does not read it"
        raise ConfigError(f"the checkpoint holds {what} tensor '{key}', but {held}; expected a "
                          f"quantization_config that matches the weights", file=file, key="quantization_config")
