"""The public operations: load, load_tokenizer, read_state_dict, save, inspect, plan."""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

# What every safetensors / torch-file load runs is imported with the package rather than inside the first
# load (~15 ms of module imports that a timed load would otherwise pay once).
from . import schemes  # noqa: F401  (registers every scheme family)
from .checkpoint_weights import CheckpointWeights, index_by_module
from .config import QuantSpec, check_quantize_request, parse_dtype, resolve_quantize
from .engine import load_weights
from .errors import ConfigError, QuantloadError
from .finalize import finalize, tied_pairs
from .prepare import build_skeleton, check_quantized_tensors, named_tensors, read_config_dir, replace_modules
from .report import LoadReport, current_rss_bytes
from .schemes.registry import spec_from_dict
from .sources import open_source
from .sources import safetensors as _safetensors  # noqa: F401  (open_source imports it on first use)

# checkpoint keys that are buffers transformers recomputes (not errors when present, not used)
_IGNORABLE = ("position_ids", "rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def checkpoint_spec(path: str, config) -> QuantSpec | None:
    """The quantization a checkpoint was saved with: config.json's quantization_config, or a
    quantize_config.json beside it (older GPTQ exports)."""
    qc = getattr(config, "quantization_config", None) if config is not None else None
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(d, "config.json")
    # older exports keep the config beside the weights: GPTQ quantize_config.json, AutoAWQ
    # quant_config.json, optimum-quanto quanto_qmap.json
    for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq"),
                          ("quanto_qmap.json", "quanto")):
        qfile = os.path.join(d, fname)
        if qc is not None or not os.path.exists(qfile):
            continue
        file = qfile
        try:
            with open(qfile) as f:
                loaded = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(f"cannot parse: {type(e).__name__}: {str(e)[:200]}", file=qfile) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"expected a JSON object, found {type(loaded).__name__}", file=qfile)
        qc = {"quant_method": method, "quanto_qmap": loaded} if method == "quanto" else loaded
        qc.setdefault("quant_method", method)
    if qc is None:
        return None
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if isinstance(qc, dict) and qc.get("quant_method") == "gguf":
        return None  # transformers tags models it dequantized from GGUF; their safetensors are plain floats
    return spec_from_dict(dict(qc), file=file)


def _progress(desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return lambda total: tqdm(total=total, desc=desc, unit="tensor", delay=1.0, leave=False)


_MODES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(model, device_map, max_memory, offload_folder):
    """(device_of(name) -> device string, plan or None, offloader or None) for the requested placement."""
    if device_map is None:
        device_map = "cpu"
    single = isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in _MODES and device_map != "disk")
    if single and max_memory is None:
        dev = torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ConfigError(f"device_map={device_map!r}: no such device (CUDA available: "
                              f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()})")
        name = str(dev)
        return (lambda _: name), None, None
    from .placement import plan_placement, tensor_sizes
    from .runtime.offload import Offloader
    sizes = tensor_sizes(model)
    plan = plan_placement(model, sizes, device_map, max_memory,
                          no_split_module_classes=getattr(model, "_no_split_modules", None),
                          tied_groups=_tied_groups(model, sizes), offload_folder=offload_folder,
                          config=getattr(model, "config", None))
    compute = next((d for d in plan.device_map.values() if d.startswith(("cuda", "mps"))), "cpu")
    offloader = Offloader(plan, torch.device(compute), offload_folder)
    if not any(offloader.is_offloaded(d) for d in plan.device_map.values()):
        offloader = None
    return plan.device_of, plan, offloader


def _tied_groups(model, sizes) -> list[list[str]]:
    return [[a, b] for a, b in tied_pairs(model) if a in sizes and b in sizes]


def load(path, *, quantize=None, dtype=None, device_map="cpu", max_memory=None, offload_folder=None,
         trust_remote_code: bool = False, dequantize: bool = False, model: nn.Module | None = None,
         progress: bool = True, strict: bool = True) -> nn.Module:
    """Load a checkpoint (directory, safetensors, .bin/.pt or .gguf) into a ready model.

    quantize: None (keep what the checkpoint has), a short name ("nf4", "fp4", "int8", "int4", ...),
    a transformers-style quantization_config dict (e.g. BitsAndBytesConfig(...).to_dict()) or a QuantSpec.
    dequantize: GGUF only, give a plain float model instead of keeping blocks quantized.
    model: your own nn.Module to load into (parameters may be on meta) instead of building from config.json.
    strict: a checkpoint tensor the model does not consume is an error; strict=False drops them, listed
    in model.load_report.unexpected_keys.
    """
    path = os.fspath(path)
    report = LoadReport(path=path, rss_before=current_rss_bytes())
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    source = open_source(path)
    report.source_kind = type(source).__name__
    try:
        if type(source).__name__ == "GGUFSource":
            from .gguf_load import load_gguf
            return load_gguf(source, report=report, t0=t0, quantize=quantize, dtype=dtype, device_map=device_map,
                             max_memory=max_memory, offload_folder=offload_folder, dequantize=dequantize,
                             progress=progress, strict=strict)
        return _load_checkpoint(source, path, report, t0, quantize=quantize, dtype=dtype, device_map=device_map,
                                max_memory=max_memory, offload_folder=offload_folder,
                                trust_remote_code=trust_remote_code, model=model, progress=progress,
                                strict=strict)
    finally:
        source.close()


def _load_checkpoint(source, path, report, t0, *, quantize, dtype, device_map, max_memory, offload_folder,
                     trust_remote_code, model, progress, strict=True):
    config = read_config_dir(path) if model is None else getattr(model, "config", None)
    config_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), "config.json")
    ckpt_spec = checkpoint_spec(path, config) if config is not None or model is None else None
    user_spec = resolve_quantize(quantize)
    check_quantize_request(ckpt_spec, user_spec, quantize, file=config_file)
    if config is not None:
        check_quantized_tensors(ckpt_spec, source.keys(), file=config_file)
    spec = ckpt_spec or user_spec
    report.quant_method = spec.method if spec else None
    report.prequantized = ckpt_spec is not None
    if dtype is None:
        cd = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = parse_dtype(cd, file=config_file, key="dtype") if isinstance(cd, (str, torch.dtype)) else torch.float32
    report.seconds["open"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if model is None:
        if config is None:
            raise ConfigError("no config.json beside the weights: pass model= (your nn.Module) or a "
                              "directory with config.json", file=path)
        model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code, source=source, file=config_file)
    modules = list(model.named_modules())
    names = [n for n, _ in named_tensors(modules, "_parameters")] + [n for n, _ in named_tensors(modules, "_buffers")]
    weights = CheckpointWeights(source, names, getattr(model, "base_model_prefix", None))

    def choose(name, mod):
        scheme = spec.scheme_for(name, mod) if spec is not None else None
        if scheme is None or isinstance(mod, nn.Embedding):
            return None
        if ckpt_spec is not None and not scheme.present(weights.suffixes(name)):
            return None  # a dense layer inside a quantized checkpoint (lm_head, skipped modules)
        return scheme

    replace_modules(model, choose, dtype)
    device_of, plan, offloader = _placement(model, device_map, max_memory, offload_folder)
    report.seconds["prepare"] = time.perf_counter() - t1

    load_weights(model, weights, dtype=dtype, device_of=device_of, report=report,
                 progress=_progress("loading", progress), offloader=offloader,
                 quantizing=user_spec is not None and ckpt_spec is None)
    report.tensors_read, report.bytes_read = weights.tensors_read, weights.bytes_read
    t2 = time.perf_counter()
    finalize(model, spec=spec, report=report, weights=weights, file=path, ignorable_unexpected=_IGNORABLE,
             offloader=offloader, strict=strict)
    if plan is not None:
        model.device_plan = plan
    report.seconds["finalize"] = time.perf_counter() - t2
    return model


def read_state_dict(path, *, quantization_config=None) -> dict:
    """The decoded parameters of a checkpoint without a model: QTensor for each quantized parameter
    (keyed by its parameter name, e.g. "layer.weight"), plain tensors for the rest."""
    path = os.fspath(path)
    source = open_source(path)
    if type(source).__name__ == "GGUFSource":
        from .gguf_load import gguf_state_dict
        return gguf_state_dict(source)
    if quantization_config is not None:
        qc = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else quantization_config
        spec = spec_from_dict(dict(qc), file=path)
    else:
        spec = checkpoint_spec(path, read_config_dir(path))
    keys = source.keys()
    out, used = {}, set()
    if spec is not None:
        by_module = index_by_module(keys)
        for prefix in sorted(by_module, key=len, reverse=True):
            if not prefix:
                continue
            scheme = spec.scheme_for(prefix, None)
            if scheme is None or not scheme.present(by_module[prefix]):
                continue
            wanted = [s for s in (*scheme.required_keys(), *scheme.optional_keys()) if s in by_module[prefix]]
            full = [f"{prefix}.{s}" for s in wanted]
            if any(k in used for k in full):
                continue
            pieces = {s: source.get(k) for s, k in zip(wanted, full)}
            # some schemes read a neighbour to know the logical shape without a model (quanto: bias)
            for s in getattr(scheme, "shape_hint_keys", ()):
                if s in by_module[prefix] and s not in pieces:
                    pieces[s] = source.get(f"{prefix}.{s}")
            out[f"{prefix}.{scheme.param_name}"] = scheme.decode(pieces, shape=None,
                                                                 file=source.info(full[0]).file, prefix=prefix)
            used.update(full)
    for k in keys:
        if k not in used:
            out[k] = source.get(k)
    return out


def load_tokenizer(path, **kwargs):
    """The tokenizer for any path `load` accepts (a checkpoint directory, a file in it, or a .gguf)."""
    path = os.fspath(path)
    kind_is_gguf = path.endswith(".gguf") or (os.path.isfile(path) and open(path, "rb").read(4) == b"GGUF")
    if kind_is_gguf:
        from .gguf_tokenizer import gguf_tokenizer
        from .sources.gguf import GGUFSource
        src = GGUFSource(path)
        try:
            return gguf_tokenizer(src.fields, file=path)
        finally:
            src.close()
    from transformers import AutoTokenizer
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(d, **kwargs)
    except Exception as e:
        raise QuantloadError(f"no tokenizer could be built from this checkpoint: {e}", file=d) from e


def save(model: nn.Module, out, *, max_shard_size=None, tokenizer=None, **kwargs) -> list[str]:
    """Write `model` in the layout its scheme's ecosystem reads: a directory of safetensors shards +
    config.json (bitsandbytes, compressed-tensors, ... keys exactly as those tools write them), or a
    GGUF file when `out` ends with .gguf. Every file is written atomically."""
    out = os.fspath(out)
    if out.endswith(".gguf"):
        from .writers.gguf_writer import save_gguf
        return save_gguf(model, out, tokenizer=tokenizer, **kwargs)
    from .placement import parse_memory
    from .writers.safetensors_writer import DEFAULT_SHARD, save_checkpoint
    limit = DEFAULT_SHARD if max_shard_size is None else parse_memory(max_shard_size)
    written = save_checkpoint(model, out, max_shard_size=limit)
    if tokenizer is not None:
        written.extend(tokenizer.save_pretrained(out))
    return written


def inspect(path, **kwargs):
    """What a checkpoint holds, without loading it: architecture, tensors, scheme per layer, bytes."""
    from .inspection import inspect_checkpoint
    return inspect_checkpoint(os.fspath(path), **kwargs)


def plan(path, *, quantize=None, dtype=None, device_map="auto", max_memory=None, offload_folder=None,
         trust_remote_code: bool = False):
    """The device placement `load` would use, computed from the true quantized sizes, loading nothing."""
    from .inspection import plan_checkpoint
    return plan_checkpoint(os.fspath(path), quantize=quantize, dtype=parse_dtype(dtype), device_map=device_map,
                           max_memory=max_memory, offload_folder=offload_folder,
                           trust_remote_code=trust_remote_code)
