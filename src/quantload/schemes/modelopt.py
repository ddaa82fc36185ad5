"""NVIDIA ModelOpt (TensorRT Model Optimizer) exports: quant_method "modelopt" in config.json, or
hf_quant_config.json beside the weights ({"producer": ..., "quantization": {...}}). docs/formats-2025.md.

quant_algo "NVFP4": nvfp4.FP4Scheme("modelopt") (weight uint8, weight_scale fp8, weight_scale_2, input_scale).
quant_algo "FP8", per tensor, per Linear:
  weight        float8_e4m3fn [O, I]
  weight_scale  float32 []          W = weight.to(dtype) * weight_scale.to(dtype), in the target dtype, as
                                    ModelOpt's FP8QTensor.dequantize computes it
  input_scale   float32 []          static activation scale (kept for saving; the forward is weight-only)
quant_algo "MIXED_PRECISION": `quantized_layers` names each quantized module's own quant_algo.
`exclude_modules` are shell wildcards ("model.layers.*.mlp.gate", "lm_head"); k_scale / v_scale of an FP8
KV cache are left unread.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from .base import QTensor, Scheme
from .checks import full_key
from .fp8_block import fp8_matrix
from .nvfp4 import NVFP4_GROUP, FP4Scheme
from .registry import register_method

ALGOS = ("NVFP4", "FP8")


class ModelOptFP8Scheme(Scheme):
    name = "modelopt-fp8"

    def required_keys(self):
        return ("weight", "weight_scale")

    def optional_keys(self):
        return ("input_scale",)

    def present(self, suffixes):
        return super().present(suffixes) and "weight_scale_2" not in suffixes    # that one is NVFP4

    def decode(self, pieces, *, shape=None, file=None, prefix=""):
        kw = dict(file=file, prefix=prefix)
        w, s = fp8_matrix(pieces, "weight_scale", shape=shape, **kw)
        if not s.is_floating_point() or s.numel() != 1:
            raise ShapeMismatchError(f"shape {list(s.shape)} {s.dtype}, expected one float32 scale per tensor "
                                     "(per-channel and block FP8 exports are not supported)", file=file,
                                     key=full_key(prefix, "weight_scale"))
        data = {"weight": w, "weight_scale": s}
        if "input_scale" in pieces:
            data["input_scale"] = pieces["input_scale"]
        return QTensor(self, data, w.shape, torch.bfloat16)

    def encode(self, qt):
        return dict(qt.data)

    def dequantize(self, qt, dtype):
        return qt.data["weight"].to(dtype) * qt.data["weight_scale"].to(dtype)

    def quantize(self, w):
        raise UnsupportedError("quantizing to ModelOpt's layout is not supported; supported runtime FP8: 'fp8' "
                               "(transformers FineGrainedFP8)")

    def nbytes_for(self, shape, dtype):
        return shape[0] * shape[1] + 4


def _algo(d: dict, *, file=None, where: str = "quant_algo") -> str:
    algo = str(d.get("quant_algo") or "").upper()
    if algo not in ALGOS:
        raise UnsupportedError(f"ModelOpt {where} {d.get('quant_algo')!r} is not supported; supported: "
                               f"{[*ALGOS, 'MIXED_PRECISION']}", file=file)
    if algo == "NVFP4" and int(d.get("group_size", NVFP4_GROUP)) != NVFP4_GROUP:
        raise UnsupportedError(f"ModelOpt NVFP4 group_size {d['group_size']!r} is not supported; supported: [16]",
                               file=file)
    return algo


class ModelOptSpec(QuantSpec):
    method = "modelopt"
    #: an FP8 KV cache's scales (k_proj.k_scale, v_proj.v_scale), for TensorRT-LLM / vLLM
    ignorable_keys = (".k_scale", ".v_scale")

    def __init__(self, cfg: dict, *, file=None):
        cfg = dict(cfg)
        q = dict(cfg.get("quantization") or cfg)          # hf_quant_config.json nests it
        self.schemes = {"NVFP4": FP4Scheme("modelopt"), "FP8": ModelOptFP8Scheme()}
        self.per_layer = None
        if str(q.get("quant_algo") or "").upper() == "MIXED_PRECISION":
            layers = q.get("quantized_layers")
            if not isinstance(layers, dict):
                raise ConfigError("ModelOpt MIXED_PRECISION needs 'quantized_layers': {module: {quant_algo: ...}}",
                                  file=file)
            self.per_layer = {name: _algo(d, file=file, where=f"quantized_layers[{name!r}].quant_algo")
                              for name, d in layers.items()}
            scheme = None
        else:
            scheme = self.schemes[_algo(q, file=file)]
        kv = q.get("kv_cache_quant_algo")
        if kv not in (None, "", "NONE", "FP8"):
            raise UnsupportedError(f"ModelOpt kv_cache_quant_algo {kv!r} is not supported; supported: none, FP8 "
                                   "(its k/v scales are left unread)", file=file)
        exclude = list(q.get("exclude_modules") or q.get("ignore") or [])
        super().__init__(scheme, skip_modules=exclude, raw={**q, "quant_method": "modelopt"})

    def scheme_for(self, module_name, module):
        if module is not None and not isinstance(module, nn.Linear):
            return None
        if any(fnmatch.fnmatchcase(module_name, p) or module_name == p for p in self.skip_modules):
            return None
        if self.per_layer is not None:
            algo = self.per_layer.get(module_name)
            return self.schemes[algo] if algo is not None else None
        return self.scheme


@register_method("modelopt")
def parse_modelopt(d: dict) -> ModelOptSpec:
    return ModelOptSpec(d)
