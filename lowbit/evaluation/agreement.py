"""Agreement of a (quantized) image classifier with its float reference, without labels.

No labelled ImageNet set installs offline, so a quantized classifier is judged by how often it picks
the reference's class and how far its predictive distribution moves (KL divergence), over many views
of the bundled photos (:func:`lowbit.data.images.imagenet_views`). Compute the reference logits once
with :func:`classifier_logits` and pass them to :func:`classifier_agreement` for every variant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgreementResult:
    """top1: fraction of images where the model's argmax equals the reference's.
    top5: fraction where the reference's top-1 class is among the model's top 5.
    kl: mean over images of KL(reference || model) of the softmax distributions, in nats.
    n_images: number of images compared."""

    top1: float
    top5: float
    kl: float
    n_images: int

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1:.2%}, top-5 agreement {self.top5:.2%}, "
                f"KL(ref||model) {self.kl:.4f} nats over {self.n_images} images")


def check_image_batches(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """InputError unless ``model`` is in eval mode, ``images`` is (N >= 1, C, H, W) and ``batch_size >= 1``."""
    if model.training:
        raise InputError(f"{type(model).__name__} is in training mode (dropout/BN updates); call model.eval() first")
    if images.dim() != 4 or images.shape[0] == 0:
        raise InputError(f"images must be (N >= 1, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


def classifier_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in batches, under ``torch.inference_mode``.

    images: FloatTensor (N, C, H, W). Returns: FloatTensor (N, n_classes), float32.
    Raises InputError if the model is in training mode or returns NaN/Inf.
    """
    check_image_batches(model, images, batch_size)
    chunks = []
    with torch.inference_mode():
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="classify", unit="batch", disable=not progress):
            out = model(images[start : start + batch_size])
            logits = getattr(out, "logits", out).float()  # (B, n_classes)
            if not torch.isfinite(logits).all():
                raise InputError(f"{type(model).__name__} gave NaN/Inf logits on images {start}..{start + len(logits) - 1}")
            chunks.append(logits)
    return torch.cat(chunks)  # (N, n_classes)


def classifier_agreement(
    reference: nn.Module | torch.Tensor,
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 32,
    progress: bool = True,
) -> AgreementResult:
    """Agreement of ``model`` with ``reference`` on ``images`` (N, C, H, W).

    ``reference`` is the float model, or its logits (N, n_classes) from :func:`classifier_logits` so
    that evaluating several variants runs the float model once.
    """
    if isinstance(reference, torch.Tensor):
        ref_logits = reference
    else:
        ref_logits = classifier_logits(reference, images, batch_size, progress)
    return agreement_from_logits(ref_logits, classifier_logits(model, images, batch_size, progress))


def agreement_from_logits(ref_logits: torch.Tensor, logits: torch.Tensor) -> AgreementResult:
    """Agreement between two logit tensors, both (N, n_classes); computed in float64."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise InputError(
            f"reference logits {tuple(ref_logits.shape)} and model logits {tuple(logits.shape)} must both be "
            f"(N, n_classes) with the same N (same images, same order) and the same classes"
        )
    ref = ref_logits.double()
    out = logits.double()
    ref_top1 = ref.argmax(dim=1)  # (N,)
    top1 = (out.argmax(dim=1) == ref_top1).double().mean()
    k = min(5, out.shape[1])
    top5 = (out.topk(k, dim=1).indices == ref_top1[:, None]).any(dim=1).double().mean()
    ref_logp = torch.log_softmax(ref, dim=1)  # (N, n_classes)
    out_logp = torch.log_softmax(out, dim=1)
    kl = (ref_logp.exp() * (ref_logp - out_logp)).sum(dim=1).clamp_min(0.0).mean()  # nats
    return AgreementResult(top1=float(top1), top5=float(top5), kl=float(kl), n_images=int(ref.shape[0]))
