"""transformers' own rule for `modules_to_not_convert` (quantizers_utils.should_convert_module), for the
formats whose configs transformers defines (mxfp4, gemma): a pattern skips a module when it matches as a
regex from the start up to a module boundary ("layer.1" skips "layer.1.attn", not "layer.11.attn";
"model.layers.*.self_attn" skips every layer's attention), or when the name ends with it."""
from __future__ import annotations

import re

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def hf_skipped(name: str, patterns) -> bool:
    if not patterns:
        return False
    return any(re.match(rf"(?:{p}){_BOUNDARY}", name) or name.endswith(p) for p in patterns)
