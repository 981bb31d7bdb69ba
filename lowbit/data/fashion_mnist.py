"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28 x 28 greyscale, 10 labelled
classes of clothing. lowbit's labelled vision set: the bundled Fashion-MNIST models are trained on its
training split and report true top-1 accuracy on its test split (``lowbit.models.fmnist``).

The files are the four gzipped IDX files of Debian's ``dataset-fashion-mnist`` package, which ``make install``
unpacks into the virtual environment (``apt-get download`` + ``dpkg -x``: no root needed). They are looked up
in ``$LOWBIT_FASHION_MNIST``, then ``<venv>/share/lowbit-debian/usr/share/datasets/fashion-mnist``, then
``/usr/share/datasets/fashion-mnist`` (the package installed system-wide).

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type 0x08 = uint8> <number of dimensions>``, one
big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import InputError

log = logging.getLogger(__name__)

FOLDER_ENV = "LOWBIT_FASHION_MNIST"
INSTALL_HINT = ("run `make install` (it unpacks Debian's dataset-fashion-mnist into the virtual environment), "
                "`apt-get install dataset-fashion-mnist`, or set LOWBIT_FASHION_MNIST to a folder holding its "
                "four *-ubyte.gz files")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SIZES = {"train": 60_000, "test": 10_000}
SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# per-pixel mean and standard deviation of the training images on 0..1 (computed from the 60,000 images)
MEAN, STD = 0.2860, 0.3530


def fashion_mnist_folder() -> Path:
    """The folder holding the four IDX files (see the module docstring for where it is looked up)."""
    candidates = []
    if os.environ.get(FOLDER_ENV):
        candidates.append(Path(os.environ[FOLDER_ENV]).expanduser())
    candidates += [Path(sys.prefix) / "share" / "lowbit-debian" / "usr" / "share" / "datasets" / "fashion-mnist",
                   SYSTEM_FOLDER]
    for folder in candidates:
        if (folder / FILES["test"][0]).is_file():
            return folder
    raise InputError(f"Fashion-MNIST not found (looked in {', '.join(str(c) for c in candidates)}); {INSTALL_HINT}")


def fashion_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``split`` ("train" or "test"): uint8 ``(N, 28, 28)`` and int64 ``(N,)`` in 0..9.

    Raises InputError when the files are missing, truncated or not the IDX arrays expected.
    """
    if split not in FILES:
        raise InputError(f"Fashion-MNIST has the splits 'train' and 'test', not {split!r}")
    images, labels = _read_split(fashion_mnist_folder(), split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` images -> float32 ``(N, 1, 28, 28)`` model inputs, ``(x / 255 - MEAN) / STD``."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise InputError(f"Fashion-MNIST inputs are uint8 (N, 28, 28) images, got {images.dtype} {tuple(images.shape)}")
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def calibration_images(n: int = 256, seed: int = 0) -> torch.Tensor:
    """``n`` training images drawn without replacement (``seed``), as model inputs ``(n, 1, 28, 28)``: calibration
    never sees the test images that accuracy is measured on."""
    if not 1 <= n <= SIZES["train"]:
        raise InputError(f"Fashion-MNIST calibration takes 1 to {SIZES['train']} training images, got {n}")
    images, _ = fashion_mnist("train")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return to_inputs(images[order.sort().values])


@lru_cache(maxsize=2)
def _read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (folder / f for f in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    n = SIZES[split]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise InputError(f"{folder}: Fashion-MNIST {split} split has images {images.shape} and labels "
                         f"{labels.shape}, expected ({n}, 28, 28) and ({n},); {INSTALL_HINT}")
    if labels.max() > 9:
        raise InputError(f"{label_file}: a label is {int(labels.max())}; Fashion-MNIST labels are 0..9")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array in an IDX file (gzipped when its name ends in ``.gz``); InputError if it is not one."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {INSTALL_HINT}") from None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: cannot read it ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InputError(f"{path}: not an IDX file (it does not start with two zero bytes)")
    if raw[2] != 0x08:
        raise InputError(f"{path}: IDX type 0x{raw[2]:02x}; lowbit reads unsigned bytes (0x08) only")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InputError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimension(s))")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise InputError(f"{path}: IDX header says shape {shape} ({count} values) but {len(raw) - header} bytes "
                         f"follow it: the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
