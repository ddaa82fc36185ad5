"""inspect and plan: what a checkpoint holds and where it would go, without loading weights."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sources import open_source


@dataclass
class Inspection:
    path: str
    kind: str
    architecture: str
    tensors: int
    total_bytes: int
    quantization: dict | None
    config: dict = field(default_factory=dict)
    layers: list[tuple[str, str, tuple, int]] = field(default_factory=list)  # name, scheme, shape, bytes
    plan: object | None = None

    def to_table(self, max_rows: int = 60) -> str:
        lines = [f"path          {self.path}", f"format        {self.kind}", f"architecture  {self.architecture}",
                 f"tensors       {self.tensors}", f"bytes         {self.total_bytes:,} ({self.total_bytes / 2**20:.1f} MiB)"]
        if self.quantization:
            lines.append(f"quantization  {self.quantization}")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "vocab_size", "dtype"):
            if k in self.config:
                lines.append(f"{k:<14}{self.config[k]}")
        w = max([len(n) for n, *_ in self.layers[:max_rows]] + [5])
        lines.append("")
        lines.append(f"{'layer':<{w}}  {'scheme':<14}  {'shape':<18}  bytes")
        for name, scheme, shape, nbytes in self.layers[:max_rows]:
            lines.append(f"{name:<{w}}  {scheme:<14}  {str(list(shape)):<18}  {nbytes:,}")
        if len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more")
        counts: dict[str, int] = {}
        for _, scheme, _, _ in self.layers:
            counts[scheme] = counts.get(scheme, 0) + 1
        lines.append("schemes: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        if self.plan is not None:
            lines.append("")
            lines.append(self.plan.to_table())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def inspect_checkpoint(path: str, *, device_map=None, max_memory=None, quantize=None, offload_folder=None) -> Inspection:
    from .api import checkpoint_spec
    from .checkpoint_weights import index_by_module
    from .ggml_types import GGML_TYPES
    from .prepare import read_config_dir
    source = open_source(path)
    try:
        keys = source.keys()
        total = sum(source.info(k).nbytes for k in keys)
        if type(source).__name__ == "GGUFSource":
            f = source.fields
            arch = str(f.get("general.architecture", "?"))
            layers = [(k, "gguf-" + GGML_TYPES[source.info(k).ggml_type].name.lower(), source.info(k).shape,
                       source.info(k).nbytes) for k in keys]
            cfg = {k.split(".", 1)[1]: v for k, v in f.items()
                   if k.startswith(arch + ".") and isinstance(v, (int, float, str))}
            ins = Inspection(path, "gguf", arch, len(keys), total, None, cfg, layers)
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
            for k in keys:
                if k not in claimed:
                    i = source.info(k)
                    layers.append((k, str(i.dtype).removeprefix("torch."), i.shape, i.nbytes))
            layers.sort(key=lambda r: r[0])
            cfg = config.to_dict() if config is not None else {}
            arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0] if cfg else "?"
            ins = Inspection(path, "safetensors" if "Safetensors" in type(source).__name__ else "torch", arch,
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

    from .api import _tied_groups, checkpoint_spec
    from .config import parse_dtype, resolve_quantize
    from .placement import plan_placement, tensor_sizes
    from .prepare import build_skeleton, read_config_dir, replace_modules
    source = open_source(path)
    try:
        if type(source).__name__ == "GGUFSource":
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
            spec = checkpoint_spec(path, config) or resolve_quantize(quantize)
            cd = getattr(config, "dtype", None)
            dtype = dtype or (parse_dtype(cd) if isinstance(cd, (str, torch.dtype)) else torch.float32)
            model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code)
            from .moe_load import prepare_experts
            prepare_experts(model, source, spec, dtype)   # as load does: one Linear per expert
            by_module = index_by_module(source.keys())
            pre = checkpoint_spec(path, config) is not None

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
                          tied_groups=_tied_groups(model, sizes), offload_folder=offload_folder,
                          config=getattr(model, "config", None), headroom=headroom)
