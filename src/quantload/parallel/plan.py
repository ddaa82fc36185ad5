"""Which module gets which tensor-parallel style: transformers' plan for the architecture
(config.base_model_tp_plan under the base model's prefix, plus the head's class-level _tp_plan) or a
user's dict, with the same "*" patterns ("layers.*.self_attn.q_proj"). Checked against the skeleton and
the rank count before anything is read."""
from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError, PlacementError

# transformers' style names -> what a rank holds and what its forward does afterwards
COLWISE = {"colwise": "colwise", "colwise_gather_output": "colwise_gather", "colwise_rep": "colwise_gather"}
ROWWISE = {"rowwise": "rowwise", "rowwise_rep": "rowwise", "rowwise_split_input": "rowwise"}
REPLICATE = ("replicate", "replicated", "isolated", "sequence_parallel")


def plan_of(model: nn.Module, tp_plan) -> tuple[dict[str, str], bool]:
    """(pattern -> style, came from the user). "auto": the architecture's own plan."""
    if isinstance(tp_plan, dict):
        return dict(tp_plan), True
    if tp_plan != "auto":
        raise ConfigError(f"tp_plan={tp_plan!r}; expected 'auto' or a dict {{module pattern: style}}")
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = bool(prefix) and hasattr(model, prefix)
    plan = {(f"{prefix}.{k}" if has_base else k): v for k, v in base.items()}
    plan.update(getattr(type(model), "_tp_plan", None) or {})
    if not plan:
        raise ConfigError(f"tp_plan='auto': {type(model).__name__} has no tensor-parallel plan "
                          "(config.base_model_tp_plan is empty); pass tp_plan={module pattern: 'colwise'|'rowwise'}")
    return plan, False


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def resolve(model: nn.Module, tp_plan, world: int) -> tuple[dict[str, str], list[str]]:
    """{module name: "colwise" | "colwise_gather" | "rowwise"} and notes on what stays replicated.
    A user's pattern that matches no module, or an unknown style, is a ConfigError; so is a rank count
    that does not divide the attention heads."""
    plan, from_user = plan_of(model, tp_plan)
    modules = dict(model.named_modules())
    out, notes = {}, []
    for pattern, style in plan.items():
        rx = _regex(pattern)
        hits = [n for n in modules if rx.fullmatch(n)]
        if not hits and from_user:
            raise ConfigError(f"tp_plan names {pattern!r}, which matches no module of {type(model).__name__} "
                              f"(modules look like {[n for n in modules if n][:4]})")
        if style in COLWISE or style in ROWWISE:
            kind = COLWISE.get(style) or ROWWISE[style]
        elif style in REPLICATE or not from_user:
            notes.append(f"tp_plan {pattern!r}: style {style!r} loaded replicated (whole on every rank)")
            continue
        else:
            raise ConfigError(f"tp_plan {pattern!r}: unknown style {style!r}; expected one of "
                              f"{sorted({*COLWISE, *ROWWISE, *REPLICATE})}")
        for n in hits:
            if not isinstance(modules[n], nn.Linear):
                if from_user:
                    raise ConfigError(f"tp_plan {pattern!r} -> {n}: a {type(modules[n]).__name__}; only Linear "
                                      "layers are split (embeddings and others stay replicated)")
                notes.append(f"{n}: {type(modules[n]).__name__} with style {style!r} loaded replicated")
                continue
            out[n] = kind
    _check_heads(model, out, world)
    return out, notes


def _check_heads(model, shards: dict[str, str], world: int) -> None:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if text is None or not any(".self_attn." in n for n in shards):
        return
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, attr, None)
        if isinstance(heads, int) and heads % world:
            raise PlacementError(f"{world} ranks do not divide {attr}={heads}: each rank must hold whole "
                                 f"attention heads; use a rank count that divides {heads}")
