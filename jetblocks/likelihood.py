"""Pixels, dequantization and the likelihood in bits per dimension.

uint8 pixels ``k`` live in ``[-1, 1]`` as ``x = k / 127.5 - 1``; one uint8 bin is
``1/127.5`` wide there. Uniform dequantization adds ``u ~ U[0, 1/127.5)`` per sub-pixel.
With ``z, logdet = flow(x + u)`` over ``D`` dims and a standard-normal prior:

    nll = sum_d (z_d^2 / 2 + ln(2 pi) / 2 + ln 127.5),    bpd = (nll - logdet) / (D ln 2)

where ``ln 127.5`` turns a density over ``[-1, 1]`` units into one over uint8 bins.

JetFormer (arXiv 2411.19722) replaces the prior of the first ``keep`` dims of every token
with an autoregressive model's (a GMM NLL per token, :class:`jetblocks.heads.GMMHead`); the
factored-out dims keep the standard normal. :func:`image_bits_per_dim` is that image NLL:

    nll_image = [sum_i gmm_nll_i + sum -log N(factored; 0, 1)] / (D ln 2)
                - (logdet / D - ln 127.5) / ln 2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jetblocks import rng
from jetblocks.flow import logdet_dtype
from jetblocks.validation import POSITIVE_INT, checked

__all__ = [
    "HALF_LOG_2PI",
    "PIXEL_BIN",
    "bin_centers",
    "bits_per_dim",
    "dequantize",
    "image_bits_per_dim",
    "nats_to_bits_per_dim",
    "pixels_to_unit",
    "standard_normal_log_prob",
    "to_uint8",
]

PIXEL_BIN = 1.0 / 127.5
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def pixels_to_unit(images: Tensor) -> Tensor:
    """uint8 pixels ``k`` to float32 ``k / 127.5 - 1`` (the left edge of each bin)."""
    return images.to(torch.float32) / 127.5 - 1.0


def bin_centers(images: Tensor) -> Tensor:
    """uint8 pixels ``k`` to float32 ``(k + 0.5) / 127.5 - 1``, the centre of each bin.

    The deterministic, lossless way in: :func:`to_uint8` maps anything within half a bin
    (``1/255``) of a centre back to its pixel.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"bin_centers expects uint8 pixels, got {images.dtype}")
    return pixels_to_unit(images) + 0.5 * PIXEL_BIN


def dequantize(images: Tensor, *, generator: rng.Generator = None) -> Tensor:
    """``x + u`` with ``u ~ U[0, 1/127.5)`` drawn from ``generator`` (float32).

    ``images`` are uint8 pixels (``x = k / 127.5 - 1``) or float bins' left edges in
    ``[-1, 1]`` units, such as :class:`jetblocks.NoiseCurriculum` returns (they may lie
    outside ``[-1, 1]``; :meth:`jetblocks.Jet.encode` refuses them, ``jet(x)`` takes them).
    """
    if images.dtype == torch.uint8:
        images = pixels_to_unit(images)
    elif not images.is_floating_point():
        raise ValueError(f"dequantize expects uint8 pixels or float images, got {images.dtype}")
    return images.float() + rng.rand(images.shape, generator=generator, like=images) * PIXEL_BIN


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (plus dequantization offset) back to uint8 pixels.

    Each value is clipped to the pixel range and mapped to the uint8 bin it falls in (the
    bin whose centre is nearest), the exact inverse of :func:`dequantize` and
    :func:`bin_centers`: ``to_uint8(dequantize(k)) == to_uint8(bin_centers(k)) == k``.
    """
    return torch.floor((images.float() + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over every non-batch dim, ``[B]``."""
    z = z.to(logdet_dtype(z))
    return -(0.5 * z.square() + HALF_LOG_2PI).flatten(1).sum(1)


def bits_per_dim(z: Tensor, logdet: Tensor) -> Tensor:
    """Bits per dimension ``[B]`` of the dequantized input that ``z, logdet`` came from."""
    return nats_to_bits_per_dim(-standard_normal_log_prob(z), logdet, z.shape[1:].numel())


@checked(num_dims=POSITIVE_INT)
def nats_to_bits_per_dim(latent_nll: Tensor, logdet: Tensor, num_dims: int) -> Tensor:
    """``(latent_nll - logdet + D ln 127.5) / (D ln 2)``: the pixels' bits per dimension
    ``[B]`` from the latents' NLL in nats and the flow's log-det (``D = num_dims`` pixels,
    each uint8 bin ``1/127.5`` wide in ``[-1, 1]`` units)."""
    return (latent_nll + num_dims * math.log(127.5) - logdet) / (num_dims * math.log(2))


@checked(num_dims=POSITIVE_INT)
def image_bits_per_dim(gmm_nll: Tensor, factored: Tensor, logdet: Tensor, num_dims: int) -> Tensor:
    """JetFormer's image NLL ``[B]`` in bits per pixel-dim (see the module docstring).

    ``gmm_nll``: the AR model's ``-log p`` (nats) of the kept dims, per token ``[B, N]`` or
    summed ``[B]``; ``factored``: the factored-out dims ``[B, N, D - keep]`` (may be empty);
    ``logdet``: Jet's log-det ``[B]``; ``num_dims``: ``D_px = H*W*C``. The three must agree
    on the batch size ``B``.
    """
    if logdet.dim() != 1 or gmm_nll.dim() < 1 or factored.dim() < 1:
        raise ValueError(
            f"image_bits_per_dim expects gmm_nll [B, N] or [B], factored [B, N, D - keep] and "
            f"logdet [B], got {list(gmm_nll.shape)}, {list(factored.shape)}, "
            f"{list(logdet.shape)}"
        )
    if not len(gmm_nll) == len(factored) == len(logdet):
        raise ValueError(
            f"image_bits_per_dim: batch sizes differ: gmm_nll {list(gmm_nll.shape)}, "
            f"factored {list(factored.shape)}, logdet {list(logdet.shape)}"
        )
    ar = gmm_nll.flatten(1).sum(1) if gmm_nll.dim() > 1 else gmm_nll
    prior = -standard_normal_log_prob(factored) if factored.numel() else torch.zeros_like(ar)
    return nats_to_bits_per_dim(ar.to(prior.dtype) + prior, logdet, num_dims)
