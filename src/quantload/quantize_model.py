"""quantize_: quantize a model that is already in memory, in place (torchao's `quantize_(model, config)`).

Module by module: each targeted nn.Linear's float weight is quantized on the device it lives on, the
Linear is replaced by a QLinear holding the result, and the float weight is let go before the next one,
so the peak is the quantized model plus one float weight (not two models).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import resolve_quantize
from .errors import ConfigError
from .prepare import set_submodule
from .runtime.modules import QLinear, _QModule
from .scheme_fit import announce, fit_spec, skipped_note


def quantize_(model: nn.Module, config, *, progress: bool = False) -> nn.Module:
    """Quantize `model`'s Linear layers in place with `config` ("nf4", "fp4", "int8", "int4", ...,
    a quantization_config dict / object, or a QuantSpec) and return it. Weights stay on their devices.
    A tied weight (lm_head = embed_tokens) is skipped by the default configs, as transformers does."""
    spec = resolve_quantize(config)
    if spec is None:
        raise ConfigError("quantize_(model, None): pass a scheme, e.g. 'nf4', 'int8', 'int4' or a config")
    spec, note = fit_spec(spec, model, config)
    announce(note)
    skip_before = list(spec.skip_modules)
    todo = []
    for name, mod in model.named_modules():
        if isinstance(mod, _QModule) or not isinstance(mod, nn.Linear):
            continue
        scheme = spec.scheme_for(name, mod)
        if scheme is None:
            continue
        w = mod.weight
        if w.is_meta:
            raise ConfigError(f"{name}.weight is on the meta device: quantize_ needs the float values; load a "
                              "checkpoint with quantload.load(path, quantize=...) instead")
        if not w.is_floating_point():
            raise ConfigError(f"{name}.weight is {w.dtype}, not a float weight (already quantized?)")
        todo.append((name, mod, scheme))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="quantizing", unit="layer", leave=False)
    with torch.no_grad():
        for name, mod, scheme in todo:
            w = mod.weight.detach()
            qt = scheme.prepare_runtime(scheme.quantize(w))
            q = QLinear(mod.in_features, mod.out_features, False, scheme, dtype=w.dtype, device=w.device)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
            q.set_qweight(qt)
            q.train(mod.training)
            set_submodule(model, name, q)
            del w
            mod.weight = None  # the float copy goes now, unless something else (a tie) still holds it
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    announce(skipped_note(spec, skip_before, config))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg.quantization_config = spec.to_dict()
    from .model_size import attach_size_methods
    attach_size_methods(model)
    return model
