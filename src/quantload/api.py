"""The public operations: load, load_tokenizer, read_state_dict, save, inspect, plan."""
from __future__ import annotations

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
from .load_setup import checkpoint_spec, engine_progress, placement_for
from .load_setup import config_file as config_path
from .prepare import build_skeleton, check_quantized_tensors, named_tensors, read_config_dir, replace_modules
from .report import LoadReport
from .runtime import kernels as _kernels
from .schemes.registry import spec_from_dict
from .sources import open_source
from .sources import safetensors as _safetensors  # noqa: F401  (open_source imports it on first use)

# checkpoint keys that are buffers transformers recomputes (not errors when present, not used)
_IGNORABLE = ("position_ids", "rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def parameters_to_meta(model: nn.Module) -> dict[str, str]:
    """Replace a user module's real parameters by meta ones of the same shape and dtype (the load fills
    them; the random init is let go now). Returns {alias name: first name} for parameters one module shares
    with another (a tied head), which `retie` shares again after the load."""
    first: dict[int, tuple[str, nn.Parameter]] = {}
    keep, aliases = [], {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in first:
                if first[id(p)][0] != full:
                    aliases[full] = first[id(p)][0]
                mod._parameters[pname] = first[id(p)][1]
                continue
            meta = p if p.is_meta else nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            keep.append(p)  # alive until the walk ends, so no id is reused while it runs
            first[id(p)] = first[id(meta)] = (full, meta)
            mod._parameters[pname] = meta
    return aliases


def retie(model: nn.Module, aliases: dict[str, str]) -> None:
    for alias, name in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._parameters[attr] = model.get_parameter(name)


def load(path, *, quantize=None, dtype=None, device_map="cpu", max_memory=None, offload_folder=None,
         trust_remote_code: bool = False, dequantize: bool = False, model: nn.Module | None = None,
         progress: bool = True, strict: bool = True, quantization_config=None, torch_dtype=None,
         low_cpu_mem_usage=None, revision: str | None = None, filename: str | None = None,
         headroom=None, exact: bool | None = None, quantize_lm_head: bool = False,
         tp_plan=None, device_mesh=None) -> nn.Module:
    """Load a checkpoint (directory, safetensors, .bin/.pt or .gguf) into a ready model.

    quantize: None (keep what the checkpoint has), a short name ("nf4", "fp4", "int8", "int4", ...),
    a transformers-style quantization_config dict (e.g. BitsAndBytesConfig(...).to_dict()) or a QuantSpec.
    dequantize: GGUF only, give a plain float model instead of keeping blocks quantized.
    model: your own nn.Module to load into (parameters on meta, or real ones, which are replaced) instead of
    building from config.json.
    strict: a checkpoint tensor the model does not consume is an error; strict=False drops them, listed
    in model.load_report.unexpected_keys.
    path may also be a Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; revision=, filename=
    for one GGUF of a repository). transformers' names are accepted: quantization_config= (= quantize=),
    torch_dtype= (= dtype=), dtype="auto" (the checkpoint's dtype); low_cpu_mem_usage is ignored (loads
    always stream). headroom: memory kept free for activations and the KV cache when placing ("auto" maps).
    exact: True computes every quantized Linear as dequantize-then-matmul (the defining tool's numerics, bit
    for bit); False/None (default: quantload.set_exact, QUANTLOAD_EXACT) takes the packed kernels
    (docs/kernels.md). model.load_report.kernels says which kernel each weight got.
    quantize_lm_head: when quantizing a float checkpoint, quantize an untied lm_head too (left dense by
    default, as transformers does; a head tied to the embeddings stays as it is).
    tp_plan: "auto" (the architecture's base_model_tp_plan) or {module pattern: "colwise"|"rowwise"|...}:
    under torch.distributed, each rank loads only its shard of the split Linears (docs/parallel.md);
    device_mesh: a 1-d DeviceMesh whose group to split over (default: the whole world).
    """
    if tp_plan is not None:  # tensor-parallel: each torch.distributed rank loads its shard (docs/parallel.md)
        from .parallel.load import load_tp
        quantize, dtype, _ = transformers_args(quantize, dtype, quantization_config, torch_dtype, None)
        return load_tp(resolve_path(path, revision=revision, filename=filename), tp_plan=tp_plan,
                       device_mesh=device_mesh, dtype=dtype, strict=strict, exact=exact, quantize=quantize,
                       model=model, device_map=device_map,
                       trust_remote_code=trust_remote_code, dequantize=dequantize)
    from .model_size import attach_size_methods
    from .report import LoadProgress, RssWatch
    watch = RssWatch()
    bar = LoadProgress(progress)
    quantize, dtype, notes = transformers_args(quantize, dtype, quantization_config, torch_dtype, low_cpu_mem_usage)
    path = resolve_path(path, revision=revision, filename=filename)
    report = LoadReport(path=path, rss_before=watch.start_rss)
    report.warnings.extend(notes)
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    bar.stage("opening the checkpoint")
    source = open_source(path)
    report.source_kind = source.kind
    kernels_before = _kernels.begin_load(exact)
    try:
        if source.kind == "gguf":
            from .gguf_load import load_gguf
            if quantize is not None and not dequantize:
                _refuse_requantize(source, quantize)
            bar.stage("building the model")
            model = load_gguf(source, report=report, t0=t0, quantize=quantize, dtype=dtype, device_map=device_map,
                              max_memory=max_memory, offload_folder=offload_folder, dequantize=dequantize,
                              progress=bar.engine_progress(), strict=strict)
        else:
            model = _load_checkpoint(source, path, report, t0, quantize=quantize, dtype=dtype,
                                     device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                                     trust_remote_code=trust_remote_code, model=model, progress=bar,
                                     headroom=headroom, strict=strict,
                                     quantize_lm_head=quantize_lm_head)
    finally:
        _kernels.end_load(kernels_before)
        source.close()
        bar.close()
    report.peak_above_start = watch.stop()
    return attach_size_methods(model)


def transformers_args(quantize, dtype, quantization_config, torch_dtype, low_cpu_mem_usage):
    """(quantize, dtype, notes) from quantload's names and transformers' (quantization_config=, torch_dtype=,
    low_cpu_mem_usage=), refusing two different values for one thing."""
    notes = []
    if quantization_config is not None:
        if quantize is not None and quantize is not quantization_config:
            raise ConfigError("quantize= and quantization_config= name the same thing; pass one")
        quantize = quantization_config
    if getattr(quantize, "is_quantload_config", False):
        quantize = quantize.quantize  # transformers' QuantloadConfig: what it asks for
    if torch_dtype is not None:
        if dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
            raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one (torch_dtype "
                              "is transformers' older name for dtype)")
        dtype = torch_dtype
    if low_cpu_mem_usage is not None:
        notes.append(f"low_cpu_mem_usage={low_cpu_mem_usage!r} ignored: quantload always streams weights "
                     "(the full-precision model never exists in memory)")
    return quantize, dtype, notes


def resolve_path(path, *, revision=None, filename=None) -> str:
    """A local path for `path`, resolving a Hub id through huggingface_hub (sources/hub.py)."""
    from .sources.hub import resolve
    return resolve(os.fspath(path), revision=revision, filename=filename)


def _refuse_requantize(source, quantize) -> None:
    """quantize= on a GGUF whose tensors are already block-quantized would quantize their dequantized values
    again and keep the token table in float (SmolLM2 Q4_1: 92 MiB of weights become 160 MiB): refused."""
    from .ggml_types import GGML_TYPES
    types = {}
    for k in source.keys():
        t = source.info(k).ggml_type
        if GGML_TYPES[t].block_size > 1:
            types[GGML_TYPES[t].name] = types.get(GGML_TYPES[t].name, 0) + 1
    if not types:
        return
    found = ", ".join(f"{n} x{c}" for n, c in sorted(types.items()))
    raise ConfigError(f"this GGUF file is already quantized ({found}); quantize={quantize!r} would re-quantize "
                      "its weights and grow the model. Load it as it is (quantize=None), or pass dequantize=True "
                      "as well to re-quantize from the blocks' exact dequantization (the token table then "
                      "stays in float)", file=source.path)


def _load_checkpoint(source, path, report, t0, *, quantize, dtype, device_map, max_memory, offload_folder,
                     trust_remote_code, model, progress, headroom=None, strict=True, quantize_lm_head=False):
    progress.stage("reading the config")
    config = read_config_dir(path) if model is None else getattr(model, "config", None)
    config_file = config_path(path)
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
    aliases = {}
    progress.stage("building the model")
    if model is None:
        if config is None:
            raise ConfigError("no config.json beside the weights: pass model= (your nn.Module) or a "
                              "directory with config.json", file=path)
        model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code, source=source,
                               file=config_file)
    else:
        aliases = parameters_to_meta(model)  # real parameters are replaced by the checkpoint's, not kept
    from .moe_load import prepare_experts
    experts = prepare_experts(model, source, spec, dtype)  # MoE: fused experts -> one Linear per expert
    if user_spec is not None and ckpt_spec is None:
        from .scheme_fit import announce, fit_spec
        user_spec, note = fit_spec(user_spec, model, quantize)
        spec = user_spec
        announce(note, report)
    skip_before = list(spec.skip_modules) if spec is not None else []
    modules = list(model.named_modules())
    names = [n for n, _ in named_tensors(modules, "_parameters")] + [n for n, _ in named_tensors(modules, "_buffers")]
    weights = (CheckpointWeights if experts is None else experts.weights)(
        source, names, getattr(model, "base_model_prefix", None))

    if quantize_lm_head and user_spec is not None and ckpt_spec is None:
        spec = _with_quantized_head(spec, model, report)

    def choose(name, mod):
        scheme = spec.scheme_for(name, mod) if spec is not None else None
        if scheme is None or (isinstance(mod, nn.Embedding) and not getattr(scheme, "quantizes_embeddings", False)):
            return None  # embeddings stay dense unless the format stores them quantized (gemma)
        if ckpt_spec is not None and not scheme.present(weights.suffixes(name)):
            return None  # a dense layer inside a quantized checkpoint (lm_head, skipped modules)
        return scheme

    replace_modules(model, choose, dtype)
    if user_spec is not None and ckpt_spec is None:
        from .scheme_fit import announce, skipped_note
        announce(skipped_note(spec, skip_before, quantize), report)
    device_of, plan, offloader = placement_for(model, device_map, max_memory, offload_folder, headroom=headroom)
    report.seconds["prepare"] = time.perf_counter() - t1

    load_weights(model, weights, dtype=dtype, device_of=device_of, report=report,
                 progress=progress.engine_progress(), offloader=offloader,
                 quantizing=user_spec is not None and ckpt_spec is None)
    report.tensors_read, report.bytes_read = weights.tensors_read, weights.bytes_read
    t2 = time.perf_counter()
    progress.stage("checking the model")
    retie(model, aliases)
    # a format may store tensors its own tools leave unread (gemma / ModelOpt KV-cache scales)
    ignorable = _IGNORABLE + tuple(getattr(spec, "ignorable_keys", ()))
    finalize(model, spec=spec, report=report, weights=weights, file=path, ignorable_unexpected=ignorable,
             offloader=offloader, strict=strict)
    if plan is not None:
        model.device_plan = plan
    report.seconds["finalize"] = time.perf_counter() - t2
    return model


def _with_quantized_head(spec, model, report):
    """A copy of `spec` that does not skip lm_head, unless the head is tied to the embeddings (then it
    stays the embedding table, dense, and the report says so)."""
    import copy
    if any(t.startswith("lm_head") for t, _ in tied_pairs(model)):
        report.warnings.append("quantize_lm_head: lm_head is tied to the input embeddings; left as it is")
        return spec
    spec = copy.copy(spec)
    spec.skip_modules = [m for m in spec.skip_modules if m != "lm_head"]
    return spec


def read_state_dict(path, *, quantization_config=None) -> dict:
    """The decoded parameters of a checkpoint without a model: QTensor for each quantized parameter
    (keyed by its parameter name, e.g. "layer.weight"), plain tensors for the rest."""
    path = os.fspath(path)
    source = open_source(path)
    if source.kind == "gguf":
        from .gguf_load import gguf_state_dict
        return gguf_state_dict(source)
    if quantization_config is not None:
        qc = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else quantization_config
        spec = spec_from_dict(dict(qc), file=path)
    else:
        spec = checkpoint_spec(path, read_config_dir(path))
    keys = source.keys()
    self_described = spec is None
    if spec is None:
        spec = self_described_spec(keys, path)  # tensors that describe their own format (bnb quant_state)
    out, used = {}, set()
    if spec is not None:
        by_module = index_by_module(keys)
        for prefix in sorted(by_module, key=len, reverse=True):
            if not prefix and not self_described:
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
    if hasattr(spec, "decode_unclaimed"):   # pieces no Linear owns (gpt-oss stacked MXFP4 experts)
        out = spec.decode_unclaimed(out, file=path)
    return out


#: key endings of quantized pieces whose format only a config can tell (bits, group size, symmetry)
_NEEDS_A_CONFIG = {"qweight": "GPTQ/AWQ", "qzeros": "GPTQ/AWQ", "weight_packed": "compressed-tensors",
                   "weight_scale": "compressed-tensors", "W_q": "HQQ", "weight.absmax": "bitsandbytes 4-bit",
                   "weight.quant_map": "bitsandbytes 4-bit"}


def self_described_spec(keys, file) -> QuantSpec | None:
    """The spec a file's own tensors describe, for a file without config: bitsandbytes 4-bit pieces carry
    their quant_state JSON (`weight.quant_state.bitsandbytes__nf4`, which each layer's decode follows),
    LLM.int8 weights their `SCB`. Quantized pieces that do not say their format raise."""
    from .schemes.bnb4 import QS_TYPE_PREFIX
    qs_types = sorted({k.rpartition(QS_TYPE_PREFIX)[2] for k in keys if QS_TYPE_PREFIX in k})
    unknown = [k for k in keys if QS_TYPE_PREFIX in k and k.rpartition(QS_TYPE_PREFIX)[2] not in ("nf4", "fp4")]
    if unknown:
        from .errors import QuantStateError
        raise QuantStateError(f"unknown bitsandbytes quant_state type {unknown[0].rpartition(QS_TYPE_PREFIX)[2]!r}; "
                              "expected nf4 or fp4", file=file, key=unknown[0])
    if qs_types:
        spec = spec_from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True,
                               "bnb_4bit_quant_type": qs_types[0] if qs_types[0] in ("nf4", "fp4") else "nf4"},
                              file=file)
    elif any(k == "SCB" or k.endswith(".SCB") for k in keys):
        spec = spec_from_dict({"quant_method": "bitsandbytes", "load_in_8bit": True}, file=file)
    else:
        for k in keys:
            for end, fmt in _NEEDS_A_CONFIG.items():
                if k == end or k.endswith("." + end):
                    raise ConfigError(f"this file holds {fmt} pieces ({k!r}) but no config says their format "
                                      "(no config.json / quantize_config.json beside it, no quant_state in it); "
                                      "pass quantization_config= to read_state_dict", file=file, key=k)
        return None
    spec.skip_modules = []  # every module that carries pieces is quantized, lm_head included
    return spec


def load_tokenizer(path, *, revision=None, filename=None, **kwargs):
    """The tokenizer for any path `load` accepts (a checkpoint directory, a file in it, a .gguf, a Hub id)."""
    path = resolve_path(path, revision=revision, filename=filename)
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


def save(model: nn.Module, out, *, max_shard_size=None, tokenizer="auto", progress: bool = True,
         **kwargs) -> list[str]:
    """Write `model` in the layout its scheme's ecosystem reads: a directory of safetensors shards +
    config.json (bitsandbytes, compressed-tensors, ... keys exactly as those tools write them), or a
    GGUF file when `out` ends with .gguf. The whole checkpoint is switched in at once: a crash leaves the old
    checkpoint or the new one, never a mix (writers/staging.py). Failures raise WriteError naming the file.
    tokenizer: "auto" (default) writes the tokenizer of the checkpoint the model was loaded from, when it has
    one (so `quantload generate out` works); None writes none; or a tokenizer object."""
    out = os.fspath(out)
    if isinstance(tokenizer, str) and tokenizer == "auto":
        tokenizer = source_tokenizer(model, gguf_out=out.endswith(".gguf"))
    if not out.endswith(".gguf"):
        refuse_unsaveable(model, out)
    if out.endswith(".gguf"):
        from .writers.gguf_writer import save_gguf
        # a bar per tensor, shown for writes over a second (quantizing to GGUF takes 14-61 s)
        return save_gguf(model, out, tokenizer=tokenizer, progress=engine_progress("writing", progress), **kwargs)
    from .placement import parse_memory
    from .writers.safetensors_writer import DEFAULT_SHARD, save_checkpoint
    limit = DEFAULT_SHARD if max_shard_size is None else parse_memory(max_shard_size)
    return save_checkpoint(model, out, max_shard_size=limit, tokenizer=tokenizer)


def source_tokenizer(model: nn.Module, *, gguf_out: bool = False):
    """The tokenizer of the checkpoint `model` came from, or None when it has none (or, for a GGUF written
    from a GGUF, None: the writer copies the source file's tokenizer keys itself)."""
    report = getattr(model, "load_report", None)
    src = report.path if report is not None and report.path else None
    if src is None:
        cfg = getattr(model, "config", None)
        src = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    if not src or not os.path.exists(src):
        return None
    if gguf_out and getattr(model, "gguf_fields", None) is not None:
        return None
    try:
        return load_tokenizer(src)
    except QuantloadError:
        return None


def refuse_unsaveable(model: nn.Module, out: str) -> None:
    """A folder of safetensors cannot hold GGUF blocks for any reader (quantload, transformers, vLLM):
    refuse before writing, naming the layouts that can hold the model."""
    from .runtime.modules import qtensors_of
    from .schemes.gguf import GGUFScheme
    kinds = {}
    for _, mod in qtensors_of(model):
        if isinstance(mod.scheme, GGUFScheme):
            kinds[mod.scheme.name] = kinds.get(mod.scheme.name, 0) + 1
    if kinds:
        found = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
        raise ConfigError(f"this model's weights are GGUF blocks ({found}), which a safetensors folder cannot "
                          "hold in any layout quantload or transformers read. Save it as GGUF "
                          "(quantload.save(model, 'out.gguf')), or load the file with dequantize=True (float "
                          "weights; add quantize='nf4', 'int8', 'int4', ... to re-quantize them) and save that "
                          "to a folder", file=out)


def inspect(path, *, revision=None, filename=None, **kwargs):
    """What a checkpoint holds, without loading it: architecture, tensors, scheme per layer, bytes."""
    from .inspection import inspect_checkpoint
    return inspect_checkpoint(resolve_path(path, revision=revision, filename=filename), **kwargs)


def plan(path, *, quantize=None, dtype=None, device_map="auto", max_memory=None, offload_folder=None,
         trust_remote_code: bool = False, quantization_config=None, torch_dtype=None, low_cpu_mem_usage=None,
         revision=None, filename=None, headroom=None):
    """The device placement `load` would use, computed from the true quantized sizes, loading nothing.
    Takes load's arguments (transformers' names included)."""
    from .inspection import plan_checkpoint
    quantize, dtype, _ = transformers_args(quantize, dtype, quantization_config, torch_dtype, low_cpu_mem_usage)
    return plan_checkpoint(resolve_path(path, revision=revision, filename=filename), quantize=quantize,
                           dtype=parse_dtype(dtype), device_map=device_map, max_memory=max_memory,
                           offload_folder=offload_folder, trust_remote_code=trust_remote_code, headroom=headroom)
