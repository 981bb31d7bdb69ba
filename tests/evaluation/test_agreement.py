"""Classifier agreement: identity gives 1 and KL 0, hand-checked values, reusable reference logits."""

import math

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.evaluation.agreement import (
    AgreementResult,
    agreement_from_logits,
    classifier_agreement,
    classifier_logits,
)
from lowbit.models import tiny_cnn

IMAGES = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Permuted(nn.Module):
    """The wrapped model's logits with the classes shuffled."""

    def __init__(self, model, n_classes=10):
        super().__init__()
        self.model = model
        self.register_buffer("perm", torch.randperm(n_classes, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return self.model(x)[:, self.perm]


def test_model_agrees_with_itself():
    model = tiny_cnn()
    result = classifier_agreement(model, model, IMAGES, batch_size=16, progress=False)
    assert result == AgreementResult(top1=1.0, top5=1.0, kl=0.0, n_images=40)


def test_permuted_logits_agree_less():
    model = tiny_cnn()
    result = classifier_agreement(model, Permuted(model).eval(), IMAGES, progress=False)
    assert result.top1 < 0.5 and result.kl > 0.0


def test_precomputed_reference_logits_give_the_same_result():
    reference, other = tiny_cnn(seed=0), tiny_cnn(seed=1)
    ref_logits = classifier_logits(reference, IMAGES, batch_size=7, progress=False)
    assert ref_logits.shape == (40, 10)
    assert classifier_agreement(ref_logits, other, IMAGES, progress=False) == classifier_agreement(
        reference, other, IMAGES, progress=False)


def test_agreement_from_logits_by_hand():
    ref = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    out = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, -3.0]])
    result = agreement_from_logits(ref, out)
    assert result.top1 == 0.5
    assert result.top5 == 0.5  # class 5 is last in row 2's ranking: out of the top 5
    p = torch.softmax(ref[1].double(), 0)
    q = torch.softmax(out[1].double(), 0)
    expected_kl = float((p * (p / q).log()).sum()) / 2  # row 1 contributes 0
    assert result.kl == pytest.approx(expected_kl, rel=1e-12)
    assert math.isfinite(result.kl) and result.n_images == 2
    assert "top-1 agreement 50.00%" in result.describe()


def test_shape_mismatch_and_training_mode():
    with pytest.raises(InputError, match="same N"):
        agreement_from_logits(torch.zeros(4, 10), torch.zeros(5, 10))
    with pytest.raises(InputError, match="training mode"):
        classifier_logits(tiny_cnn().train(), IMAGES, progress=False)
    with pytest.raises(InputError, match="images must be"):
        classifier_logits(tiny_cnn(), IMAGES[0], progress=False)


@pytest.mark.e2e
def test_efficientnet_agreement_on_photo_views():
    from lowbit.data import imagenet_views
    from lowbit.models import load_model

    model = load_model("efficientnet-lite0").model
    images = imagenet_views(n_views_per_photo=1)  # the standard centre crop of every photo
    ref_logits = classifier_logits(model, images, progress=False)
    assert agreement_from_logits(ref_logits, ref_logits).top1 == 1.0
    noisy = load_model("efficientnet-lite0").model
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in noisy.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=generator) if p.numel() > 1 else 0)
    result = classifier_agreement(ref_logits, noisy, images, progress=False)
    assert result.kl > 0.0 and result.n_images == images.shape[0]
