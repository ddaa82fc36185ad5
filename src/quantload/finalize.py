"""Finalize: tie, validate, eval, attach the quantization config and the load report."""
from __future__ import annotations

from torch import nn

from .engine import raise_if_incomplete, raise_if_unconsumed
from .errors import MissingTensorError
from .prepare import named_tensors
from .report import LoadReport, cuda_peaks, peak_rss_bytes
from .runtime.kernels import choice_of, mark_output_head
from .runtime.modules import QEmbedding, QLinear, _QModule


def tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(target, source) parameter names tied by the model's config: lm_head.weight <- embed_tokens.weight."""
    pairs = []
    keys = getattr(model, "_tied_weights_keys", None)
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    tie = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    if not tie:
        return pairs
    if isinstance(keys, dict):
        pairs.extend(keys.items())
    else:
        out, inp = _emb_names(model)
        if out and inp:
            pairs.append((out + ".weight", inp + ".weight"))
    return pairs


def _emb_names(model):
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    names = {id(m): n for n, m in model.named_modules()}
    return names.get(id(out)), names.get(id(inp))


def tie_weights(model: nn.Module, report: LoadReport) -> None:
    from .prepare import set_submodule
    for target, source in tied_pairs(model):
        t_mod_name, _, t_attr = target.rpartition(".")
        s_mod_name, _, s_attr = source.rpartition(".")
        try:
            t_mod = model.get_submodule(t_mod_name)
            s_mod = model.get_submodule(s_mod_name)
        except AttributeError:
            continue
        if isinstance(s_mod, QEmbedding):
            # a quantized tied table: the output projection computes with the very same blocks
            if isinstance(t_mod, nn.Linear) and t_mod.weight.is_meta or isinstance(t_mod, QLinear):
                q = QLinear(s_mod.embedding_dim, s_mod.num_embeddings, getattr(t_mod, "bias", None) is not None,
                            s_mod.scheme, dtype=s_mod._logical_dtype)
                q.set_qweight(s_mod.qweight)
                if q.bias is not None and not t_mod.bias.is_meta:
                    q.bias = t_mod.bias
                set_submodule(model, t_mod_name, q)
        elif isinstance(t_mod, nn.Linear) and t_mod.weight.is_meta:
            t_mod.weight = getattr(s_mod, s_attr)
        elif isinstance(t_mod, nn.Linear) and getattr(t_mod, t_attr) is not getattr(s_mod, s_attr):
            continue  # the checkpoint stores its own head: keep it (transformers would too)
        if target in report.missing_keys:
            report.missing_keys.remove(target)


def finalize(model: nn.Module, *, spec, report: LoadReport, weights, file: str,
             ignorable_unexpected=(), offloader=None, strict: bool = True) -> nn.Module:
    """`strict`: checkpoint tensors the model did not consume (other than `ignorable_unexpected`, buffers
    transformers recomputes) raise UnexpectedTensorError; with strict=False they are dropped and listed
    in report.unexpected_keys (and named in one warning)."""
    tie_weights(model, report)
    raise_if_incomplete(report, file)
    unexpected = weights.unconsumed() if weights is not None else []
    report.unexpected_keys = [k for k in unexpected if not k.endswith(tuple(ignorable_unexpected))]
    if strict:
        raise_if_unconsumed(report, file)
    elif report.unexpected_keys:
        report.warnings.append(f"strict=False: {len(report.unexpected_keys)} checkpoint tensor(s) the model does "
                               f"not use were dropped: {', '.join(report.unexpected_keys[:8])}"
                               + (" ..." if len(report.unexpected_keys) > 8 else ""))
    if offloader is not None:
        offloader.share_tied(model)  # before the checks: a tied head may hold an offloaded placeholder
    offloaded = offloader.offloaded_names() if offloader is not None else set()
    # one walk of the module tree serves every check below (each named_parameters / qtensors_of / buffers
    # walk costs ~1 ms on a 30-layer model); the walk is redone only if the offloader changes the tree
    modules = list(model.named_modules())
    for name, p in named_tensors(modules, "_parameters"):
        if p.is_meta and name.rpartition(".")[0] not in offloaded:
            raise MissingTensorError("parameter still on the meta device after loading", file=file, key=name)
    qmods = [(name, mod) for name, mod in modules if isinstance(mod, _QModule)]
    for name, mod in qmods:
        if name in offloaded:
            continue
        if mod.qweight is None or mod.qweight.is_meta:
            raise MissingTensorError("quantized weight was never loaded", file=file, key=name + ".weight")
    if offloader is not None:
        offloader.attach(model)
        model.offloader = offloader
        modules = list(model.named_modules())
        qmods = [(name, mod) for name, mod in modules if isinstance(mod, _QModule)]
    mark_output_head(model)
    report.kernels = {name: choice_of(mod.qweight, mod) for name, mod in qmods if mod.qweight is not None}
    model.eval()
    params = [p for _, p in named_tensors(modules, "_parameters")]
    for p in params:
        p.requires_grad_(False)
    if spec is not None and hasattr(model, "config"):
        model.config.quantization_config = spec.to_dict()
    report.companion_keys = weights.consumed_companions() if weights is not None else 0
    seen, devices, counts = set(), {}, {}
    for name, mod in qmods:
        counts[mod.scheme.name] = counts.get(mod.scheme.name, 0) + 1
        if id(mod.qweight.data) in seen or mod.qweight.is_meta:
            continue
        seen.add(id(mod.qweight.data))
        d = str(mod.qweight.device)
        devices[d] = devices.get(d, 0) + mod.qweight.nbytes
    for t in params + [b for _, b in named_tensors(modules, "_buffers")]:
        if id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        d = str(t.device)
        devices[d] = devices.get(d, 0) + t.numel() * t.element_size()
    if offloader is not None:
        for d, b in offloader.bytes_by_device().items():
            devices[d] = devices.get(d, 0) + b
    report.model_bytes = sum(devices.values())
    report.devices = devices
    report.quantized_modules = counts
    report.peak_rss = peak_rss_bytes()
    report.peak_cuda = cuda_peaks()
    model.load_report = report
    return model

