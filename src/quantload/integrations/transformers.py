"""quantload inside transformers: `from_pretrained(path, quantization_config=QuantloadConfig(...))`.

    from transformers import AutoModelForCausalLM
    from quantload import QuantloadConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantloadConfig(quantize="nf4"),
                                                 device_map="cpu")

The quantizer hands the whole load to quantload's engine, which fills the very model object transformers
built (so from_pretrained's class, config and generation config are kept): transformers' own weight loading
is given nothing to do (an empty file list and an empty expected state, so it reads, casts and initializes
no weight), then, in `postprocess_model`, outside transformers' meta-device context, `quantload.load(...,
model=model)` streams the checkpoint in: pre-quantized pieces decoded (any format quantload reads, the
checkpoint's own config.json deciding), or float weights quantized as they are read. `save_pretrained`
becomes `quantload.save`. transformers refuses any quantization_config beside `gguf_file=` (its
get_hf_quantizer), so a GGUF file goes through `quantload.load` directly.

transformers' merge of a checkpoint's quantization_config with the one passed to from_pretrained raises
when their classes differ; for a QuantloadConfig that merge is bypassed (the checkpoint's config is read by
quantload from the files), every other config merges as before.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "quantload"


class QuantloadConfig(QuantizationConfigMixin):
    """What from_pretrained should ask quantload for.

    quantize: None (keep the checkpoint as it is: pre-quantized pieces decoded, float weights float), a
        short name ("nf4", "fp4", "int8", "int4", ...), a quantization_config dict or a QuantSpec.
    max_memory, offload_folder, headroom: quantload's placement options (from_pretrained does not hand its
        own max_memory to a quantizer); device_map comes from from_pretrained's device_map.
    progress: quantload's progress bar.
    """

    is_quantload_config = True

    def __init__(self, quantize=None, *, max_memory=None, offload_folder=None, headroom=None, progress: bool = True,
                 **kwargs):
        self.quant_method = METHOD
        self.quantize = quantize
        self.max_memory = max_memory
        self.offload_folder = offload_folder
        self.headroom = headroom
        self.progress = progress

    def to_dict(self) -> dict:
        q = self.quantize
        return {"quant_method": METHOD, "quantize": q.to_dict() if hasattr(q, "to_dict") else q,
                "max_memory": self.max_memory, "offload_folder": self.offload_folder, "headroom": self.headroom,
                "progress": self.progress}


def _empty_safetensors() -> str:
    """A safetensors file with no tensors: what transformers' own loading is left to read."""
    path = os.path.join(tempfile.gettempdir(), f"quantload-empty-{os.getuid() if hasattr(os, 'getuid') else 0}"
                                                ".safetensors")
    if not os.path.exists(path):
        header = b"{}"
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
        os.replace(tmp, path)
    return path


def _device_map_for_quantload(device_map):
    """from_pretrained's device map (after transformers turned "cpu" into {"": device}) as load takes it."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        d = device_map[""]
        return f"cuda:{d}" if isinstance(d, int) else str(d)
    if isinstance(device_map, dict):
        return {k: (f"cuda:{v}" if isinstance(v, int) else str(v)) for k, v in device_map.items()}
    return "cpu" if device_map is None else device_map


def _compute_device(device_map) -> str:
    """The device type the model will compute on, for a device map as load takes it."""
    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    for v in values:
        v = str(v)
        if v in ("auto", "balanced", "balanced_low_0", "sequential"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        if v not in ("cpu", "disk"):
            return torch.device(v).type
    return "cpu"


def _checkpoint_quantization(folder: str):
    """The quantization_config of the checkpoint's own config.json (None when it has none)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None


def _no_state_dict(*args, **kwargs):
    return {}


class QuantloadHfQuantizer(HfQuantizer):
    """Hands from_pretrained's load to quantload (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.device_map = None
        self.folder = None

    def validate_environment(self, *args, device_map=None, **kwargs):
        return

    def update_device_map(self, device_map):
        # quantload places the weights itself (and offloads with its own hooks): transformers gets no map, so it
        # neither plans with accelerate nor dispatches
        self.device_map = device_map
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("quantload's quantizer needs checkpoint files (from_pretrained(path, ...))")
        self.folder = os.path.dirname(os.path.abspath(checkpoint_files[0]))
        # transformers' loader reads nothing: no files, no expected keys (so nothing is "missing", moved off meta
        # or initialized); parameters are flagged initialized, buffers (rotary tables) are initialized as usual
        checkpoint_files[:] = [_empty_safetensors()]
        model.state_dict = _no_state_dict
        for p in model.parameters():
            p._is_hf_initialized = True
        # from_pretrained kernelizes (hub kernels) before postprocess, while the parameters are still on meta:
        # it is told the device the weights will be on
        model._kernels_device = _compute_device(_device_map_for_quantload(self.device_map))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """postprocess_model (which first set config.quantization_config to this QuantloadConfig) calls this
        after transformers' (empty) loading, outside its meta-device context: the real load."""
        from ..api import load
        del model.state_dict
        for name, b in list(model.named_buffers()):
            if b.is_meta:  # a persistent buffer transformers did not materialize: the checkpoint fills it
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name)._buffers[attr] = torch.zeros_like(b, device="cpu")
        qc = self.quantization_config
        own = _checkpoint_quantization(self.folder)
        if own is None:
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model.config.quantization_config = own
        load(self.folder, model=model, quantize=qc.quantize, device_map=_device_map_for_quantload(self.device_map),
             max_memory=qc.max_memory, offload_folder=qc.offload_folder, headroom=qc.headroom, progress=qc.progress)
        # what config.json must say for quantload, transformers and vLLM to read a saved copy (finalize set it)
        if getattr(model.config, "quantization_config", None) is None and hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained = _save_pretrained.__get__(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


def _save_pretrained(model, save_directory, *, max_shard_size=None, tokenizer=None, safe_serialization=True,
                     push_to_hub: bool = False, **kwargs):
    """from_pretrained's model saved by quantload.save: the scheme's ecosystem layout (bitsandbytes,
    compressed-tensors, ... keys as those tools write them) and its quantization_config."""
    from ..api import save
    if push_to_hub:
        raise NotImplementedError("push_to_hub: save with quantload, then upload the folder with huggingface_hub")
    if not safe_serialization:
        raise ValueError("quantload writes safetensors only (safe_serialization=False is not supported)")
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    return save(model, save_directory, max_shard_size=max_shard_size, **extra)


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    if getattr(quantization_config_from_args, "is_quantload_config", False):
        return quantization_config_from_args  # quantload reads the checkpoint's own config from its files
    return _original_merge(quantization_config, quantization_config_from_args)


def register() -> None:
    """Register QuantloadConfig and its quantizer with transformers (done on import; idempotent)."""
    global _original_merge
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(QuantloadConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(QuantloadHfQuantizer)
    if not getattr(AutoHfQuantizer.merge_quantization_configs, "_quantload", False):
        _original_merge = AutoHfQuantizer.merge_quantization_configs
        merged = classmethod(_merge_quantization_configs)
        merged.__func__._quantload = True
        AutoHfQuantizer.merge_quantization_configs = merged


_original_merge = None
register()
