"""Quantized embedding lookup that dequantizes only the rows it returns.

The reference :class:`~lowbit.nn.QuantEmbedding` dequantizes the whole table on each call (49,152 x 576
values for SmolLM2, for one token while decoding). When every row of the table starts on a byte of the
packed stream (``embedding_dim * bits`` a multiple of 8) and the scale grid has one row per table row (per
row or grouped along the row), the packed bytes, scales and zero points of the looked-up rows are gathered
first and only those are unpacked and dequantized, with lowbit's own ``dequantize``: the result equals the
reference bit for bit. The kernel keeps no copy of the table (``pack`` stores nothing).
"""

from __future__ import annotations

import torch

from lowbit.formats import QuantizedTensor, dequantize
from lowbit.formats.blocks import grid_shape
from lowbit.formats.packing import unpack
from lowbit.formats.scales import decode_scale
from lowbit.nn.base import QuantModule
from lowbit.nn.embedding import QuantEmbedding


def why_not(m: QuantModule) -> str | None:
    if not isinstance(m, QuantEmbedding):
        return f"a {type(m).__name__}, not an embedding"
    if (m.embedding_dim * m.spec.bits) % 8:
        return f"rows of {m.embedding_dim} {m.spec.bits}-bit codes do not start on a byte"
    if grid_shape(m.spec, m.weight_shape)[0] != m.num_embeddings:
        return f"weight granularity {m.spec.granularity} shares scales across rows"
    return None


def pack(m: QuantEmbedding) -> dict:
    return {}


def run(m: QuantEmbedding, st: dict, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` integer ``(...)`` -> float32 ``(..., embedding_dim)``, as the reference."""
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= m.num_embeddings):
        raise IndexError(f"token ids must lie in [0, {m.num_embeddings}), got {int(flat.min())}..{int(flat.max())}")
    dim, bits = m.embedding_dim, m.spec.bits
    rows = m.qweight.view(m.num_embeddings, dim * bits // 8)[flat]
    codes = unpack(rows.reshape(-1), bits, flat.numel() * dim).reshape(flat.numel(), dim)
    scale = decode_scale(m.scale[flat], m.spec.scale_format)
    zero = None if m.zero_point is None else m.zero_point[flat]
    q = QuantizedTensor(codes, scale, zero, m.global_scale, m.spec)
    return dequantize(q, torch.float32).reshape(*ids.shape, dim)
