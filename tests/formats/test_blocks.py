"""Tile geometry: the 2-D view, the scale grid, padding to whole tiles and back."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import as_matrix_shape, block_minmax, from_blocks, grid_shape, to_blocks
from lowbit.formats.blocks import block_amax, block_counts, block_sum
from lowbit.spec import QuantSpec


@pytest.mark.parametrize("shape, view", [((), (1, 1)), ((5,), (5, 1)), ((4, 6), (4, 6)), ((8, 3, 5, 7), (8, 105)),
                                         ((2, 3, 4), (2, 12))])
def test_matrix_view(shape, view):
    assert as_matrix_shape(shape) == view
    assert as_matrix_shape(torch.Size(shape)) == view


@pytest.mark.parametrize(
    "scheme, shape, grid",
    [
        ("int8-tensor", (17, 300), (1, 1)),
        ("int8", (17, 300), (17, 1)),
        ("int8-token", (17, 300), (17, 1)),
        ("int4-g128", (17, 300), (17, 3)),  # 128 + 128 + 44: the short last group keeps its own scale
        ("int4-g100", (17, 300), (17, 3)),
        ("int4-g32", (6, 3, 5, 7), (6, 4)),  # 105 columns
        ("int4-b4x8", (17, 300), (5, 38)),
        ("int4-b4x8", (6, 3, 5, 7), (2, 14)),
        ("int8", (257,), (257, 1)),
        ("int4-g64", (257,), (257, 1)),
        ("int8-tensor", (257,), (1, 1)),
    ],
)
def test_grid_shape(scheme, shape, grid):
    spec = QuantSpec.parse(scheme)
    assert grid_shape(spec, shape) == grid
    assert block_minmax(torch.ones(shape), spec)[0].shape == grid


@pytest.mark.parametrize("scheme", ["int8-tensor", "int8", "int4-g128", "int4-g7", "int4-b3x5", "int4-b32x32"])
@pytest.mark.parametrize("shape", [(257,), (17, 300), (6, 3, 5, 7)])
def test_blocks_round_trip_with_zero_padding(scheme, shape, gen):
    spec = QuantSpec.parse(scheme)
    x = torch.randn(shape, generator=gen)
    xb = to_blocks(x, spec)
    gr, br, gc, bc = xb.shape
    rows, cols = as_matrix_shape(shape)
    assert (gr, gc) == grid_shape(spec, shape) and gr * br >= rows and gc * bc >= cols
    assert torch.equal(from_blocks(xb, shape), x)
    # padding holds zeros only: the tiles sum to the same total and contain exactly the pad count of zeros
    assert torch.allclose(xb.sum(), x.sum(), atol=1e-4)
    assert int((xb == 0).sum()) == xb.numel() - x.numel() + int((x == 0).sum())


def test_tile_statistics_by_hand():
    spec = QuantSpec.parse("int4-g3")
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-5.0, -6.0, -7.0, -8.0]])  # groups [0:3], [3:4] (+2 pad)
    lo, hi = block_minmax(x, spec)
    assert lo.tolist() == [[-2.0, 0.0], [-7.0, -8.0]]
    # padded tiles see the padding's zeros; a full all-negative tile keeps its negative max (quantize then
    # widens every range to hold 0)
    assert hi.tolist() == [[3.0, 4.0], [-5.0, 0.0]]
    assert block_amax(x, spec).tolist() == [[3.0, 4.0], [7.0, 8.0]]
    assert block_sum(x, spec).tolist() == [[2.0, 4.0], [-18.0, -8.0]]
    assert block_counts(spec, x.shape).tolist() == [[3.0, 1.0], [3.0, 1.0]]


def test_block_tiles_are_2d():
    spec = QuantSpec.parse("int4-b2x2")
    x = torch.arange(16.0).reshape(4, 4)
    assert block_amax(x, spec).tolist() == [[5.0, 7.0], [13.0, 15.0]]
