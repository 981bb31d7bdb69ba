"""Bias correction: remove the mean output shift that weight quantization introduces.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019, Sec. 4.2:
quantizing ``W`` to ``W~ = W + dW`` shifts a layer's expected output by ``E[dW x] = dW E[x]``. Subtracting
that shift from the bias keeps every output channel's mean where it was. The shift matters most where a
following BatchNorm divides by a small standard deviation (depthwise convolutions of MobileNet-style
networks): there an 8-bit per-channel weight error of -40 dB can move the logits by -20 dB.

This is the empirical variant: ``E[x]`` per input channel is measured on calibration data. For a
convolution ``E[dW * x]`` is taken as ``sum over kernel positions of dW`` times the channel mean, which
ignores zero padding at the borders.
"""

from __future__ import annotations

import torch


def bias_correction(dW: torch.Tensor, mean_x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Expected output shift ``E[dW x]`` per output channel; subtract it from the bias.

    Args:
        dW: quantized minus float weight: ``(out, in)`` for a linear, ``(out, in // groups, *kernel)`` for a
            convolution.
        mean_x: ``(in,)`` mean of the layer's input per input channel.
        groups: the convolution's groups (1 for linears).
    Returns:
        ``(out,)`` float32 shift.
    """
    out, in_g = dW.shape[0], dW.shape[1]
    per_input = dW.float().reshape(out, in_g, -1).sum(-1)  # (out, in // groups): kernel summed
    mx = mean_x.float().reshape(groups, in_g).repeat_interleave(out // groups, dim=0)  # (out, in // groups)
    return (per_input * mx).sum(1)


def expected_clamped_normal(mu: torch.Tensor, sigma: torch.Tensor, clip: torch.Tensor | float | None = None,
                            rectified: bool = True) -> torch.Tensor:
    """``E[f(z)]`` per channel for ``z ~ N(mu, sigma^2)`` and ``f`` the identity, ReLU (``rectified``) or
    ``clamp(z, 0, clip)`` (ReLU6 and its kin): DFQ's analytic input mean (Nagel et al. 2019, Sec. 4.2.1).

    ``E[relu(z)] = mu Phi(mu / sigma) + sigma phi(mu / sigma)`` and ``clamp(z, 0, t) = relu(z) - relu(z - t)``.
    A channel with ``sigma == 0`` gives ``f(mu)``.
    """
    mu, sigma = mu.double(), sigma.double().abs()
    if not rectified:
        return mu.float()

    def relu_mean(m: torch.Tensor) -> torch.Tensor:
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        u = m / safe
        normal = torch.distributions.Normal(torch.zeros_like(u), torch.ones_like(u))
        mean = m * normal.cdf(u) + safe * normal.log_prob(u).exp()
        return torch.where(sigma > 0, mean, m.clamp(min=0))

    out = relu_mean(mu)
    if clip is not None:
        t = torch.as_tensor(clip, dtype=torch.float64).expand_as(mu)
        out = out - relu_mean(mu - t)
    return out.float()
