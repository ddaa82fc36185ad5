"""Random but valid ggml blocks, for tests and benchmarks (here so every GGUF test can share them).

Random bytes everywhere, except the float fields, which get finite values of sane magnitude so that
dequantized values are finite: fp16 scales in ±[2^-10, 2), E8M0 exponents near 1, and so on.
"""
from __future__ import annotations

import torch

from ...ggml_types import GGML_TYPES

#: byte offsets of the fp16 fields of each block (ggml-common.h)
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q8_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,), "Q1_0": (0,), "Q2_0": (0,),
}


def _scales(n: int, g: torch.Generator) -> torch.Tensor:
    """n finite float32 of both signs, magnitudes mostly in [2^-10, 2), with some exact zeros and some
    fp16 subnormals (2^-24 .. 2^-15) so those conversions are exercised too."""
    mag = torch.exp2(torch.rand(n, generator=g) * 11 - 10)
    tiny = torch.exp2(-15 - torch.randint(0, 10, (n,), generator=g).float())
    u = torch.rand(n, generator=g)
    mag = torch.where(u < 0.02, 0.0, torch.where(u < 0.05, tiny, mag))
    return mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


def random_blocks(type_id: int, n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, type_size] of valid random blocks of ggml type `type_id`."""
    t = GGML_TYPES[type_id]
    g = torch.Generator().manual_seed(seed)
    if t.name in ("F32", "F16", "BF16"):
        x = torch.randn(n, generator=g) * _scales(n, g)
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.name]
        return x.to(dt).view(torch.uint8).reshape(n, t.type_size)
    b = torch.randint(0, 256, (n, t.type_size), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS.get(t.name, ()):
        b[:, off:off + 2] = _scales(n, g).half().view(torch.uint8).reshape(n, 2)
    if t.name == "Q8_K":
        b[:, 0:4] = _scales(n, g).view(torch.uint8).reshape(n, 4)
    elif t.name == "MXFP4":   # E8M0 2^(e-128): keep the scale within 2^±20
        b[:, 0] = torch.randint(108, 149, (n,), dtype=torch.uint8, generator=g)
    elif t.name == "IQ1_M":   # the fp16 d is spread over the top nibbles of the 4 scale words
        d = _scales(n, g).half().view(torch.int16).int() & 0xFFFF
        w = b[:, 48:56].contiguous().view(torch.int16).int() & 0x0FFF
        w = w | (((d.unsqueeze(-1) >> torch.tensor([0, 4, 8, 12])) & 0xF) << 12)
        b[:, 48:56] = torch.stack([w & 255, w >> 8], -1).to(torch.uint8).reshape(n, 8)
    return b
