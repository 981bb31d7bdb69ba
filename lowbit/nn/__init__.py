"""The quantized modules users end up with. Each holds packed weights and computes via the reference path."""

from lowbit.nn.base import QuantModule
from lowbit.nn.cache import cached_weights
from lowbit.nn.conv import QuantConv1d, QuantConv2d
from lowbit.nn.convert import QUANT_MODULES, float_weight, is_quantizable, to_quantized
from lowbit.nn.embedding import QuantEmbedding
from lowbit.nn.linear import QuantLinear
from lowbit.nn.rotation import RotatedLinear

__all__ = ["QuantModule", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "RotatedLinear", "QUANT_MODULES",
           "is_quantizable", "float_weight", "to_quantized", "cached_weights"]
