"""Number formats: pure tensor math, no modules. What a quantized number is, and how it is stored."""

from lowbit.formats.blocks import as_matrix_shape, block_minmax, grid_shape, to_blocks, from_blocks
from lowbit.formats.elements import decode_elements, element_max, encode_elements, nf4_levels
from lowbit.formats.packing import pack, packed_nbytes, unpack
from lowbit.formats.qtensor import (
    QuantizedTensor,
    all_finite,
    default_range,
    dequantize,
    fake_quantize,
    fake_quantize_dynamic,
    quantize,
)
from lowbit.formats.scales import decode_scale, encode_scale

__all__ = [
    "QuantizedTensor",
    "all_finite",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_dynamic",
    "default_range",
    "pack",
    "unpack",
    "packed_nbytes",
    "encode_scale",
    "decode_scale",
    "as_matrix_shape",
    "grid_shape",
    "block_minmax",
    "to_blocks",
    "from_blocks",
    "element_max",
    "encode_elements",
    "decode_elements",
    "nf4_levels",
]
