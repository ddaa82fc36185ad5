"""inspect and plan: what a checkpoint holds and where it would go, without loading weights."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .load_setup import checkpoint_spec, config_file, tied_groups
from .sources import open_source


def layer_order(name: str):
    """Sort key that reads numbers as numbers: blk.2 before blk.10, layers.9 before layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _plain(v):
    """GGUF array values (numpy arrays, string arrays) as plain lists."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if not isinstance(v, (str, bytes, dict)) and hasattr(v, "__len__") and hasattr(v, "__getitem__"):
        return [v[i] for i in range(len(v))]
    return v


def _short(v, limit: int = 80) -> str:
    """A metadata value for a table: long arrays (GGUF vocabularies) summarized, long strings cut."""
    v = _plain(v)
    if isinstance(v, (list, tuple)):
        if len(v) > 8:
            return f"[{len(v)} values: {', '.join(map(repr, v[:3]))}, ...]"
        v = list(v)
    text = str(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Inspection:
    path: str
    kind: str
    architecture: str
    tensors: int
    total_bytes: int
    quantization: dict | None
    config: dict = field(default_factory=dict)
    # name, scheme, logical shape, bytes (the shape of the parameter the layer computes with: an NF4 [576, 576]
    # weight, not its packed [165888, 1] bytes)
    layers: list[tuple[str, str, tuple, int]] = field(default_factory=list)
    plan: object | None = None
    metadata: dict = field(default_factory=dict)                 # GGUF key-values (all of them)

    KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "dtype")

    def sorted_layers(self, by: str = "name") -> list:
        if by == "bytes":
            return sorted(self.layers, key=lambda r: (-r[3], layer_order(r[0])))
        if by == "scheme":
            return sorted(self.layers, key=lambda r: (r[1], layer_order(r[0])))
        return sorted(self.layers, key=lambda r: layer_order(r[0]))

    def to_table(self, max_rows: int = 60, sort: str = "name", metadata: bool = True) -> str:
        head = [("path", self.path), ("format", self.kind), ("architecture", self.architecture),
                ("tensors", self.tensors), ("bytes", f"{self.total_bytes:,} ({self.total_bytes / 2**20:.1f} MiB)")]
        if self.quantization:
            head.append(("quantization", json.dumps(self.quantization)))
        head += [(k, self.config[k]) for k in self.KEYS if k in self.config]
        w = max(len(k) for k, _ in head) + 2
        lines = [f"{k + ':':<{w}}{v}" for k, v in head]
        if metadata and self.metadata:
            lines.append("")
            lines.append(f"metadata ({len(self.metadata)} keys):")
            mw = max(len(k) for k in self.metadata) + 2
            lines += [f"  {k + ':':<{mw}}{_short(v)}" for k, v in self.metadata.items()]
        rows = self.sorted_layers(sort)
        shown = rows[:max_rows]
        w = max([len(n) for n, *_ in shown] + [5])
        lines.append("")
        lines.append(f"{'layer':<{w}}  {'scheme':<24}  {'shape':<18}  {'bytes':>14}")
        for name, scheme, shape, nbytes in shown:
            lines.append(f"{name:<{w}}  {scheme:<24}  {str(list(shape)):<18}  {nbytes:>14,}")
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more (--rows to show more)")
        counts: dict[str, int] = {}
        for _, scheme, _, _ in self.layers:
            counts[scheme] = counts.get(scheme, 0) + 1
        lines.append("schemes: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        if self.plan is not None:
            lines.append("")
            lines.append(self.plan.to_table())
        return "\n".join(lines)

    def to_dict(self, sort: str = "name") -> dict:
        """Everything, JSON-ready (`quantload inspect --json`)."""
        return {"path": self.path, "format": self.kind, "architecture": self.architecture, "tensors": self.tensors,
                "bytes": self.total_bytes, "quantization": self.quantization,
                "config": {k: v for k, v in self.config.items() if _jsonable(v)},
                "metadata": {k: _plain(v) for k, v in self.metadata.items() if _jsonable(_plain(v))},
                "layers": [{"name": n, "scheme": sc, "shape": list(sh), "bytes": b}
                           for n, sc, sh, b in self.sorted_layers(sort)],
                "plan": self.plan.to_dict() if self.plan is not None and hasattr(self.plan, "to_dict") else None}

    def __str__(self) -> str:
        return self.to_table()


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _logical_shapes(config, prefixes) -> dict[str, tuple]:
    """{module prefix: (out_features, in_features)} from the model skeleton (meta: nothing allocated), for
    quantized layers whose stored pieces are packed. Empty when no skeleton can be built."""
    if config is None:
        return {}
    try:
        import torch

        from .prepare import build_skeleton
        model = build_skeleton(config, torch.float32)
    except Exception:  # an architecture transformers cannot build: the stored shapes are shown instead
        return {}
    out = {}
    mods = dict(model.named_modules())
    base = getattr(model, "base_model_prefix", "") or ""
    for p in prefixes:
        mod = mods.get(p) or mods.get(p.removeprefix(base + ".")) or mods.get(f"{base}.{p}")
        w = getattr(mod, "weight", None)
        if w is not None and hasattr(w, "shape"):
            out[p] = tuple(w.shape)
    return out


def inspect_checkpoint(path: str, *, device_map=None, max_memory=None, quantize=None, offload_folder=None) -> Inspection:
    from .checkpoint_weights import index_by_module
    from .ggml_types import GGML_TYPES
    from .prepare import read_config_dir
    source = open_source(path)
    try:
        keys = source.keys()
        total = sum(source.info(k).nbytes for k in keys)
        if source.kind == "gguf":
            f = source.fields
            arch = str(f.get("general.architecture", "?"))
            layers = [(k, "gguf-" + GGML_TYPES[source.info(k).ggml_type].name.lower(), source.info(k).shape,
                       source.info(k).nbytes) for k in keys]
            cfg = {k.split(".", 1)[1]: v for k, v in f.items()
                   if k.startswith(arch + ".") and isinstance(v, (int, float, str))}
            ins = Inspection(path, "gguf", arch, len(keys), total, None, cfg, layers, metadata=dict(f))
        else:
            config = read_config_dir(path)
            spec = checkpoint_spec(path, config)
            by_module = index_by_module(keys)
            layers, claimed = [], set()
            if spec is not None:
                for prefix in sorted(by_module):
                    if not prefix:
                        continue
                    scheme = spec.scheme_for(prefix, None)
                    if scheme is None or not scheme.present(by_module[prefix]):
                        continue
                    full = [f"{prefix}.{s}" for s in (*scheme.required_keys(), *scheme.optional_keys())
                            if s in by_module[prefix]]
                    if any(k in claimed for k in full):
                        continue
                    claimed.update(full)
                    layers.append((prefix, scheme.name, source.info(full[0]).shape,
                                   sum(source.info(k).nbytes for k in full)))
                shapes = _logical_shapes(config, [r[0] for r in layers])
                layers = [(n, sc, shapes.get(n, sh), b) for n, sc, sh, b in layers]
            for k in keys:
                if k not in claimed:
                    i = source.info(k)
                    layers.append((k, str(i.dtype).removeprefix("torch."), i.shape, i.nbytes))
            layers.sort(key=lambda r: layer_order(r[0]))
            cfg = config.to_dict() if config is not None else {}
            arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0] if cfg else "?"
            ins = Inspection(path, source.kind, arch,
                             len(keys), total, spec.to_dict() if spec is not None else None, cfg, layers)
    finally:
        source.close()
    if device_map is not None:
        ins.plan = plan_checkpoint(path, quantize=quantize, dtype=None, device_map=device_map,
                                   max_memory=max_memory, offload_folder=offload_folder)
    return ins


def plan_checkpoint(path: str, *, quantize, dtype, device_map, max_memory, offload_folder, trust_remote_code=False,
                    headroom=None):
    """Prepare the skeleton exactly as load does (meta device, quantized modules), then plan placement."""
    import torch

    from .config import parse_dtype, resolve_quantize
    from .placement import plan_placement, tensor_sizes
    from .prepare import build_skeleton, read_config_dir, replace_modules
    source = open_source(path)
    try:
        if source.kind == "gguf":
            from .gguf_load import model_map_of
            from .schemes.gguf import gguf_scheme
            mm = model_map_of(source)
            model = build_skeleton(mm.config, dtype or torch.float32)
            spec = resolve_quantize(quantize)
            from .architectures.moe import ExpertSlice
            if any(isinstance(ref.transform, ExpertSlice) for ref in mm.params.values()):
                from .moe_load import replace_experts
                replace_experts(model, dtype or torch.float32)   # as load does: one Linear per expert

            def choose(name, mod):
                if spec is not None:
                    return spec.scheme_for(name, mod)
                ref = mm.params.get(f"{name}.weight")
                if ref is None:
                    return None
                t = source.info(ref.gguf_name).ggml_type
                return None if t in (0, 1, 30) else gguf_scheme(t)
            replace_modules(model, choose, dtype or torch.float32)
        else:
            from .checkpoint_weights import index_by_module
            config = read_config_dir(path)
            ckpt_spec = checkpoint_spec(path, config)
            spec = ckpt_spec or resolve_quantize(quantize)
            cd = getattr(config, "dtype", None)
            dtype = dtype or (parse_dtype(cd) if isinstance(cd, (str, torch.dtype)) else torch.float32)
            # the config is checked against the checkpoint first
            model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code, source=source,
                                   file=config_file(path))
            from .moe_load import prepare_experts
            prepare_experts(model, source, spec, dtype)   # as load does: one Linear per expert
            by_module = index_by_module(source.keys())
            pre = ckpt_spec is not None
            if spec is not None and not pre:
                from .scheme_fit import fit_spec
                spec, _ = fit_spec(spec, model, quantize)  # the group size load would pick ("int4")

            def choose(name, mod):
                s = spec.scheme_for(name, mod) if spec is not None else None
                if s is None or isinstance(mod, torch.nn.Embedding):
                    return None
                return s if not pre or s.present(by_module.get(name, set())) else None
            replace_modules(model, choose, dtype)
    finally:
        source.close()
    sizes = tensor_sizes(model)
    return plan_placement(model, sizes, device_map, max_memory,
                          no_split_module_classes=getattr(model, "_no_split_modules", None),
                          tied_groups=tied_groups(model, sizes), offload_folder=offload_folder,
                          config=getattr(model, "config", None), headroom=headroom)
