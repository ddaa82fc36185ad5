"""Placement: a device for every module, decided from the true (quantized) sizes before anything loads.

The algorithm is accelerate's (walk the top-level modules in order, fill a device, split a module that
does not fit unless its class must stay whole, spill GPU -> CPU -> disk), with its known weak spots
fixed (docs/loading.md §1, §5):

- sizes come from the caller per tensor (a scheme's packed data + scales + zeros + absmax + g_idx),
  never a flat 0.9 fudge; module sizes are summed in one pass, so planning is linear in the model;
- "balanced" cuts the layer sequence at cumulative even shares (rounded to the nearest block), so each
  GPU is within one block of its share, and a large first block (an unquantized embedding) never
  leaves a GPU empty;
- headroom for activations and the KV cache is reserved on the devices that compute, and stated:
  the KV cache of a decoder layer is charged to the device it runs on;
- modules offloaded to CPU/disk run on the first GPU (accelerate's hooks): room for the largest of
  them and for their layers' KV cache is kept there, instead of accelerate's blanket largest-layer cut;
- a module outside the blocks too big for a GPU even empty (an unquantized embedding) moves on alone
  instead of dragging every later layer with it; blocks always keep their order;
- tied parameters are counted once and placed with the first module that holds one of them.

Public: `plan_placement` -> `Plan` (`device_of`, `to_table`, `to_dict`), `tensor_sizes`,
`available_devices`, `parse_memory`, `parse_max_memory`, `estimate_runtime_bytes`.

The planner knows nothing of files or schemes: `tensor_sizes` asks quantized modules (anything with a
`scheme` and a `_logical_shape`, i.e. QLinear / QEmbedding) for `scheme.nbytes_for`.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import ConfigError, PlacementError

MODES = ("auto", "balanced", "balanced_low_0", "sequential")
DEFAULT_HEADROOM_FRACTION = 0.10   # without a model config: accelerate's single-GPU reserve
DEFAULT_CONTEXT_TOKENS = 4096      # with a config: KV cache and prefill activations for this many tokens

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


# --- memory strings and devices ------------------------------------------------------------------

def parse_memory(value, *, what: str = "memory size") -> int:
    """Bytes from an int or a string: "2GiB" (powers of 1024), "500MB", "1.5GB" (powers of 1000)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if m and (m.group(2) or "b").lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    raise ConfigError(f"{what} {value!r} is not a size: expected a non-negative int of bytes or a string "
                      f"such as '2GiB', '500MB', '1.5GB' (B, KB, MB, GB, TB count in 1000s; KiB, MiB, GiB, "
                      f"TiB in 1024s)")


def parse_max_memory(text: str) -> dict[str, int]:
    """The CLI form "cuda:0=2GiB,cpu=10GiB" (commas or spaces between entries) as {device: bytes}."""
    out = {}
    for entry in text.replace(",", " ").split():
        device, sep, size = entry.partition("=")
        if not sep or not device:
            raise ConfigError(f"--max-memory entry {entry!r} is not DEVICE=SIZE (e.g. cuda:0=2GiB,cpu=10GiB)")
        out[device] = parse_memory(size, what=f"max memory for {device!r}")
    if not out:
        raise ConfigError(f"--max-memory {text!r} names no device (e.g. cuda:0=2GiB,cpu=10GiB)")
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass
class DeviceInfo:
    """A device the planner may use: "cuda:0", "mps", "cpu" or "disk", with the bytes free on it."""
    name: str
    capacity: int


def available_devices(offload_folder: str | os.PathLike | None = None) -> list[DeviceInfo]:
    """The devices of this machine in placement order: GPUs (free memory), then CPU (available RAM),
    then disk (free space where offload_folder lives, only when one is given)."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            devices.append(DeviceInfo(f"cuda:{i}", int(free)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(DeviceInfo("mps", int(torch.mps.recommended_max_memory())))
    devices.append(DeviceInfo("cpu", _available_ram()))
    if offload_folder is not None:
        devices.append(DeviceInfo("disk", _free_disk(offload_folder)))
    return devices


def _available_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_disk(folder) -> int:
    path = os.path.abspath(os.fspath(folder))
    while not os.path.exists(path):   # the folder may not exist yet: measure the disk it will be on
        path = os.path.dirname(path)
    return int(shutil.disk_usage(path).free)


def _placement_order(names: list[str]) -> list[str]:
    """GPUs by index, then mps, then cpu: the order layers fill devices in."""
    def key(name):
        if name.startswith("cuda:") and name[5:].isdigit():
            return (0, int(name[5:]))
        return (1, 0) if name == "mps" else (2, 0)
    return sorted(names, key=key)


def _is_compute(name: str) -> bool:
    return name not in ("cpu", "disk")


def _device_name(device, known: list[str], *, what: str) -> str:
    """"cuda:0" for 0, "0", "cuda", torch.device("cuda", 0); PlacementError for one that is not here."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ConfigError(f"{what} {device!r} is not a device: expected an int GPU index or a string "
                          f"such as 'cuda:0', 'cpu', 'disk'")
    name = str(device).strip().lower()
    if name.isdigit():
        name = f"cuda:{int(name)}"
    elif name in ("cuda", "mps:0"):
        name = "cuda:0" if name == "cuda" else "mps"
    if name not in known:
        raise PlacementError(f"{what} {device!r} does not exist on this machine; devices here: "
                             f"{', '.join(known)}")
    return name


# --- the model as the planner sees it ------------------------------------------------------------

def tensor_sizes(model: nn.Module, sizes: Mapping[str, int] | Callable | None = None) -> dict[str, int]:
    """Bytes of every tensor the model will hold, in model order, by full name: parameters, buffers and
    the weights of quantized modules (`scheme.nbytes_for(shape, dtype)`). `sizes` overrides: a dict
    name -> bytes, or a callable (name, tensor or None) -> bytes or None (None keeps the default)."""
    index = _ModelIndex(model, sizes)
    return dict(zip(index.tensors, index.raw_bytes))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _inside(name: str, unit: str) -> bool:
    return unit == "" or name == unit or name.startswith(unit + ".")


class _ModelIndex:
    """Modules and tensors in model order, with subtree sizes summed in one pass (linear, unlike
    accelerate's recursive re-walk that took 60 s on Qwen3-Next, transformers#41548)."""

    def __init__(self, model: nn.Module, sizes=None):
        modules = list(model.named_modules(remove_duplicate=False))
        self.modules = [name for name, _ in modules]
        self.class_of = {name: type(mod).__name__ for name, mod in modules}
        self.children: dict[str, list[str]] = {name: [] for name in self.modules}
        for name in self.modules[1:]:
            self.children[_parent(name)].append(name)
        self.direct: dict[str, list[str]] = {name: [] for name in self.modules}
        objects: dict[str, object] = {}
        for name, mod in modules:
            for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
                if t is not None:
                    self.direct[name].append(_join(name, attr))
                    objects[_join(name, attr)] = t
            scheme = mod.__dict__.get("scheme")   # not getattr: nn.Module's miss path is slow
            if scheme is not None and "_logical_shape" in mod.__dict__:
                qname = _join(name, getattr(scheme, "param_name", "weight"))
                if qname not in objects:
                    self.direct[name].append(qname)
                    objects[qname] = mod
        if isinstance(sizes, Mapping):
            for tname in sizes:
                if tname not in objects:
                    if _parent(tname) not in self.direct:
                        raise ConfigError(f"sizes names {tname!r}, but the model has no module "
                                          f"{_parent(tname)!r} to hold it", key=tname)
                    self.direct[_parent(tname)].append(tname)
                    objects[tname] = None
        # tensors in preorder, so a module's subtree is one contiguous range of them
        self.tensors: list[str] = []
        self.first_tensor: list[int] = []
        for name in self.modules:
            self.first_tensor.append(len(self.tensors))
            self.tensors.extend(self.direct[name])
        self.first_tensor.append(len(self.tensors))
        self.position = {name: i for i, name in enumerate(self.modules)}
        self.subtree_modules = self._subtree_counts()
        self.raw_bytes = [_size_of(t, objects[t], sizes) for t in self.tensors]
        self.tensor_index = {t: i for i, t in enumerate(self.tensors)}
        self.identity_ties = _identity_ties(objects)

    def _subtree_counts(self) -> dict[str, int]:
        counts = {name: 1 for name in self.modules}
        for name in reversed(self.modules[1:]):
            counts[_parent(name)] += counts[name]
        return counts

    def tensor_range(self, unit: str) -> range:
        if unit in self.position:
            pos = self.position[unit]
            return range(self.first_tensor[pos], self.first_tensor[pos + self.subtree_modules[unit]])
        i = self.tensor_index[unit]
        return range(i, i + 1)

    def owner(self, tensor: str) -> str:
        return _parent(tensor)


def _size_of(name: str, obj, sizes) -> int:
    value = None
    if isinstance(sizes, Mapping):
        value = sizes.get(name)
    elif callable(sizes):
        value = sizes(name, obj if isinstance(obj, torch.Tensor) else None)
    if value is None:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if obj is None:
            raise ConfigError(f"no size for {name!r}", key=name)
        return _quantized_weight_bytes(name, obj)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"size of {name!r} is {value!r}; expected a non-negative int of bytes", key=name)
    return value


def _quantized_weight_bytes(name: str, module) -> int:
    qweight = getattr(module, "qweight", None)
    if qweight is not None and not qweight.is_meta:
        return int(qweight.nbytes)
    try:
        return int(module.scheme.nbytes_for(module._logical_shape, module._logical_dtype))
    except NotImplementedError:
        raise ConfigError(f"scheme {module.scheme.name!r} cannot size its weights without loading them; "
                          f"pass sizes={{{name!r}: bytes}}", key=name) from None


def _identity_ties(objects: dict[str, object]) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.Tensor):
            by_id.setdefault(id(obj), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Union of overlapping tie groups ({a,b} and {b,c} are one group)."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g in groups:
        for other in g[1:]:
            parent[find(other)] = find(g[0])
    merged: dict[str, list[str]] = {}
    for x in parent:
        merged.setdefault(find(x), []).append(x)
    return [g for g in merged.values() if len(g) > 1]


# --- the plan ------------------------------------------------------------------------------------

@dataclass
class DevicePlan:
    name: str
    capacity: int          # free bytes found on the device (or what the caller injected)
    budget: int            # min(capacity, max_memory)
    weights: int = 0       # parameter + buffer bytes placed here (tied tensors once)
    kv_cache: int = 0      # estimated KV cache of the decoder layers placed here
    reserved: int = 0      # kept free: activations, and the staging room for offloaded modules
    units: list[str] = field(default_factory=list)   # what was placed, in model order

    @property
    def free(self) -> int:
        return self.budget - self.weights - self.kv_cache - self.reserved


@dataclass
class Plan:
    """Where every tensor goes. `device_map` maps module prefixes (or tensor names) to "cuda:N", "mps",
    "cpu" or "disk"; the longest prefix of a name decides, "" covers the whole model."""
    mode: str
    device_map: dict[str, str]
    devices: list[DevicePlan]
    headroom_rule: str
    total_bytes: int
    offload_folder: str | None = None
    warnings: list[str] = field(default_factory=list)

    def device_of(self, name: str) -> str:
        prefix = name
        while True:
            if prefix in self.device_map:
                return self.device_map[prefix]
            if not prefix:
                raise PlacementError(f"the plan has no device for {name!r}", key=name)
            prefix = _parent(prefix)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "device_map": dict(self.device_map), "total_bytes": self.total_bytes,
                "headroom_rule": self.headroom_rule, "offload_folder": self.offload_folder,
                "warnings": list(self.warnings),
                "devices": [{"name": d.name, "capacity": d.capacity, "budget": d.budget, "weights": d.weights,
                             "kv_cache": d.kv_cache, "reserved": d.reserved, "free": d.free,
                             "units": list(d.units)} for d in self.devices]}

    def to_table(self) -> str:
        header = ("device", "budget", "weights", "kv cache", "reserved", "free", "modules")
        rows = [(d.name, format_bytes(d.budget), format_bytes(d.weights), format_bytes(d.kv_cache),
                 format_bytes(d.reserved), format_bytes(d.free), _summarize(d.units)) for d in self.devices]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in (header, *rows)]
        lines.append(f"mode {self.mode}: {format_bytes(self.total_bytes)} of weights; headroom: "
                     f"{self.headroom_rule}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _summarize(units: list[str], limit: int = 8) -> str:
    """"model.layers.0-13, lm_head": runs of numbered siblings collapsed."""
    parts: list[list] = []   # [stem, first, last] or [name]
    for u in units:
        stem, _, idx = u.rpartition(".")
        if idx.isdigit() and parts and len(parts[-1]) == 3 and parts[-1][0] == stem \
                and parts[-1][2] + 1 == int(idx):
            parts[-1][2] = int(idx)
        elif idx.isdigit() and stem:
            parts.append([stem, int(idx), int(idx)])
        else:
            parts.append([u or "(whole model)"])
    text = [p[0] if len(p) == 1 else f"{p[0]}.{p[1]}" + (f"-{p[2]}" if p[2] != p[1] else "") for p in parts]
    return ", ".join(text[:limit]) + (f", ... ({len(text) - limit} more)" if len(text) > limit else "")


# --- headroom --------------------------------------------------------------------------------------

@dataclass
class _Headroom:
    fixed: dict[str, int]                 # device -> bytes always reserved
    kv_per_block: int                     # charged to each decoder block's device
    rule: str


def _on(devices: list[str]) -> str:
    return f"on {devices[0]}" if len(devices) == 1 else f"on each of {', '.join(devices)}"


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _dtype_bytes(config, dtype) -> int:
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 2


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The compute dtype: that of the first floating-point parameter (norms stay in it when quantized)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def estimate_runtime_bytes(config, *, context_tokens: int = DEFAULT_CONTEXT_TOKENS, batch_size: int = 1,
                           dtype: torch.dtype | None = None) -> tuple[int, int] | None:
    """(KV cache bytes per decoder layer, peak activation bytes of a prefill) for `batch_size` sequences
    of `context_tokens` tokens, from a transformers config; None when the config lacks the sizes.
    Activations: the residual stream, its normed copy, attention output and q/k/v (about 4 x hidden) and
    the MLP's gate and up projections (2 x intermediate) alive at once, in `dtype` (default the config's,
    else 2 bytes) (SDPA/flash
    attention: no tokens x tokens matrix); logits for the last token only, in float32, as generate does."""
    c = _text_config(config)
    try:
        hidden, layers, heads = int(c.hidden_size), int(c.num_hidden_layers), int(c.num_attention_heads)
    except (AttributeError, TypeError):
        return None
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(c, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(c, "vocab_size", 0) or 0)
    nbytes = _dtype_bytes(c, dtype)
    tokens = batch_size * context_tokens
    kv_per_layer = 2 * kv_heads * head_dim * tokens * nbytes
    activations = tokens * (4 * hidden + 2 * intermediate) * nbytes + batch_size * vocab * 4
    return kv_per_layer, activations


def _headroom(headroom, budgets: dict[str, int], compute: list[str], known: list[str], config,
              n_blocks: int, context_tokens: int, batch_size: int, dtype) -> _Headroom:
    """What to keep free on the devices that compute (GPUs; the CPU when no GPU is used)."""
    if headroom is not None:
        if isinstance(headroom, float) and not isinstance(headroom, bool):
            if not 0 <= headroom < 1:
                raise ConfigError(f"headroom {headroom!r}: a float is a fraction of each budget, in [0, 1)")
            return _Headroom({d: int(budgets.get(d, 0) * headroom) for d in compute}, 0,
                             f"{headroom:.0%} of the budget {_on(compute)} (as asked)")
        if isinstance(headroom, Mapping):
            fixed = {_device_name(k, known, what="headroom device"): parse_memory(v, what=f"headroom[{k!r}]")
                     for k, v in headroom.items()}
            return _Headroom(fixed, 0, "as asked per device: " + ", ".join(
                f"{d} {format_bytes(b)}" for d, b in fixed.items()))
        nbytes = parse_memory(headroom, what="headroom")
        return _Headroom({d: nbytes for d in compute}, 0,
                         f"{format_bytes(nbytes)} {_on(compute)} (as asked)")
    estimate = estimate_runtime_bytes(config, context_tokens=context_tokens, batch_size=batch_size,
                                      dtype=dtype) if config is not None else None
    if estimate is None:
        return _Headroom({d: int(budgets.get(d, 0) * DEFAULT_HEADROOM_FRACTION) for d in compute}, 0,
                         f"{DEFAULT_HEADROOM_FRACTION:.0%} of the budget {_on(compute)} for "
                         f"activations and KV cache (no model config to estimate them from)")
    kv_per_layer, activations = estimate
    layers = int(_text_config(config).num_hidden_layers)
    where = f"{batch_size} x {context_tokens} tokens"
    if n_blocks == layers:
        return _Headroom({d: activations for d in compute}, kv_per_layer,
                         f"KV cache {format_bytes(kv_per_layer)} per layer for {where}, charged to the "
                         f"layer's device; prefill activations {format_bytes(activations)} {_on(compute)}")
    # the layers are not recognizable as blocks: every compute device keeps room for the whole cache
    return _Headroom({d: activations + kv_per_layer * layers for d in compute}, 0,
                     f"prefill activations {format_bytes(activations)} + KV cache of all {layers} layers "
                     f"{format_bytes(kv_per_layer * layers)} for {where} {_on(compute)}")


# --- the planner -----------------------------------------------------------------------------------

def plan_placement(model: nn.Module, sizes: Mapping[str, int] | Callable | None = None,
                   device_map="auto", max_memory: Mapping | None = None, *,
                   no_split_module_classes=None, tied_groups=None, offload_folder=None, headroom=None,
                   config=None, context_tokens: int = DEFAULT_CONTEXT_TOKENS, batch_size: int = 1,
                   devices: list[DeviceInfo] | None = None) -> Plan:
    """Plan where every tensor of `model` (a skeleton on meta) goes, without loading anything.

    sizes: bytes per tensor name (see `tensor_sizes`); the default counts each tensor as it is on the
        model and asks quantized modules' schemes.
    device_map: "auto" (= "balanced"), "balanced", "balanced_low_0", "sequential", one device ("cpu",
        "cuda:1", 0, "disk"), or a dict {module prefix: device}, the longest prefix deciding.
    max_memory: {device: bytes or "2GiB"}; devices not named keep their free memory; 0 excludes one.
    no_split_module_classes: class names never split across devices (default model._no_split_modules).
    tied_groups: lists of tensor names that share storage (parameters shared by identity are found).
    offload_folder: enables the "disk" device. headroom: bytes, a fraction of each budget, or a
        {device: bytes} dict reserved on compute devices; default from `config` (model.config):
        KV cache + prefill activations for batch_size x context_tokens tokens, else 10% of each budget.
    devices: the machine's devices (tests inject fakes); default `available_devices(offload_folder)`.
    """
    with _gc_paused():
        return _plan(model, sizes, device_map, max_memory, no_split_module_classes, tied_groups,
                     offload_folder, headroom, config, context_tokens, batch_size, devices)


@contextlib.contextmanager
def _gc_paused():
    """The index makes ~10 small objects per tensor; with a large module tree alive, the cyclic GC's
    full passes made planning grow faster than linearly (8000 blocks: 2.6 s with it, 1.4 s without)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _plan(model, sizes, device_map, max_memory, no_split_module_classes, tied_groups, offload_folder,
          headroom, config, context_tokens, batch_size, devices) -> Plan:
    index = _ModelIndex(model, sizes)
    if devices is None:
        devices = available_devices(offload_folder)
    known = _placement_order([d.name for d in devices if d.name != "disk"]) + ["disk"]
    capacity = {d.name: int(d.capacity) for d in devices}
    if offload_folder is None:
        capacity.pop("disk", None)   # without a folder there is no disk to spill to
    elif "disk" not in capacity:
        capacity["disk"] = _free_disk(offload_folder)
    budgets = _budgets(capacity, max_memory, known, offload_folder)

    if no_split_module_classes is None:
        no_split_module_classes = getattr(model, "_no_split_modules", None) or ()
    no_split = set(no_split_module_classes)
    blocks = [m for m in index.modules if index.class_of[m] in no_split]
    groups = _merge_groups([list(g) for g in (tied_groups or ())] + index.identity_ties)
    for g in groups:
        for name in g:
            if name not in index.tensor_index:
                raise ConfigError(f"tied_groups names {name!r}, which is not a tensor of the model", key=name)
    if config is None:
        config = getattr(model, "config", None)

    mode, single = _mode_of(device_map, known)
    explicit = isinstance(device_map, Mapping) or single is not None
    if explicit:
        tensor_device = _explicit(index, device_map, single, known)
        compute = _placement_order(list({d for d in tensor_device if _is_compute(d)}))
    else:
        compute = [d for d in budgets if _is_compute(d) and budgets[d] > 0]
    room = _headroom(headroom, budgets, compute or ["cpu"], known, config, len(blocks), context_tokens,
                     batch_size, _model_dtype(model))
    sizing = _Sizing(index, groups, no_split, blocks, room.kv_per_block)
    if explicit:
        plan = _finish(index, sizing, tensor_device, budgets, capacity, room, mode, offload_folder)
        _check_explicit(plan, index, sizing, groups, blocks)
        return plan
    plan = _plan_greedy(index, sizing, mode, budgets, capacity, room, offload_folder)
    gpus = [d for d in compute if d != "cpu"]
    if gpus and not any(_is_compute(d) for d in plan.device_map.values()):
        # The room kept on the GPUs for running offloaded modules (and their KV cache) left them no module:
        # then nothing runs there (the model computes where its first GPU module is, and there is none),
        # and the CPU holds the KV cache of the layers on disk. Plan for the machine that will run it.
        cpu_budgets = {d: b for d, b in budgets.items() if d not in gpus}
        cpu_room = _headroom(headroom, cpu_budgets, ["cpu"], known, config, len(blocks), context_tokens,
                             batch_size, _model_dtype(model))
        plan = _plan_greedy(index, _Sizing(index, groups, no_split, blocks, cpu_room.kv_per_block), mode,
                            cpu_budgets, capacity, cpu_room, offload_folder)
        plan.warnings.append(f"{', '.join(gpus)}: the budget ({', '.join(format_bytes(budgets[g]) for g in gpus)}) "
                             f"holds no module beside the room for running offloaded ones and the activations "
                             f"({room.rule}); the model runs on the CPU. Give the GPU more memory to use it")
    return plan


def _budgets(capacity: dict[str, int], max_memory, known, offload_folder) -> dict[str, int]:
    """Usable bytes per device, in placement order (GPUs, mps, cpu, disk)."""
    budgets = dict(capacity)
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ConfigError(f"max_memory must be a dict {{device: size}}, got {type(max_memory).__name__}")
        for key, value in max_memory.items():
            name = _device_name(key, known, what="max_memory device")
            asked = parse_memory(value, what=f"max_memory[{key!r}]")
            if name == "disk" and offload_folder is None:
                raise ConfigError("max_memory gives a budget for 'disk' but no offload_folder was given; "
                                  "pass offload_folder=<directory> to offload to disk")
            # more than is free would only fail later, with an out-of-memory error mid-load
            budgets[name] = min(asked, capacity.get(name, asked))
    order = [d for d in known if d in budgets]
    return {d: budgets[d] for d in order}


def _mode_of(device_map, known) -> tuple[str, str | None]:
    if isinstance(device_map, Mapping):
        return "dict", None
    if isinstance(device_map, str) and device_map in MODES:
        return device_map, None
    try:
        name = _device_name(device_map, known, what="device_map")
    except PlacementError:
        if not isinstance(device_map, str) or re.fullmatch(r"\s*(cuda|mps|cpu|disk)?:?\d*\s*", device_map):
            raise   # a device that is not here: say so plainly
        raise PlacementError(f"device_map {device_map!r} is neither a mode ({', '.join(MODES)}) nor a "
                             f"device here ({', '.join(known)}), nor a dict {{module prefix: device}}") from None
    return name, name


class _Sizing:
    """Per-tensor bytes with tied tensors counted once, subtree sums of weights and KV cache."""

    def __init__(self, index: _ModelIndex, groups, no_split: set[str], blocks: list[str], kv_per_block: int):
        self.bytes = list(index.raw_bytes)
        for g in groups:   # the first member in model order carries the bytes
            members = sorted(index.tensor_index[n] for n in g)
            for i in members[1:]:
                self.bytes[i] = 0
        self.weight: dict[str, int] = {m: 0 for m in index.modules}
        for pos, m in enumerate(index.modules):
            own = sum(self.bytes[index.first_tensor[pos]:index.first_tensor[pos + 1]])
            self.weight[m] += own
        for m in reversed(index.modules[1:]):
            self.weight[_parent(m)] += self.weight[m]
        self.kv: dict[str, int] = {m: 0 for m in index.modules}
        for b in blocks:
            self.kv[b] += kv_per_block
            anc = b
            while anc:
                anc = _parent(anc)
                self.kv[anc] += kv_per_block
        self.blocks = set(blocks)
        # the module each tensor runs in: its outermost no-split ancestor, else its own module
        outer: dict[str, str | None] = {}
        for m in index.modules:
            up = outer.get(_parent(m)) if m else None
            outer[m] = up or (m if index.class_of[m] in no_split else None)
        self.exec_unit = [outer[index.owner(t)] or index.owner(t) for t in index.tensors]
        exec_bytes: dict[str, int] = {}
        for unit, nbytes in zip(self.exec_unit, self.bytes):
            exec_bytes[unit] = exec_bytes.get(unit, 0) + nbytes
        sized = [exec_bytes[b] + kv_per_block for b in blocks if b in exec_bytes] or [
            b for b in exec_bytes.values() if b]
        self.smallest_block = min(sized, default=1)
        self.kv_per_block = kv_per_block
        self.groups = groups
        self.no_split = no_split
        self.index = index

    def weight_of(self, unit: str) -> int:
        if unit in self.weight:
            return self.weight[unit]
        return self.bytes[self.index.tensor_index[unit]]

    def cost(self, unit: str) -> int:
        return self.weight_of(unit) + self.kv.get(unit, 0)

    def splittable(self, unit: str) -> bool:
        ix = self.index
        return unit in ix.children and bool(ix.children[unit]) and ix.class_of[unit] not in self.no_split

    def describe(self, unit: str) -> str:
        if unit not in self.index.class_of:
            return f"tensor {unit!r}"
        kept = ", kept whole: no-split" if self.index.class_of[unit] in self.no_split else ""
        return f"{unit or '(whole model)'!r} ({self.index.class_of[unit]}{kept})"


# --- explicit maps: one device, or a dict --------------------------------------------------------

def _explicit(index: _ModelIndex, device_map, single, known) -> list[str]:
    if single is not None:
        return [single] * len(index.tensors)
    normalized = {}
    for prefix, dev in device_map.items():
        if not isinstance(prefix, str):
            raise ConfigError(f"device_map key {prefix!r} is not a module prefix (a string)")
        if prefix and prefix not in index.position and prefix not in index.tensor_index:
            raise ConfigError(f"device_map names {prefix!r}, which is neither a module nor a tensor of the "
                              f"model", key=prefix)
        normalized[prefix] = _device_name(dev, known, what=f"device_map[{prefix!r}]")
    out = []
    for t in index.tensors:
        prefix, dev = t, None
        while dev is None:
            dev = normalized.get(prefix)
            if not prefix:
                break
            prefix = _parent(prefix)
        out.append(dev)
    missing = [i for i, d in enumerate(out) if d is None]
    if missing:
        names = [index.tensors[i] for i in missing]
        total = sum(index.raw_bytes[i] for i in missing)
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise PlacementError(f"device_map leaves {len(names)} tensor(s) ({format_bytes(total)}) without a "
                             f"device: {', '.join(names[:10])}{more}; add a prefix covering them "
                             f"('' covers everything not named)", key=names[0])
    return out


def _check_explicit(plan: Plan, index, sizing: _Sizing, groups, blocks) -> None:
    for d in plan.devices:
        if d.weights + d.kv_cache > d.budget:
            others = ", ".join(f"{o.name} {format_bytes(max(o.free, 0))}" for o in plan.devices
                               if o.name != d.name) or "none"
            raise PlacementError(f"device_map puts {format_bytes(d.weights + d.kv_cache)} on {d.name} "
                                 f"(weights {format_bytes(d.weights)}, KV cache {format_bytes(d.kv_cache)}) "
                                 f"but its budget is {format_bytes(d.budget)}; move at least "
                                 f"{format_bytes(d.weights + d.kv_cache - d.budget)} elsewhere (room left: "
                                 f"{others}) or raise max_memory", key=d.name)
        if d.free < 0:
            plan.warnings.append(f"{d.name} keeps only {format_bytes(d.budget - d.weights - d.kv_cache)} "
                                 f"free, less than the {format_bytes(d.reserved)} headroom ({plan.headroom_rule})")
    for g in groups:
        devs = {plan.device_of(n) for n in g}
        if len(devs) > 1:
            raise PlacementError(f"tied tensors {', '.join(g)} share one storage but device_map puts them on "
                                 f"{', '.join(sorted(devs))}; map their modules to one device", key=g[0])
    for b in blocks:
        devs = {plan.device_of(index.tensors[i]) for i in index.tensor_range(b)}
        if len(devs) > 1:
            plan.warnings.append(f"{sizing.describe(b)} is split over {', '.join(sorted(devs))}; its forward "
                                 f"then moves activations between devices inside the block")


# --- balanced / sequential -----------------------------------------------------------------------

@dataclass
class _Slot:
    name: str
    usable: int                # budget - reserved: what weights and KV cache may take
    target: float | None       # cumulative bytes placed up to and including this device (soft)
    used: int = 0


def _water_fill(caps: list[int], total: float) -> list[float]:
    """Equal shares of `total`, except that a device smaller than its share is filled and the rest
    shared by the others."""
    shares = [0.0] * len(caps)
    left, k = float(total), len(caps)
    for i in sorted(range(len(caps)), key=caps.__getitem__):
        shares[i] = min(float(caps[i]), left / k)
        left -= shares[i]
        k -= 1
    return shares


def _slots(mode, budgets, reserved, total) -> list[_Slot]:
    usable = {d: budgets[d] - reserved.get(d, 0) for d in budgets}
    names = [d for d in budgets if usable[d] > 0]   # a device left with no room takes nothing
    gpus = [d for d in names if _is_compute(d)]
    targets: dict[str, float | None] = {d: None for d in names}
    if mode != "sequential" and len(gpus) > 1:
        caps = [usable[d] for d in gpus]
        to_gpus = min(total, sum(caps))
        if mode == "balanced_low_0":
            first = max(0, to_gpus - sum(caps[1:]))   # GPU 0 only takes what the others cannot
            shares = [first] + _water_fill(caps[1:], to_gpus - first)
        else:
            shares = _water_fill(caps, to_gpus)
        for d, cum in zip(gpus[:-1], accumulate(shares)):   # the last GPU fills up: no stray spill
            targets[d] = cum
    return [_Slot(d, usable[d], targets[d]) for d in names]


def _plan_greedy(index, sizing: _Sizing, mode, budgets, capacity, room: _Headroom, offload_folder) -> Plan:
    total = sizing.weight[""] + sizing.kv[""]
    compute = [d for d in budgets if _is_compute(d) and budgets[d] > 0]
    exec_device = compute[0] if compute else "cpu"
    # Modules offloaded to the CPU (when there is a GPU) or to disk are brought to the first compute
    # device to run (accelerate's hooks), and their layers' KV cache lives there: keep room there for
    # the largest of them and for that cache. Re-plan until the reservation covers what ends up
    # offloaded; it only grows, and a few rounds settle it.
    staging, kv_moved, too_big = 0, set(), []
    for _ in range(4):
        reserve = staging + len(kv_moved) * sizing.kv_per_block
        reserved = dict(room.fixed)
        reserved[exec_device] = reserved.get(exec_device, 0) + reserve
        slots = _slots(mode, budgets, reserved, total)
        assignment = _greedy(index, sizing, slots, budgets, reserved)
        tensor_device = _tensor_devices(index, assignment)
        used = next((d for d in compute if d in tensor_device), None)
        if used is not None and used != exec_device and not reserve:
            exec_device = used   # the first GPU got nothing: offloaded modules run on the next one
        room_there = max(0, budgets.get(exec_device, 0) - room.fixed.get(exec_device, 0))
        needed, blocks, too_big = _staging_needed(sizing, tensor_device, exec_device, room_there)
        if needed + len(blocks) * sizing.kv_per_block <= reserve:
            break
        staging, kv_moved = max(staging, needed), kv_moved | blocks
    if reserve and exec_device != "cpu" and exec_device not in tensor_device:
        # the reservation crowded out the GPUs: all runs where it is stored, nothing needs staging (the
        # caller then plans again for the CPU; the CPU itself always runs what is on disk)
        staging, kv_moved = 0, set()
    reserved = dict(room.fixed)
    reserved[exec_device] = reserved.get(exec_device, 0) + staging
    rule = room.rule + (f"; {format_bytes(staging)} on {exec_device} to run the largest offloaded module"
                        if staging else "") + (f" (the KV cache of the {len(kv_moved)} offloaded layers "
                                               f"is counted there too)" if kv_moved else "")
    plan = _finish(index, sizing, tensor_device, budgets, capacity,
                   _Headroom(reserved, room.kv_per_block, rule), mode, offload_folder, assignment,
                   kv_moved=kv_moved, exec_device=exec_device)
    for unit, nbytes in too_big[:5]:
        plan.warnings.append(f"{unit!r} ({format_bytes(nbytes)}) is offloaded and larger than the room on "
                             f"{exec_device}; it runs where it is stored")
    by_name = {p.name: p for p in plan.devices}
    for k, slot in enumerate(slots):
        deliberate = mode == "balanced_low_0" and compute and slot.name == compute[0]
        later_used = any(by_name[s.name].units for s in slots[k + 1:] if s.name in by_name)
        if slot.usable > 0 and not by_name[slot.name].units and later_used and not deliberate:
            plan.warnings.append(f"{slot.name} received nothing although {format_bytes(by_name[slot.name].free)} "
                                 f"was free: no module due there fitted")
    return plan


def _tensor_devices(index, assignment) -> list[str]:
    tensor_device: list[str | None] = [None] * len(index.tensors)
    for unit, dev in assignment:   # a unit placed earlier as a tied companion keeps its device
        for i in index.tensor_range(unit):
            if tensor_device[i] is None:
                tensor_device[i] = dev
    return tensor_device


def _staging_needed(sizing: _Sizing, tensor_device, exec_device, room_there) -> tuple[int, set, list]:
    """Bytes of the largest offloaded module that can be brought to `exec_device` (a no-split block or a
    leaf module), the offloaded blocks run there, and the offloaded modules too large to be brought."""
    if exec_device != "cpu" and exec_device not in tensor_device:   # an unused GPU runs nothing
        return 0, set(), []
    offloaded: dict[str, int] = {}
    for i, dev in enumerate(tensor_device):
        if dev == "disk" or (dev == "cpu" and exec_device != "cpu"):
            unit = sizing.exec_unit[i]
            offloaded[unit] = offloaded.get(unit, 0) + sizing.bytes[i]
    fitting = {u: b for u, b in offloaded.items() if b <= room_there}
    too_big = [(u, b) for u, b in offloaded.items() if b > room_there]
    return max(fitting.values(), default=0), {u for u in fitting if u in sizing.blocks}, too_big


def _greedy(index, sizing: _Sizing, slots: list[_Slot], budgets, reserved):
    """Walk the units in model order and fill the slots in order; returns [(unit, device)].

    A unit that does not fit goes to its parts when it may be split, else the walk moves on to the next
    device. One exception keeps a GPU from being skipped by a single outsized module (an unquantized
    embedding bigger than the GPU, accelerate#2586): a whole unit that could not fit the current device
    even empty goes to the first later device with room, and the walk stays where it was, as long as
    that device can hold at least the smallest block. Blocks themselves keep their order."""
    groups_of: dict[str, list[str]] = {}   # tied tensor -> the units its group is placed with
    for g in sizing.groups:
        homes = [_home(index, sizing, n) for n in g]
        for n in g:
            groups_of[n] = homes
    placed: set[str] = set()
    placed_inside: dict[str, int] = {}
    assignment: list[tuple[str, str]] = []
    queue = deque([""])
    i = 0
    cum = 0   # bytes placed in walk order, compared with the cumulative balanced shares

    def place(units, slot, need):
        for u in units:
            placed.add(u)
            assignment.append((u, slot.name))
        for c in units[1:]:   # tied companions: their ancestors are now partly placed
            anc, cost = c, sizing.cost(c) - placed_inside.get(c, 0)
            while anc:
                anc = _parent(anc)
                placed_inside[anc] = placed_inside.get(anc, 0) + cost
        slot.used += need

    while queue:
        unit = queue.popleft()
        if unit in placed:
            continue
        companions = _companions(unit, groups_of, placed)
        need = sizing.cost(unit) - placed_inside.get(unit, 0) + sum(
            sizing.cost(c) - placed_inside.get(c, 0) for c in companions)
        while True:
            if i == len(slots):
                raise _no_room(unit, need, sizing, slots, budgets, reserved)
            slot = slots[i]
            fits = slot.used + need <= slot.usable
            if need == 0 or (fits and (slot.target is None or cum + need <= slot.target)):
                take = True
            elif sizing.splittable(unit):   # too big, or past this device's share: place its parts
                queue.extendleft(reversed(index.direct[unit] + index.children[unit]))
                break
            elif need > slot.usable >= sizing.smallest_block and unit not in sizing.blocks:
                later = next((s for s in slots[i + 1:] if s.used + need <= s.usable), None)
                if later is None:
                    raise _no_room(unit, need, sizing, slots[i:], budgets, reserved)
                place([unit, *companions], later, need)
                for s in slots[slots.index(later):]:   # it took part of that device's share
                    if s.target is not None:
                        s.target -= need
                break
            else:   # a whole block: keep it here if that lands nearer the share than moving on would
                take = fits and slot.target is not None and (
                    cum + need / 2 <= slot.target or (slot.used == 0 and cum < slot.target))
            if take:
                place([unit, *companions], slot, need)
                cum += need
                break
            i += 1
    return assignment


def _home(index: _ModelIndex, sizing: _Sizing, tensor: str) -> str:
    """The unit a tied tensor is placed with: its outermost no-split ancestor, else its module when that
    module is a leaf, else the tensor itself."""
    owner = index.owner(tensor)
    outermost = None
    anc = owner
    while True:
        if anc in index.class_of and index.class_of[anc] in sizing.no_split:
            outermost = anc
        if not anc:
            break
        anc = _parent(anc)
    if outermost is not None:
        return outermost
    return owner if owner and not index.children[owner] else tensor


def _companions(unit: str, groups_of: dict[str, list[str]], placed: set[str]) -> list[str]:
    out: list[str] = []
    for tensor, homes in groups_of.items():
        if not _inside(tensor, unit):
            continue
        for h in homes:
            if h not in placed and not _inside(h, unit) and h not in out:
                out.append(h)
    return out


def _no_room(unit, need, sizing: _Sizing, slots, budgets, reserved) -> PlacementError:
    rooms = ", ".join(f"{s.name} {format_bytes(max(0, s.usable - s.used))}" for s in slots)
    total = sizing.weight[""] + sizing.kv[""]
    usable = sum(s.usable for s in slots)
    largest = max(slots, key=lambda s: s.usable, default=None)
    hint = "raise max_memory, lower headroom"
    if "disk" not in budgets:
        hint += ", or pass offload_folder=<directory> to spill to disk"
    what = sizing.describe(unit)
    kv = sizing.kv.get(unit, 0)
    needs = f"{format_bytes(need)}" + (f" (KV cache {format_bytes(kv)} included)" if kv else "")
    fit = (f"a device needs a budget of at least {format_bytes(need + reserved.get(largest.name, 0))} to "
           f"hold it (largest usable budget: {largest.name} {format_bytes(largest.usable)})") if largest else ""
    return PlacementError(f"cannot place {what}: it needs {needs} but the devices left have "
                          f"{rooms or 'no room'}; {fit}. The model needs {format_bytes(total)} in all and the "
                          f"budgets after headroom hold {format_bytes(usable)}; {hint}",
                          key=unit or None)


def _finish(index, sizing: _Sizing, tensor_device, budgets, capacity, room: _Headroom, mode,
            offload_folder, assignment=None, *, kv_moved=frozenset(), exec_device=None) -> Plan:
    if "disk" in tensor_device and offload_folder is None:
        on_disk = sum(sizing.bytes[i] for i, d in enumerate(tensor_device) if d == "disk")
        raise ConfigError(f"device_map puts {format_bytes(on_disk)} on 'disk' but no offload_folder was "
                          f"given; pass offload_folder=<directory> with at least that much free space")
    used_devices = set(tensor_device)
    names = [d for d in budgets if budgets[d] > 0 or d in used_devices]
    for d in used_devices:
        if d not in names:
            names.append(d)
    plans = {d: DevicePlan(d, capacity.get(d, 0), budgets.get(d, 0), reserved=room.fixed.get(d, 0))
             for d in names}
    for i, d in enumerate(tensor_device):
        plans[d].weights += sizing.bytes[i]
    for b in sizing.blocks:   # a layer's KV cache lives where the layer runs
        r = index.tensor_range(b)
        if len(r):
            plans[exec_device if b in kv_moved else tensor_device[r.start]].kv_cache += sizing.kv_per_block
    if assignment is None:
        assignment = _units_of(index, tensor_device)
    for unit, dev in assignment:
        plans[dev].units.append(unit)
    for p in plans.values():   # units in model order, whatever order they were placed in
        p.units.sort(key=lambda u: index.tensor_range(u).start)
    return Plan(mode, _clean_map(index, tensor_device), list(plans.values()), room.rule,
                sum(sizing.bytes), os.fspath(offload_folder) if offload_folder is not None else None)


def _units_of(index, tensor_device) -> list[tuple[str, str]]:
    """For an explicit map: the top-most modules that sit whole on one device."""
    dm = _clean_map(index, tensor_device)
    return list(dm.items())


def _clean_map(index: _ModelIndex, tensor_device) -> dict[str, str]:
    """The shortest device map: a module whose whole subtree is on one device is one entry."""
    mixed = object()
    common: dict[str, object] = {}
    for m in reversed(index.modules):
        pos = index.position[m]
        devs = {tensor_device[i] for i in range(index.first_tensor[pos], index.first_tensor[pos + 1])}
        for c in index.children[m]:
            if common[c] is mixed:
                devs.add(mixed)
            elif common[c] is not None:
                devs.add(common[c])
        common[m] = None if not devs else (devs.pop() if len(devs) == 1 else mixed)
    out: dict[str, str] = {}
    stack = [""]
    while stack:
        m = stack.pop()
        if common[m] is None:
            continue
        if common[m] is not mixed:
            out[m] = common[m]
            continue
        pos = index.position[m]
        for i in range(index.first_tensor[pos], index.first_tensor[pos + 1]):
            out[index.tensors[i]] = tensor_device[i]
        stack.extend(reversed(index.children[m]))
    return out
