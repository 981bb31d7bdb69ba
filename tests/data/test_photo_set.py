"""Bundled photo set and ImageNet views: enough photos and views, deterministic, right preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data import imagenet_views, load_image, photo_paths, view_grid
from lowbit.errors import InputError


@pytest.fixture(scope="module")
def views():
    return imagenet_views()


def test_photo_paths():
    paths = photo_paths()
    assert len(paths) >= 8
    assert paths == photo_paths()
    assert [p.name for p in paths] == sorted(p.name for p in paths)
    assert all(p.is_file() for p in paths)
    assert {"astronaut.png", "chelsea.png", "coffee.png", "grace_hopper.jpg", "china.jpg"} <= {p.name for p in paths}


def test_view_grid():
    grid = view_grid()
    assert len(grid) == 54 and len(set(grid)) == 54
    assert grid[0].scale == 224 / 256 and (grid[0].fx, grid[0].fy, grid[0].flip) == (0.5, 0.5, False)
    assert grid[1].flip and grid[1].scale == grid[0].scale


def test_views_count_shape_range(views):
    n_photos = len(photo_paths())
    assert views.shape == (n_photos * 20, 3, 224, 224) and views.shape[0] >= 200
    assert views.dtype == torch.float32
    assert views.min() >= -127 / 128 - 1e-6 and views.max() <= 128 / 128 + 1e-6


def test_views_deterministic(views):
    assert torch.equal(imagenet_views(), views)


def test_views_layout(views):
    paths = photo_paths()
    first = load_image(paths[1])  # photo-major: photo 1 starts at index 20
    assert torch.equal(views[20], first)
    assert torch.equal(views[21], first.flip(-1))  # view 1 is the mirror of view 0
    assert not torch.equal(views[22], first)


def test_centre_view_matches_reference_preprocessing():
    """EfficientNet-Lite recipe: short side 256 (bicubic), centre crop 224, (x - 127) / 128."""
    path = next(p for p in photo_paths() if p.name == "astronaut.png")  # square, 512 x 512
    with Image.open(path) as image:
        image = image.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC).crop((16, 16, 240, 240))
    reference = (torch.from_numpy(np.array(image, dtype=np.float32)) - 127) / 128
    assert (load_image(path) - reference.permute(2, 0, 1)).abs().max() < 0.05


def test_errors(tmp_path):
    with pytest.raises(InputError, match="n_views_per_photo"):
        imagenet_views(n_views_per_photo=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png"):
        load_image(bad)
