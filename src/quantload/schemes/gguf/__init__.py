"""GGUF block types as quantload schemes: every type gguf-py 0.19 can dequantize (plus Q8_K, Q8_1,
Q1_0, Q2_0), decoded in vectorized torch, bit for bit equal to gguf-py, the same code on CPU and CUDA.

    gguf_scheme(type_id) -> GGUFScheme       decode / dequantize / embedding / linear / encode / quantize
    dequantize_blocks(type_id, blocks)       uint8 [..., k * type_size] -> float32 [..., k * block_size]
    quantize_blocks(type_id, w)              float [..., ne0] -> uint8 [rows, row_bytes] (F32, F16, BF16,
                                             Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; gguf-py's bytes)

The package does not import gguf: the codebooks are in grids.py.
"""
from .dequant import dequantize_blocks, supported_types
from .quantize import QUANTIZERS, quantize_blocks
from .scheme import GGUFScheme, gguf_scheme

__all__ = ["GGUFScheme", "gguf_scheme", "dequantize_blocks", "quantize_blocks", "supported_types",
           "QUANTIZERS"]
