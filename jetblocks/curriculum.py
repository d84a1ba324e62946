"""JetFormer's noise curriculum: rounded RGB noise on the training images, decaying to zero.

JetFormer (arXiv 2411.19722) trains Jet and an autoregressive model on images with Gaussian
noise whose scale decays over training (the image NLL it trains is
:func:`jetblocks.likelihood.image_bits_per_dim`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jetblocks import rng
from jetblocks.likelihood import pixels_to_unit
from jetblocks.validation import COUNT, NON_NEGATIVE, POSITIVE_INT, checked

__all__ = ["NoiseCurriculum"]


class NoiseCurriculum:
    """Rounded RGB noise with a cosine-decaying scale, applied to training images.

    ``sigma(t) = sigma_end + (sigma_start - sigma_end) * (1 + cos(pi * t / T)) / 2`` and, in
    0..255 units, ``x255 = round(round((x + 1) * 127.5) + sigma(t) * n)``, ``n ~ N(0, 1)``,
    not clipped; the result is returned as ``x255 / 127.5 - 1`` (the left edge of the uint8
    bin, ready for uniform dequantization). The reference uses ``sigma_start = 64`` and
    ``sigma_end = 0`` (class-conditional) or ``3`` (text-to-image). Evaluation uses none.
    """

    @checked(sigma_start=NON_NEGATIVE, sigma_end=NON_NEGATIVE, total_steps=POSITIVE_INT)
    def __init__(
        self, sigma_start: float = 64.0, sigma_end: float = 0.0, total_steps: int = 1
    ) -> None:
        self.sigma_start, self.sigma_end, self.total_steps = sigma_start, sigma_end, total_steps

    def sigma(self, step: int) -> float:
        """The noise std at ``step`` in 0..255 pixel units (``sigma_end`` from ``T`` on)."""
        progress = min(max(step / self.total_steps, 0.0), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.sigma_end + (self.sigma_start - self.sigma_end) * cosine

    @checked(step=COUNT)
    def __call__(
        self,
        images: Tensor,
        step: int,
        *,
        rows: Tensor | None = None,
        generator: rng.Generator = None,
    ) -> Tensor:
        """Noisy float32 images in ``[-1, 1]`` units from uint8 pixels or floats in ``[-1, 1]``,
        with the standard-normal draws from ``generator``. They are bins' left edges:
        :func:`jetblocks.dequantize` adds the uniform noise. ``rows`` (bool ``[B]``) limits
        the noise to those images (the reference's ``rgb_noise_on_image_prefix=False``
        leaves captioning rows clean)."""
        if images.dtype == torch.uint8:
            pixels = images.float()
        else:
            pixels = torch.round((images.float() + 1.0) * 127.5)
        normal = rng.randn(pixels.shape, generator=generator, like=pixels)
        sigma = torch.full((len(pixels),), self.sigma(step), device=pixels.device)
        if rows is not None:
            sigma = torch.where(rows.to(pixels.device), sigma, 0.0)
        noisy = torch.round(pixels + sigma.view(-1, *[1] * (pixels.dim() - 1)) * normal)
        return pixels_to_unit(noisy)
