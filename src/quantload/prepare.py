"""Prepare: the model skeleton on the meta device and quantized modules in place.

Parameters are created on the meta device (no memory); buffers stay real, because many are computed in
`__init__` (rotary inv_freq, position ids, embedding scales) and never stored in checkpoints.
"""
from __future__ import annotations

import contextlib
import functools
import os

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


def model_class_for(config, *, causal_preferred: bool = True):
    """The transformers class named by config.architectures, else an Auto class for the model type."""
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
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


def build_skeleton(config, dtype: torch.dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """A transformers model from its config, parameters on meta, in `dtype`."""
    cls = None
    if trust_remote_code and getattr(config, "auto_map", None):
        from transformers import AutoModelForCausalLM
        with meta_parameters():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=dtype)
    cls = model_class_for(config)
    with meta_parameters():
        model = cls._from_config(config, dtype=dtype)
    return model


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
    try:
        return AutoConfig.from_pretrained(d)
    except Exception as e:  # transformers raises many kinds here; ours names the file
        raise ConfigError(f"config.json could not be read by transformers: {e}",
                          file=os.path.join(d, "config.json")) from e
