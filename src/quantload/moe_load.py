"""Loading mixture-of-experts models with their experts per expert (runtime/experts.py's QExperts).

transformers 5 builds each MoE block's experts as one module of fused 3-D parameters. Here that module
is swapped for a QExperts whose children `experts.N.{gate_proj,up_proj,down_proj}` are Linears, before
the quantized modules are chosen, so every expert projection is quantized, decoded or read on its own:

* per-expert checkpoints (GPTQModel, llm-compressor / compressed-tensors, transformers 4 + bitsandbytes,
  every Qwen-MoE release): `experts.N.gate_proj.*` are read as they are; Mixtral's original names
  (`block_sparse_moe.experts.N.w1/w3/w2`, `block_sparse_moe.gate`) are renamed on the way;
* fused checkpoints (transformers 5 saves, gpt-oss): each expert's weight is a slice of the fused tensor
  (gate/up halves, or gpt-oss's interleaved and transposed layout), read when that expert is loaded,
  then quantized when the user asked for it (`quantize="nf4"`), so no fused float copy is ever made;
* GGUF files map `ffn_*_exps` to the same children (architectures/moe.py), expert N being a run of
  the blocks' rows.

A fused checkpoint loaded without quantization keeps transformers' own fused module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .checkpoint_weights import CheckpointWeights
from .errors import ShapeMismatchError
from .prepare import set_submodule
from .runtime.experts import GATE_GPT_OSS, GATE_SILU, QExperts
from .runtime.modules import QLinear
from .schemes.base import QTensor

#: transformers experts classes whose forward QExperts reproduces (each one tested in tests/test_moe.py)
SUPPORTED_EXPERTS = ("Qwen2MoeExperts", "Qwen3MoeExperts", "MixtralExperts", "GptOssExperts", "MiniMaxM2Experts")
ROLES = ("gate_proj", "up_proj", "down_proj")
_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")

# Mixtral's (and MiniMax-M2's) original checkpoint names (transformers' conversion_mapping does the same)
_MIXTRAL_RENAMES = [
    (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w1"),
    (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w3"),
    (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w2"),
    (re.compile(r"\.mlp\.gate(?=\.|$)"), ".block_sparse_moe.gate"),
    (re.compile(r"\.mlp\.e_score_correction_bias$"), ".block_sparse_moe.e_score_correction_bias"),
]


@dataclass(frozen=True)
class FusedLayout:
    """How transformers' fused expert parameters lay out one expert."""
    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool      # gpt-oss: gate_up_proj [E, H, 2I], down_proj [E, I, H] (x @ W)
    interleaved: bool     # gpt-oss: gate and up alternate along the 2I outputs
    bias: bool            # gpt-oss: gate_up_proj_bias [E, 2I], down_proj_bias [E, H]

    def expert_slice(self, role: str, kind: str, t: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's `role` weight ([out, in]) or bias ([out]) from the fused tensor `t`."""
        part = t[e]
        if kind == "weight" and self.transposed:
            part = part.transpose(0, 1)
        if role == "gate_proj":
            part = part[0::2] if self.interleaved else part[:self.intermediate]
        elif role == "up_proj":
            part = part[1::2] if self.interleaved else part[self.intermediate:]
        return part.contiguous()

    def fused_name(self, prefix: str, role: str, kind: str) -> str:
        base = "gate_up_proj" if role != "down_proj" else "down_proj"
        return f"{prefix}.{base}" + ("_bias" if kind == "bias" else "")


def fused_layout(mod: nn.Module) -> FusedLayout | None:
    """The layout of a transformers experts module we can replace, else None."""
    if type(mod).__name__ not in SUPPORTED_EXPERTS:
        return None
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3:
        return None
    transposed = bool(getattr(mod, "is_transposed", False))
    e, h, two_i = (gu.shape[0], gu.shape[1], gu.shape[2]) if transposed else (gu.shape[0], gu.shape[2], gu.shape[1])
    return FusedLayout(num_experts=int(e), hidden=int(h), intermediate=int(two_i) // 2, transposed=transposed,
                       interleaved=not bool(getattr(mod, "is_concatenated", True)),
                       bias=isinstance(getattr(mod, "gate_up_proj_bias", None), torch.Tensor))


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module, FusedLayout]]:
    out = []
    for name, mod in model.named_modules():
        layout = fused_layout(mod)
        if layout is not None:
            out.append((name, mod, layout))
    return out


def _is_moe(config) -> bool:
    """Whether a transformers config declares experts (a model without a config is walked anyway)."""
    if config is None:
        return True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(c, a, None) for c in (config, text)
               for a in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))


def _refuse_unsupported_experts(model: nn.Module) -> None:
    """A fused experts module we do not replace cannot read per-expert checkpoints: say so, by its
    class, rather than report its fused parameters missing. (A fused float checkpoint of such a model
    still loads, its experts kept dense.)"""
    for name, mod in model.named_modules():
        gu = getattr(mod, "gate_up_proj", None)
        if (isinstance(gu, torch.Tensor) and gu.dim() == 3 and type(mod).__name__ not in SUPPORTED_EXPERTS):
            from .errors import UnsupportedError
            raise UnsupportedError(f"{type(mod).__name__} (at {name}) stored per expert is not supported yet; "
                                   f"supported experts: {', '.join(SUPPORTED_EXPERTS)}", key=name)


def quantized_experts(mod: nn.Module, layout: FusedLayout, dtype: torch.dtype) -> QExperts:
    """A QExperts (dense meta Linears, swapped for QLinears by prepare) computing what `mod` computes."""
    if type(mod).__name__ == "GptOssExperts":
        return QExperts(layout.num_experts, layout.hidden, layout.intermediate, bias=layout.bias,
                        gate=GATE_GPT_OSS, alpha=float(mod.alpha), limit=float(mod.limit), dtype=dtype)
    return QExperts(layout.num_experts, layout.hidden, layout.intermediate, bias=layout.bias, gate=GATE_SILU,
                    act_fn=mod.act_fn, dtype=dtype)


def replace_experts(model: nn.Module, dtype: torch.dtype) -> dict[str, FusedLayout]:
    """Swap every supported fused experts module for a QExperts. Returns {module name: layout}."""
    replaced = {}
    for name, mod, layout in find_experts(model):
        set_submodule(model, name, quantized_experts(mod, layout, dtype))
        replaced[name] = layout
    return replaced


def expert_routes(replaced: dict[str, FusedLayout]) -> dict[str, tuple]:
    """Per-expert parameter name -> (fused parameter name, role, kind, layout, expert)."""
    routes = {}
    for prefix, layout in replaced.items():
        for e in range(layout.num_experts):
            for role in ROLES:
                for kind in ("weight", "bias") if layout.bias else ("weight",):
                    routes[f"{prefix}.{e}.{role}.{kind}"] = (layout.fused_name(prefix, role, kind), role, kind,
                                                             layout, e)
    return routes


class _RenamedKeys:
    """A KeyMap whose model names are first renamed (Mixtral's block_sparse_moe / w1-w3-w2)."""

    def __init__(self, inner, renames):
        self.inner = inner
        self.renames = renames

    def __call__(self, name: str) -> str:
        for pattern, repl in self.renames:
            name = pattern.sub(repl, name)
        return self.inner(name)


class MoECheckpointWeights(CheckpointWeights):
    """CheckpointWeights for a model whose experts were replaced: per-expert keys as they are (renamed
    for Mixtral), or slices of the fused tensors when the checkpoint has those."""

    def __init__(self, source, model_names, base_prefix, replaced: dict[str, FusedLayout], spec=None,
                 routers: dict[str, torch.Size] | None = None, stacked: dict[str, tuple] | None = None):
        super().__init__(source, model_names, base_prefix)
        self.routes = expert_routes(replaced)
        self.spec = spec
        self.routers = routers or {}
        self.replaced = replaced
        self.stacked = stacked or {}          # expert module name -> (experts prefix, stem, expert, role)
        self._stacked_cache: dict[tuple[str, str], object] = {}
        if any(".block_sparse_moe." in k for k in self.keys):
            self.key_of = _RenamedKeys(self.key_of, _MIXTRAL_RENAMES)
        self._fused_counted: set[str] = set()

    def tensor(self, name: str) -> torch.Tensor | None:
        if name in self.routers:
            t = self._quantized_router(name)
            if t is not None:
                return t
        t = super().tensor(name)
        if t is not None:
            return t
        route = self.routes.get(name)
        if route is None:
            return None
        fused, role, kind, layout, e = route
        key = self.key_of(fused)
        if key not in self.source:
            return None
        full = self.source.get(key)
        expected = (layout.num_experts,) + ((2 * layout.intermediate if role != "down_proj" else layout.hidden,)
                                            if kind == "bias" else ())
        if kind == "bias" and tuple(full.shape) != expected:
            raise ShapeMismatchError(f"expected {expected}, found {tuple(full.shape)}", file=self._file_of(key),
                                     key=key)
        if full.dim() < 2 or full.shape[0] != layout.num_experts:
            raise ShapeMismatchError(f"expected {layout.num_experts} experts along dim 0, found shape "
                                     f"{tuple(full.shape)}", file=self._file_of(key), key=key)
        self.used.add(key)
        if key not in self._fused_counted:   # one fused tensor feeds many experts: count it once
            self._fused_counted.add(key)
            self.tensors_read += 1
            self.bytes_read += full.numel() * full.element_size()
        return layout.expert_slice(role, kind, full, e)

    def qtensor(self, module_name: str, mod):
        route = self.stacked.get(module_name)
        if route is None:
            return super().qtensor(module_name, mod)
        return self._stacked_expert(mod, *route)

    def _stacked_expert(self, mod, prefix: str, stem: str, e: int, role: str):
        """Expert e's `role` weight from stacked quantized experts (gpt-oss MXFP4 `<stem>_blocks` [E, R,
        G, 16] + `_scales`): the scheme's select_expert view, then gate/up's rows, copied once into their
        own packed tensors (so each expert stays packed on its own)."""
        scheme = mod.scheme
        stacked = self._stacked_cache.get((prefix, stem))
        if stacked is None:
            keys = [self.key_of(f"{prefix}.{k}") for k in scheme.required_keys()]
            pieces = {k: self._read(full) for k, full in zip(scheme.required_keys(), keys)}
            self.companions += len(pieces) - 1
            stacked = scheme.decode(pieces, shape=None, file=self._file_of(keys[0]), prefix=prefix)
            self._stacked_cache[(prefix, stem)] = stacked
        layout = self.replaced[prefix]
        one = scheme.select_expert(stacked, e)
        if stem == "gate_up_proj":
            i = layout.intermediate
            rows = (slice(0, None, 2) if role == "gate_proj" else slice(1, None, 2)) if layout.interleaved else \
                (slice(0, i) if role == "gate_proj" else slice(i, 2 * i))
            one = QTensor(scheme, {k: v[rows].contiguous() for k, v in one.data.items()}, (i, one.shape[1]),
                          one.dtype, one.meta)
        else:
            one = QTensor(scheme, {k: v.contiguous() for k, v in one.data.items()}, one.shape, one.dtype, one.meta)
        if tuple(one.shape) != tuple(mod._logical_shape):
            key = self.key_of(f"{prefix}.{stem}_blocks")
            raise ShapeMismatchError(f"expert {e} {role}: stacked {stem} gives {tuple(one.shape)}, the model "
                                     f"expects {tuple(mod._logical_shape)}", file=self._file_of(key), key=key)
        one.dtype = mod._logical_dtype
        return one

    def _quantized_router(self, name: str) -> torch.Tensor | None:
        """A router weight the checkpoint stores quantized (transformers 4 + bitsandbytes quantized the
        `mlp.gate` Linear; transformers 5 makes it a plain parameter): decoded, then dequantized."""
        module_name = name.rpartition(".")[0]
        scheme = self.spec.scheme_for(module_name, None) if self.spec is not None else None
        have = self.suffixes(module_name)
        if scheme is None or have <= {"weight", "bias"} or not scheme.present(have):
            return None
        stub = SimpleNamespace(scheme=scheme, _logical_shape=self.routers[name])
        return self.qtensor(module_name, stub).dequantize(torch.float32)

    def release(self, name: str) -> None:
        if name not in self.routes:
            super().release(name)


class ExpertsPlan:
    """What prepare_experts decided: the replaced modules, and the Weights class that reads them."""

    def __init__(self, replaced: dict[str, FusedLayout], spec, routers: dict[str, torch.Size], stacked):
        self.replaced = replaced
        self.spec = spec
        self.routers = routers
        self.stacked = stacked

    def weights(self, source, model_names, base_prefix) -> MoECheckpointWeights:
        return MoECheckpointWeights(source, model_names, base_prefix, self.replaced, self.spec, self.routers,
                                    self.stacked)


def quantize_stacked_experts(model: nn.Module, replaced: dict[str, FusedLayout], spec, keys: set,
                             dtype: torch.dtype) -> dict[str, tuple]:
    """Checkpoints that keep the experts stacked and quantized (gpt-oss MXFP4: `gate_up_proj_blocks`
    [E, 2I, H/32, 16]): the spec names a scheme per stacked parameter (`experts_schemes`); each expert
    Linear becomes a QLinear of that scheme, filled from its expert's rows. {module name: route}."""
    schemes_of = getattr(spec, "experts_schemes", None)
    routes = {}
    if schemes_of is None:
        return routes
    for prefix in replaced:
        experts = model.get_submodule(prefix)
        for stem, scheme in schemes_of(prefix).items():
            if not all(f"{prefix}.{k}" in keys for k in scheme.required_keys()):
                continue
            roles = ("gate_proj", "up_proj") if stem == "gate_up_proj" else ("down_proj",)
            for e, mlp in enumerate(experts):
                for role in roles:
                    setattr(mlp, role, QLinear.from_linear(getattr(mlp, role), scheme, dtype))
                    routes[f"{prefix}.{e}.{role}"] = (prefix, stem, e, role)
    return routes


def prepare_experts(model: nn.Module, source, spec, dtype: torch.dtype) -> ExpertsPlan | None:
    """Replace the model's fused experts when the checkpoint stores them per expert, or when they are
    (or are to be) quantized; None when the model has no supported experts or keeps them fused."""
    if not _is_moe(getattr(model, "config", None)):
        return None   # the common case costs one look at the config, no walk of the modules
    found = find_experts(model)
    per_expert = any(_PER_EXPERT_KEY.search(k) for k in source.keys())
    if per_expert:
        _refuse_unsupported_experts(model)
    if not found:
        return None
    if not per_expert and spec is None:
        return None
    routers = {f"{name}.weight": mod.weight.shape for name, mod in model.named_modules()
               if type(mod).__name__.endswith("TopKRouter") and isinstance(getattr(mod, "weight", None), torch.Tensor)}
    replaced = replace_experts(model, dtype)
    stacked = quantize_stacked_experts(model, replaced, spec, set(source.keys()), dtype)
    return ExpertsPlan(replaced, spec, routers, stacked)
