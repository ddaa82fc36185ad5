"""4-bit float (E2M1) and power-of-two (E8M0) primitives shared by the MXFP4 and NVFP4 schemes.

E2M1 has 1 sign bit, 2 exponent bits, 1 mantissa bit: the 16 codes are the 8 magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 is the sign). Two codes share a byte, the first
value of a pair in the low nibble (gpt-oss, compressed-tensors and ModelOpt all agree). E8M0 is a
biased exponent byte: 2 ** (byte - 127).
"""
from __future__ import annotations

import torch

#: code -> value, in code order (transformers' FP4_VALUES, compressed-tensors' kE2M1ToFloat with signs)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E8M0_BIAS = 127


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 2n] -> uint8 [..., n], the first of each pair in the low nibble."""
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


E2M1_TO_FP16_SHIFT = 2.0 ** 14    # e2m1 bits moved into float16's place read as value * 2 ** -14


def e2m1_scaled_down(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> float16 [..., 2n] holding each E2M1 value times 2 ** -14, exactly (low nibble
    first). The nibble's exponent and mantissa bits, moved to float16's exponent/mantissa position, read as
    the same number with float16's bias (15) instead of E2M1's (1); 0.5 (E2M1's subnormal) lands on a
    float16 subnormal. Integer shifts instead of a table lookup: several times faster on CPU."""
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)
    return (((nib & 8) << 12) | ((nib & 7) << 9)).view(torch.float16)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to the nearest E2M1 code, ties as compressed-tensors' cast_to_fp4
    breaks them (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), clamping
    beyond 6. The sign bit is set for negative inputs, even those rounded to zero (-0.1 -> -0.0, as
    compressed-tensors' x.abs() * sign(x) gives), but not for -0.0 itself (sign(-0.0) is 0 there)."""
    a = x.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
           + (a > 5.0))
    return mag | ((x < 0).to(torch.uint8) << 3)


def e8m0_exponents(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, or torch.float8_e8m0fnu viewed as bytes) -> unbiased int32 exponents."""
    if scales.dtype != torch.uint8:
        scales = scales.view(torch.uint8)
    return scales.to(torch.int32) - E8M0_BIAS
