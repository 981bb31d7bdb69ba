"""Agreement of a (quantized) image-to-image model's output maps with its float reference's.

A saliency model (the bundled ``vit-s-focus``) has no labels to score against here; a quantized one is judged
by how closely its maps follow the float model's on the same images (the bundled photo views,
:func:`lowbit.data.images.imagenet_views` with ``normalize="imagenet"``):

- Pearson correlation of each image's map with the float map (mean over images, and the worst image);
- IoU of the top-10% region (the pixels a consumer of the map would keep), mean over images;
- the largest absolute difference of any pixel.

Compute the reference maps once with :func:`output_maps` and pass them to :func:`saliency_agreement` for every
variant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError
from lowbit.evaluation.agreement import check_image_batches

log = logging.getLogger(__name__)

TOP_FRACTION = 0.1  # the top region: this fraction of each map's pixels, by value


@dataclass(frozen=True)
class SaliencyResult:
    """correlation: mean over images of the Pearson correlation of the model's map with the reference's.
    min_correlation: the lowest of those correlations (the worst image).
    top_iou: mean over images of the IoU of the two maps' top ``top_fraction`` pixels.
    max_abs_diff: the largest |model - reference| over every pixel of every image.
    n_images: number of images compared. top_fraction: the fraction of pixels in the top region."""

    correlation: float
    min_correlation: float
    top_iou: float
    max_abs_diff: float
    n_images: int
    top_fraction: float = TOP_FRACTION

    def describe(self) -> str:
        return (f"maps vs float over {self.n_images} images: Pearson r {self.correlation:.5f} mean, "
                f"{self.min_correlation:.5f} worst; top-{self.top_fraction:.0%} IoU {self.top_iou:.4f}; "
                f"max |diff| {self.max_abs_diff:.4g}")


def output_maps(model: nn.Module, images: torch.Tensor, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Outputs of ``model`` on ``images`` in batches, under ``torch.inference_mode``, each flattened.

    images: FloatTensor (N, C, H, W). Returns: FloatTensor (N, numel of one output), float32.
    Raises InputError if the model is in training mode, does not take images of this shape, gives an output
    whose first dimension is not the batch, or NaN/Inf.
    """
    check_image_batches(model, images, batch_size)
    chunks = []
    with torch.inference_mode():
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="maps", unit="batch", disable=not progress):
            batch = images[start : start + batch_size]
            try:
                out = model(batch)
            except RuntimeError as err:
                if start > 0:
                    raise
                raise InputError(f"{type(model).__name__} does not take images of shape {tuple(batch.shape)} "
                                 f"(N, 3, 224, 224 ImageNet-normalised views): {str(err).splitlines()[0]}") from None
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != batch.shape[0]:
                raise InputError(f"{type(model).__name__} gave {type(out).__name__} "
                                 f"{tuple(getattr(out, 'shape', ()))} for {batch.shape[0]} images; expected one "
                                 f"map per image (N, ...)")
            maps = out.float().reshape(out.shape[0], -1)  # (B, numel)
            if not torch.isfinite(maps).all():
                raise InputError(f"{type(model).__name__} gave NaN/Inf on images {start}..{start + len(maps) - 1}")
            chunks.append(maps)
    return torch.cat(chunks)  # (N, numel)


def saliency_agreement(
    reference: nn.Module | torch.Tensor,
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 16,
    progress: bool = True,
    top_fraction: float = TOP_FRACTION,
) -> SaliencyResult:
    """Agreement of ``model``'s maps with ``reference``'s on ``images`` (N, C, H, W).

    ``reference`` is the float model, or its maps (N, ...) from :func:`output_maps`, so that evaluating several
    variants runs the float model once.
    """
    if isinstance(reference, torch.Tensor):
        ref_maps = reference
    else:
        ref_maps = output_maps(reference, images, batch_size, progress)
    return agreement_from_maps(ref_maps, output_maps(model, images, batch_size, progress), top_fraction)


def agreement_from_maps(
    ref_maps: torch.Tensor, maps: torch.Tensor, top_fraction: float = TOP_FRACTION
) -> SaliencyResult:
    """:class:`SaliencyResult` of two sets of maps, both (N, ...) with the same shape; computed in float64.

    An image whose two maps are both constant has correlation 1 if they are equal and 0 otherwise; one
    constant map against a varying one has correlation 0. The top region holds ``max(1, round(top_fraction *
    numel))`` pixels of each map (among equal values, ``torch.topk`` chooses).
    """
    if ref_maps.shape != maps.shape or ref_maps.dim() < 2 or ref_maps.shape[0] == 0:
        raise InputError(f"reference maps {tuple(ref_maps.shape)} and model maps {tuple(maps.shape)} must both be "
                         f"(N >= 1, ...) with the same shape (same images, same order)")
    if not 0 < top_fraction <= 1:
        raise InputError(f"top_fraction must be in (0, 1], got {top_fraction}")
    ref = ref_maps.reshape(ref_maps.shape[0], -1).double()  # (N, P)
    out = maps.reshape(maps.shape[0], -1).double()  # (N, P)
    r = pearson(ref, out)  # (N,)
    k = max(1, round(top_fraction * ref.shape[1]))
    iou = top_iou(ref, out, k)  # (N,)
    return SaliencyResult(correlation=float(r.mean()), min_correlation=float(r.min()), top_iou=float(iou.mean()),
                          max_abs_diff=float((ref - out).abs().max()), n_images=int(ref.shape[0]),
                          top_fraction=top_fraction)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, both (N, P). Returns (N,).

    Rows with zero variance: 1 where both rows are constant and equal, else 0."""
    da, db = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)  # (N, P)
    na, nb = da.pow(2).sum(dim=1), db.pow(2).sum(dim=1)  # (N,)
    flat = (na == 0) | (nb == 0)
    r = (da * db).sum(dim=1) / (na * nb).sqrt().where(~flat, torch.ones_like(na))
    same = (a == b).all(dim=1)
    return r.where(~flat, same.to(r.dtype)).clamp(-1.0, 1.0)


def top_iou(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """IoU of the positions of the ``k`` largest values of each row of ``a`` and of ``b``, both (N, P).
    Returns (N,)."""
    ia, ib = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices  # (N, k)
    in_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, ia, True)  # (N, P)
    in_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, ib, True)
    inter = (in_a & in_b).sum(dim=1).double()
    return inter / (2 * k - inter)
