"""Fitting a requested scheme to the model it quantizes, and saying what it could not cover.

Grouped integer schemes (compressed-tensors `int4`: groups of 128 input columns) need whole groups:
compressed-tensors' own decompressor (0.20, `forward_helpers._process_group`) raises "tensor column shape
must be divisble by the given group_size" on a partial last group, so a partial group is not an option.
For a short name the group size is lowered to the largest size of the int4 kernels' (128, 64, 32: also the
sizes vLLM's Marlin kernels take) that divides every targeted layer; an explicit config is kept as given,
and the layers it leaves dense are counted and named with the option that would cover them.
"""
from __future__ import annotations

import warnings

from torch import nn

#: group sizes tried, largest first, when a short name's group does not divide the model's layers
GROUP_SIZES = (128, 64, 32)


class QuantloadWarning(UserWarning):
    """Something quantload did that the user did not literally ask for (a lowered group size, dense layers)."""


def _group_args(spec):
    """The compressed-tensors group-strategy weight args of `spec`'s first config group, or None."""
    for _, scheme in getattr(spec, "groups", ()):
        args = getattr(scheme, "args", None)
        if args is not None and args.strategy == "group":
            return args
    return None


def _targeted_widths(spec, model: nn.Module) -> dict[str, int]:
    """{module name: in_features} for the Linear layers `spec` targets (probed on a copy of its skip list,
    since compressed-tensors specs add the layers they cannot hold to it)."""
    saved = list(spec.skip_modules)
    out = {}
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and not isinstance(mod, nn.Embedding):
                before = len(spec.skip_modules)
                if spec.scheme_for(name, mod) is not None or len(spec.skip_modules) > before:
                    out[name] = mod.in_features
    finally:
        spec.skip_modules[:] = saved
    return out


def fit_spec(spec, model: nn.Module, request):
    """(spec to use, note or None). `request` is what the user passed as quantize=: only a short name
    (a string) has its group size chosen for the model."""
    args = _group_args(spec)
    if args is None:
        return spec, None
    widths = _targeted_widths(spec, model)
    bad = {n: w for n, w in widths.items() if w % args.group_size}
    if not bad or not isinstance(request, str):
        return spec, None
    fit = next((g for g in GROUP_SIZES if g <= args.group_size and all(w % g == 0 for w in widths.values())), None)
    if fit is None:
        return spec, None
    from .schemes.affine import ct_config
    from .schemes.registry import spec_from_dict
    cfg = ct_config(args.num_bits, group_size=fit, symmetric=args.symmetric, ignore=list(spec.skip_modules))
    widths_s = sorted(set(bad.values()))
    note = (f"quantize={request!r}: group size {args.group_size} does not divide the input width "
            f"({', '.join(map(str, widths_s))}) of {len(bad)} of the {len(widths)} layers (compressed-tensors "
            f"needs whole groups); using group size {fit}, which divides every layer")
    return spec_from_dict(cfg), note


def skipped_note(spec, skip_before: list, request) -> str | None:
    """The layers a spec's scheme_for left dense because they cannot hold it (compressed-tensors adds them
    to its `ignore`), with the option that would cover them."""
    added = [n for n in getattr(spec, "skip_modules", [])[len(skip_before):]]
    if not added:
        return None
    args = _group_args(spec)
    hint = ""
    if args is not None:
        hint = (f"; IntQuantConfig(bits={args.num_bits}, group_size=64) or a short name such as 'int4' "
                "(which picks a group size that divides) would cover them")
    shown = ", ".join(added[:3]) + (", ..." if len(added) > 3 else "")
    why = f"their input width is not a multiple of group size {args.group_size}" if args is not None else \
        "the scheme cannot hold their shape"
    return f"quantize={request!r}: {len(added)} layer(s) left unquantized ({shown}): {why}{hint}"


def announce(note: str | None, report=None) -> None:
    """A note goes into the load report and to the console (a warning)."""
    if not note:
        return
    if report is not None:
        report.warnings.append(note)
    warnings.warn(note, QuantloadWarning, stacklevel=3)
