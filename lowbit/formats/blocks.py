"""Tile geometry shared by every format: the 2-D view of a tensor cut into scale-sharing blocks.

A tensor of shape ``(d0, d1, ...)`` is seen as the matrix ``(d0, d1 * ...)``; a spec's granularity gives the
tile ``(br, bc)`` that shares one scale (``QuantSpec.block``). The matrix is zero-padded up to whole tiles
and viewed as ``(gr, br, gc, bc)``, where ``(gr, gc)`` is the grid of scales. Zero padding is exact for
every lowbit format: ranges always contain 0, and 0 is always representable, so padded cells never move a
scale and always quantize with zero error.
"""

from __future__ import annotations

import math

import torch

from lowbit.spec import QuantSpec


def as_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of the 2-D view: rows = first dim, cols = product of the rest (1 for a vector)."""
    if len(shape) == 0:
        return (1, 1)
    return (int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1)


def grid_shape(spec: QuantSpec, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Shape ``(gr, gc)`` of the scale grid of a tensor of ``shape`` under ``spec``."""
    rows, cols = as_matrix_shape(shape)
    br, bc = spec.block(rows, cols)
    return (math.ceil(rows / br), math.ceil(cols / bc))


def to_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as tiles: returns ``(gr, br, gc, bc)``, zero-padded where the shape is not a multiple."""
    rows, cols = as_matrix_shape(x.shape)
    br, bc = spec.block(rows, cols)
    gr, gc = math.ceil(rows / br), math.ceil(cols / bc)
    m = x.reshape(rows, cols)
    pad_r, pad_c = gr * br - rows, gc * bc - cols
    if pad_r or pad_c:
        m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
    return m.reshape(gr, br, gc, bc)


def from_blocks(xb: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``(gr, br, gc, bc)`` -> a tensor of ``shape`` (padding dropped)."""
    gr, br, gc, bc = xb.shape
    rows, cols = as_matrix_shape(shape)
    m = xb.reshape(gr * br, gc * bc)
    if m.shape != (rows, cols):
        m = m[:rows, :cols]
    return m.reshape(shape)


def expand(grid: torch.Tensor) -> torch.Tensor:
    """A per-tile tensor ``(gr, gc)`` shaped to broadcast against ``(gr, br, gc, bc)`` tiles."""
    return grid[:, None, :, None]


def block_amax(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Largest magnitude in each tile: ``(gr, gc)``."""
    return to_blocks(x, spec).abs().amax(dim=(1, 3))


def block_minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile ``(min, max)``, each ``(gr, gc)``; padding contributes zeros (ranges always hold 0)."""
    xb = to_blocks(x, spec)
    return xb.amin(dim=(1, 3)), xb.amax(dim=(1, 3))


def block_sum(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-tile sum ``(gr, gc)`` (e.g. of squared errors)."""
    return to_blocks(x, spec).sum(dim=(1, 3))


def block_counts(spec: QuantSpec, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Number of real (unpadded) elements in each tile: ``(gr, gc)`` float tensor."""
    return block_sum(torch.ones(as_matrix_shape(shape)), spec)
