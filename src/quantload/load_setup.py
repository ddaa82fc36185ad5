"""What every load route decides before the engine runs, written once for `load` (checkpoints and GGUF)
and for `plan`/`inspect`: the quantization a checkpoint was saved with, where each tensor goes, and the
engine's progress bar. It sits below api.py, gguf_load.py and inspection.py, which all import it.
"""
from __future__ import annotations

import json
import os

import torch

from .config import QuantSpec
from .errors import ConfigError
from .finalize import tied_pairs
from .schemes.registry import spec_from_dict


def checkpoint_dir(path: str) -> str:
    """The directory of a checkpoint given as a directory or as one of its files."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def config_file(path: str) -> str:
    """Where a checkpoint's config.json is (or would be): what errors about the config name."""
    return os.path.join(checkpoint_dir(path), "config.json")


def checkpoint_spec(path: str, config) -> QuantSpec | None:
    """The quantization a checkpoint was saved with: config.json's quantization_config, or a
    quantize_config.json beside it (older GPTQ exports)."""
    qc = getattr(config, "quantization_config", None) if config is not None else None
    d = checkpoint_dir(path)
    file = config_file(path)
    # older exports keep the config beside the weights: GPTQ quantize_config.json, AutoAWQ
    # quant_config.json, optimum-quanto quanto_qmap.json, NVIDIA ModelOpt hf_quant_config.json
    for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq"),
                          ("quanto_qmap.json", "quanto"), ("hf_quant_config.json", "modelopt")):
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


def engine_progress(desc: str, enabled):
    if not enabled:
        return None
    if callable(enabled):
        return enabled  # a whole-load bar's engine part (report.LoadProgress.engine_progress)
    from tqdm.auto import tqdm
    return lambda total: tqdm(total=total, desc=desc, unit="tensor", delay=1.0, leave=False)


PLACEMENT_MODES = ("auto", "balanced", "balanced_low_0", "sequential")


def placement_for(model, device_map, max_memory, offload_folder, headroom=None):
    """(device_of(name) -> device string, plan or None, offloader or None) for the requested placement."""
    if device_map is None:
        device_map = "cpu"
    single = isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in PLACEMENT_MODES and device_map != "disk")
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
                          tied_groups=tied_groups(model, sizes), offload_folder=offload_folder,
                          config=getattr(model, "config", None), headroom=headroom)
    compute = next((d for d in plan.device_map.values() if d.startswith(("cuda", "mps"))), "cpu")
    offloader = Offloader(plan, torch.device(compute), offload_folder)
    if not any(offloader.is_offloaded(d) for d in plan.device_map.values()):
        offloader = None
    return plan.device_of, plan, offloader


def tied_groups(model, sizes) -> list[list[str]]:
    return [[a, b] for a, b in tied_pairs(model) if a in sizes and b in sizes]
