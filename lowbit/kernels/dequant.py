"""The many-rows path of the weight-only kernels: the weight dequantized to float32 a slice of rows at a time, each
slice multiplied by torch's float matrix product.

With many rows (a prompt, a batch, an encoder's frames) a matrix product is bound by arithmetic, not by reading the
weight, and torch's float product beats the weight-only kernels there; unpacking the weight costs one pass over
it, small against that many rows. Slices of at most :data:`SLICE_VALUES` weights keep the float copy small
(16 MiB) whatever the layer's size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SLICE_VALUES = 1 << 22  # weights dequantized at a time (16 MiB of float32)


def sliced_linear(x2: torch.Tensor, rows: Callable[[int, int], torch.Tensor], out_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ W.T + bias`` float32 ``(M, out_features)`` for ``x2`` float32 ``(M, K)``, where ``rows(n0, n1)`` gives
    rows ``[n0, n1)`` of ``W`` as float32 ``(n1 - n0, K)``."""
    k = x2.shape[1]
    step = max(8, (SLICE_VALUES // max(k, 1)) // 8 * 8)
    b = None if bias is None else bias.float()
    if step >= out_features:
        return F.linear(x2, rows(0, out_features), b)
    parts = [F.linear(x2, rows(n0, min(n0 + step, out_features)), None if b is None else b[n0:n0 + step])
             for n0 in range(0, out_features, step)]
    return torch.cat(parts, dim=1)
