"""GGUF files into transformers models whose Linear weights and token embedding stay in their blocks.

architectures/ maps GGUF metadata to a transformers config and GGUF tensor names to the model's
parameter names (with the transforms some families need); the GGUF schemes decode blocks. Transforms
that only permute rows (llama q/k) become a row order the GGUF scheme applies to each output, so the
blocks stay the file's bytes, untouched in the map, and nothing is dequantized.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .architectures.moe import ExpertSlice
from .config import resolve_quantize
from .engine import Weights, load_weights
from .load_setup import engine_progress, placement_for
from .ggml_types import GGML_TYPES
from .report import LoadReport
from .runtime.modules import _QModule

_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16 stay plain tensors
_SMALL_BYTES = 64 << 10


class GGUFWeights(Weights):
    def __init__(self, source, model_map, dtype: torch.dtype):
        self.source = source
        self.map = model_map
        self.dtype = dtype
        self.used: set[str] = set()
        self.tensors_read = 0
        self.bytes_read = 0
        self.recent = []

    def _raw(self, gguf_name: str) -> torch.Tensor:
        t = self.source.get(gguf_name)
        info = self.source.info(gguf_name)
        self._remember(t, info.file, info.offset)
        self.used.add(gguf_name)
        self.tensors_read += 1
        self.bytes_read += t.numel()
        return t

    def qtensor(self, module_name: str, mod: _QModule):
        from .schemes.gguf import GGUFScheme
        from .schemes.gguf.scheme import ROW_ORDER
        if not isinstance(mod.scheme, GGUFScheme):
            return None
        ref = self.map.params.get(f"{module_name}.weight")
        if ref is None:
            return None
        info = self.source.info(ref.gguf_name)
        if isinstance(ref.transform, ExpertSlice):   # MoE: this expert's rows of ffn_*_exps, as they are
            raw, shape = self._expert_raw(ref)
            qt = mod.scheme.decode({"weight": raw}, shape=shape, file=self.source.path, prefix=ref.gguf_name)
            qt.dtype = self.dtype
            return qt
        raw = self._raw(ref.gguf_name)
        qt = mod.scheme.decode({"weight": raw}, shape=info.shape, file=self.source.path, prefix=ref.gguf_name)
        if ref.transform is not None:
            perm = ref.transform.row_permutation(qt.data["blocks"].shape[0])
            if perm is None:
                raise AssertionError(f"{module_name}: transform is not a row permutation; prepare should "
                                     "have kept this module in float")
            # the blocks stay the file's bytes (untouched in the map); outputs are reordered per forward
            qt.meta[ROW_ORDER] = perm
        qt.dtype = self.dtype
        return qt

    def _expert_raw(self, ref):
        """One expert's bytes of a 3-D expert tensor (counted as read once per expert, not E times)."""
        info = self.source.info(ref.gguf_name)
        raw, shape = ref.transform.rows_of(self.source.get(ref.gguf_name), info.shape)
        self._remember(raw, info.file, info.offset + ref.transform.expert * raw.numel())
        self.used.add(ref.gguf_name)
        self.tensors_read += 1
        self.bytes_read += raw.numel()
        return raw, shape

    def tensor(self, name: str):
        ref = self.map.params.get(name)
        if ref is None:
            return None
        info = self.source.info(ref.gguf_name)
        if isinstance(ref.transform, ExpertSlice):   # MoE: decode or cast this expert only
            raw, shape = self._expert_raw(ref)
            from .schemes.gguf import gguf_scheme
            return gguf_scheme(info.ggml_type).decode({"weight": raw}, shape=shape, file=self.source.path,
                                                      prefix=ref.gguf_name).dequantize(torch.float32)
        if info.ggml_type in _FLOAT_TYPES or GGML_TYPES[info.ggml_type].block_size == 1:
            small = info.nbytes <= _SMALL_BYTES  # norms, biases: copied, the map's pages stay untouched
            t = self.source.get_typed(ref.gguf_name, copy=small)
            if not small:
                self._remember(t, info.file, info.offset)
            self.used.add(ref.gguf_name)
            self.tensors_read += 1
            self.bytes_read += info.nbytes
        else:
            from .schemes.gguf import gguf_scheme
            scheme = gguf_scheme(info.ggml_type)
            t = scheme.decode({"weight": self._raw(ref.gguf_name)}, shape=info.shape, file=self.source.path,
                              prefix=ref.gguf_name).dequantize(torch.float32)
        if ref.transform is not None:
            t = ref.transform.apply(t.float())
        return t

    def unconsumed(self) -> list[str]:
        return [k for k in self.source.keys() if k not in self.used]


def model_map_of(source):
    from .architectures import gguf_to_hf
    # read_tensor: Llama 3.1+ and Phi-3 128k keep their RoPE scaling in small F32 tensors
    return gguf_to_hf(source.fields, {n: source.info(n) for n in source.keys()}, file=source.path,
                      read_tensor=source.get_typed)


def load_gguf(source, *, report: LoadReport, t0: float, quantize, dtype, device_map, max_memory, offload_folder,
              dequantize: bool, progress: bool, strict: bool = True) -> nn.Module:
    from .finalize import finalize
    from .prepare import build_skeleton, replace_modules
    from .schemes.gguf import gguf_scheme

    mm = model_map_of(source)
    spec = resolve_quantize(quantize)
    dtype = dtype or torch.float32
    report.quant_method = spec.method if spec else (None if dequantize else "gguf")
    report.prequantized = spec is None and not dequantize
    report.seconds["open"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    model = build_skeleton(mm.config, dtype)
    if mm.adapt is not None:  # e.g. GPT-2's Conv1D as nn.Linear, the layout its GGUF blocks are in
        mm.adapt(model)

    def choose(name, mod):
        if spec is not None:  # re-quantize: dequantize each GGUF tensor, then quantize with the spec
            return spec.scheme_for(name, mod)
        if dequantize:
            return None
        ref = mm.params.get(f"{name}.weight")
        if ref is None:
            return None
        shape, type_id = mm_tensor_type(source, ref.gguf_name)
        if type_id in _FLOAT_TYPES or GGML_TYPES[type_id].block_size == 1:
            return None
        if isinstance(ref.transform, ExpertSlice):
            return gguf_scheme(type_id)   # MoE: each expert keeps its rows of the file's blocks
        if ref.transform is not None and ref.transform.row_permutation(shape[0]) is None:
            return None  # a transform that touches columns: this tensor is dequantized at load
        return gguf_scheme(type_id)

    if any(isinstance(ref.transform, ExpertSlice) for ref in mm.params.values()):
        from .moe_load import replace_experts
        replace_experts(model, dtype)   # MoE: fused experts -> one Linear per expert (runtime/experts.py)
    replace_modules(model, choose, dtype)
    device_of, plan, offloader = placement_for(model, device_map, max_memory, offload_folder)
    report.seconds["prepare"] = time.perf_counter() - t1

    weights = GGUFWeights(source, mm, dtype)
    load_weights(model, weights, dtype=dtype, device_of=device_of, report=report,
                 progress=engine_progress("loading", progress), offloader=offloader, quantizing=spec is not None)
    report.tensors_read, report.bytes_read = weights.tensors_read, weights.bytes_read
    t2 = time.perf_counter()
    # tensors read into the config (rope_freqs) are consumed; any other tensor no parameter takes is an error
    finalize(model, spec=spec, report=report, weights=weights, file=source.path, offloader=offloader,
             ignorable_unexpected=tuple(mm.consumed), strict=strict)
    if plan is not None:
        model.device_plan = plan
    model.gguf_fields = source.fields
    model.gguf_field_types = source.field_types  # so a GGUF writer keeps each carried-over key's type
    report.seconds["finalize"] = time.perf_counter() - t2
    return model


def mm_tensor_type(source, gguf_name: str):
    info = source.info(gguf_name)
    return info.shape, info.ggml_type


def gguf_state_dict(source) -> dict:
    """GGUF tensors by their GGUF names: QTensors for block types, plain tensors for float/int types."""
    from .schemes.gguf import gguf_scheme
    out = {}
    for name in source.keys():
        info = source.info(name)
        if GGML_TYPES[info.ggml_type].block_size == 1:
            out[name] = source.get_typed(name)
        else:
            out[name] = gguf_scheme(info.ggml_type).decode({"weight": source.get(name)}, shape=info.shape,
                                                            file=source.path, prefix=name)
    return out
