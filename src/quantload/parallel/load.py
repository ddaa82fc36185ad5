"""quantload.load(path, tp_plan=...) under torch.distributed: every rank builds the skeleton on meta,
narrows the planned Linears to its shard, reads only its slices of their (still quantized) pieces
(shard_specs.py) and installs the collectives transformers' styles imply: an all-reduce of a rowwise
layer's partial sums, an all-gather of a colwise_gather_output layer's outputs (lm_head). Everything else
is loaded whole (replicated). Every rank runs the same checks before reading a byte, so a bad request
fails on all of them; a failure while reading is shared through one collective (bounded by the process
group's timeout), so no rank is left waiting in a forward."""
from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint_weights import CheckpointWeights
from ..config import parse_dtype
from ..engine import load_weights
from ..errors import ConfigError, QuantloadError
from ..finalize import finalize, tied_pairs
from ..load_setup import checkpoint_spec
from ..load_setup import config_file as config_path
from ..prepare import build_skeleton, check_quantized_tensors, named_tensors, read_config_dir, replace_modules
from ..report import LoadReport, RssWatch
from ..runtime import kernels as _kernels
from ..sources import open_source
from .plan import resolve
from .shard_specs import PieceReader, Split, check_dense, shard_dense, spec_for

_IGNORABLE = ("position_ids", "rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def io_read_bytes() -> int | None:
    """Bytes this process made the kernel fetch from storage (/proc/self/io read_bytes; 0 when the file was
    already in the page cache), or None where /proc has no io file."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration, ValueError):
        return None


def _group(device_mesh):
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("tp_plan needs torch.distributed initialized on every rank (run under torchrun and "
                          "call torch.distributed.init_process_group(timeout=...) first): docs/parallel.md")
    if device_mesh is None:
        group = dist.group.WORLD
    else:
        if getattr(device_mesh, "ndim", 1) != 1:
            raise ConfigError(f"device_mesh has {device_mesh.ndim} dims; tensor parallelism takes a 1-d mesh")
        group = device_mesh.get_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


class ShardedWeights(CheckpointWeights):
    """CheckpointWeights whose split modules yield the rank's shard: quantized pieces through their scheme's
    shard spec, plain weights and biases sliced; bytes_read counts the bytes of the slices copied."""

    def __init__(self, source, model_names, base_prefix, splits: dict[str, Split]):
        super().__init__(source, model_names, base_prefix)
        self.splits = splits

    def qtensor(self, module_name, mod):
        split = self.splits.get(module_name)
        if split is None:
            return super().qtensor(module_name, mod)
        scheme = mod.scheme
        have = self.suffixes(module_name)
        if not scheme.present(have):
            return None
        prefix = self.module_prefix(module_name)
        sep = prefix + "." if prefix else ""
        wanted = [s for s in (*scheme.required_keys(), *scheme.optional_keys()) if s in have]
        reader = PieceReader(lambda s: self.source.get(sep + s), set(wanted))
        spec = spec_for(scheme, module_name)
        full = mod.tp_full_shape
        pieces = spec.shard(scheme, reader, full, split, module_name)
        self.used.update(sep + s for s in wanted)
        self.tensors_read += len(reader.used)
        self.bytes_read += reader.bytes_read
        self.companions += max(0, len(wanted) - 1)
        local = spec.scheme_for_shard(scheme, full, split)
        return local.decode(pieces, shape=tuple(mod._logical_shape), file=self._file_of(sep + wanted[0]),
                            prefix=prefix)

    def tensor(self, name):
        mod_name, _, kind = name.rpartition(".")
        split = self.splits.get(mod_name)
        if split is None or kind not in ("weight", "bias"):
            return super().tensor(name)
        key = self.key_of(name)
        if key not in self.source:
            return None
        t = shard_dense(self.source.get(key), split, kind).clone(memory_format=torch.contiguous_format)
        self.used.add(key)
        self.tensors_read += 1
        self.bytes_read += t.numel() * t.element_size()
        return t


def _narrow(mod: nn.Linear, split: Split) -> None:
    """Make a meta Linear its local shard's size (QLinear.from_linear then builds the local shape)."""
    out, inp = split.local_shape((mod.out_features, mod.in_features))
    mod.tp_full_shape = (mod.out_features, mod.in_features)
    mod.weight = nn.Parameter(torch.empty(out, inp, dtype=mod.weight.dtype, device="meta"), requires_grad=False)
    if mod.bias is not None and split.style == "colwise":
        mod.bias = nn.Parameter(torch.empty(out, dtype=mod.bias.dtype, device="meta"), requires_grad=False)
    mod.out_features, mod.in_features = out, inp


class AllReduceOutput:
    """Forward hook of a rowwise layer: sum the ranks' partial products (bias only on rank 0)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, mod, args, out):
        out = out.contiguous()
        dist.all_reduce(out, group=self.group)
        return out


class SplitInput:
    """Forward pre-hook of a rowwise layer: an input that arrives whole (not from a colwise layer before
    it, e.g. transformers' rowwise_split_input) is cut to the rank's input features."""

    def __init__(self, split: Split, in_features: int):
        self.split, self.full = split, in_features
        self.start, self.stop = split.bounds(in_features)

    def __call__(self, mod, args):
        x = args[0]
        if x.shape[-1] == self.full and self.split.world > 1:
            return (x[..., self.start:self.stop], *args[1:])
        return None


class GatherOutput:
    """Forward hook of a colwise_gather_output layer (lm_head): every rank gets all outputs, in rank order."""

    def __init__(self, group, world):
        self.group, self.world = group, world

    def __call__(self, mod, args, out):
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(self.world)]
        dist.all_gather(parts, out, group=self.group)
        return torch.cat(parts, dim=-1)


def load_tp(path, *, tp_plan, device_mesh=None, dtype=None, strict=True, exact=None,
            quantize=None, model=None, device_map="cpu", trust_remote_code=False, dequantize=False) -> nn.Module:
    group, rank, world = _group(device_mesh)
    error = None
    try:
        if quantize is not None or model is not None or dequantize:
            raise ConfigError("tp_plan loads a checkpoint as it is stored: quantize=, model= and dequantize= are "
                              "not supported with it yet")
        device = device_map if isinstance(device_map, (str, torch.device)) else "cpu"
        if str(device) in ("auto", "balanced", "balanced_low_0", "sequential", "disk"):
            raise ConfigError(f"tp_plan with device_map={device_map!r}: pass one device per rank "
                              "(e.g. f'cuda:{local_rank}' or 'cpu')")
        result = _load(path, tp_plan, group, rank, world, dtype, strict, exact, str(device),
                       trust_remote_code)
    except Exception as e:  # shared below, then re-raised on this rank
        error, result = e, None
    # one collective: every rank learns whether all loaded (the group's timeout bounds it)
    failures = [None] * world
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(failures) if m is not None]
    if bad:
        raise QuantloadError(f"tensor-parallel load failed on rank {bad[0][0]} of {world}: {bad[0][1]}", file=path)
    return result


def _skeleton(path, source, report, dtype, trust_remote_code):
    """(meta model, checkpoint QuantSpec or None, dtype) for a safetensors / torch-file checkpoint."""
    config = read_config_dir(path)
    config_file = config_path(path)
    if config is None:
        raise ConfigError("tp_plan needs a config.json beside the weights", file=path)
    spec = checkpoint_spec(path, config)
    check_quantized_tensors(spec, source.keys(), file=config_file)
    report.quant_method, report.prequantized = (spec.method if spec else None), spec is not None
    if dtype is None:
        cd = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = parse_dtype(cd, file=config_file, key="dtype") if isinstance(cd, (str, torch.dtype)) else torch.float32
    model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code, source=source, file=config_file)
    return model, spec, dtype


def _load(path, tp_plan, group, rank, world, dtype, strict, exact, device, trust_remote_code):
    from ..model_size import attach_size_methods
    watch, io0 = RssWatch(), io_read_bytes()
    report = LoadReport(path=path, rss_before=watch.start_rss)
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    source = open_source(path)
    report.source_kind = source.kind
    kernels_before = _kernels.begin_load(exact)
    try:
        gguf = source.kind == "gguf"
        if gguf:
            from ..gguf_load import model_map_of
            from .gguf_tp import gguf_choose, refuse_experts
            mm = model_map_of(source)
            refuse_experts(mm, path)
            spec, dtype = None, dtype or torch.float32
            report.quant_method, report.prequantized = "gguf", True
            model = build_skeleton(mm.config, dtype)
            if mm.adapt is not None:
                mm.adapt(model)
        else:
            model, spec, dtype = _skeleton(path, source, report, dtype, trust_remote_code)
        shards, notes = resolve(model, tp_plan, world)
        tied = {t.rpartition(".")[0] for pair in tied_pairs(model) for t in pair}
        for name in sorted(set(shards) & tied):   # a head tied to the embeddings is the (replicated) table
            notes.append(f"{name}: tied to the input embeddings; loaded replicated")
            del shards[name]
        splits = {n: Split("colwise" if k.startswith("colwise") else "rowwise", rank, world)
                  for n, k in shards.items()}
        modules = list(model.named_modules())
        if gguf:
            from .gguf_tp import ShardedGGUFWeights
            weights, choose = ShardedGGUFWeights(source, mm, dtype, splits), gguf_choose(source, mm)
        else:
            names = [n for n, _ in named_tensors(modules, "_parameters")] + \
                    [n for n, _ in named_tensors(modules, "_buffers")]
            weights = ShardedWeights(source, names, getattr(model, "base_model_prefix", None), splits)

            def choose(name, mod):
                scheme = spec.scheme_for(name, mod) if spec is not None else None
                if scheme is None or isinstance(mod, nn.Embedding) and not getattr(scheme, "quantizes_embeddings", 0):
                    return None
                if not scheme.present(weights.suffixes(name)):
                    return None
                return scheme

        # every check before the first byte is read: same inputs on every rank, so the same verdict
        by_name = dict(modules)
        for name, split in splits.items():
            mod = by_name[name]
            full = (mod.out_features, mod.in_features)
            scheme = choose(name, mod)
            if gguf:
                from .gguf_tp import check_gguf
                check_gguf(mm, name, scheme, full, split)
            elif scheme is None:
                check_dense(name, full, split)
            else:
                spec_for(scheme, name).check(scheme, name, full, split)
        for name, split in splits.items():
            _narrow(by_name[name], split)
        replace_modules(model, choose, dtype)
        for name in splits:   # QLinear replaced the narrowed Linear: carry the full shape over
            model.get_submodule(name).tp_full_shape = by_name[name].tp_full_shape
        report.seconds["prepare"] = time.perf_counter() - t0
        load_weights(model, weights, dtype=dtype, device_of=lambda _: device, report=report)
        report.tensors_read, report.bytes_read = weights.tensors_read, weights.bytes_read
        finalize(model, spec=spec, report=report, weights=weights, file=path, strict=strict,
                 ignorable_unexpected=tuple(mm.consumed) if gguf else _IGNORABLE)
    finally:
        _kernels.end_load(kernels_before)
        file_bytes = source.total_bytes()
        source.close()
    for name, split in splits.items():
        mod = model.get_submodule(name)
        if split.style == "rowwise":
            if mod.bias is not None and rank != 0:
                with torch.no_grad():
                    mod.bias.zero_()    # the bias is added once, to the sum
            mod.register_forward_pre_hook(SplitInput(split, mod.tp_full_shape[1]))
            mod.register_forward_hook(AllReduceOutput(group))
        elif shards[name] == "colwise_gather":
            mod.register_forward_hook(GatherOutput(group, world))
    report.warnings.extend(notes)
    report.peak_above_start = watch.stop()
    report.seconds["total"] = time.perf_counter() - t0
    io1 = io_read_bytes()
    report.parallel = {"rank": rank, "world": world, "bytes_read": report.bytes_read, "file_bytes": file_bytes,
                       "io_read_bytes": None if io0 is None or io1 is None else io1 - io0,
                       "peak_above_start": report.peak_above_start,
                       "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       "seconds": report.seconds["total"], "sharded": dict(shards)}
    model.load_report = report
    model.quantload_tp_plan = dict(shards)  # (transformers owns model.tp_plan)
    return attach_size_methods(model)
