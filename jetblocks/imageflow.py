"""What every image flow offers on top of the flow contract: the latent API and checkpoints.

An :class:`ImageFlow` maps images ``[B, C, H, W]`` in ``[-1, 1]`` to latents of shape
``[B, *latent_shape]`` with a standard-normal prior (``forward``/``inverse``, the raw
bijection) and inherits the checked public entry points: ``encode``/``decode`` (lossless
bin-centre entry for uint8 pixels), ``sample``, ``log_prob``, ``bits_per_dim``,
``save_pretrained``/``from_pretrained`` (:class:`~jetblocks.pretrained.Pretrained`). A
subclass sets ``config_class`` (a :class:`~jetblocks.config.Config` with ``channels`` and
``image_size``, and a ``model`` field naming the class in saved configs) and
``latent_shape``.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import torch
from torch import Tensor

from jetblocks import rng
from jetblocks.acceleration import accelerate_by_default
from jetblocks.config import Config, PatchGrid
from jetblocks.flow import Flow
from jetblocks.likelihood import (
    PIXEL_BIN,
    bin_centers,
    bits_per_dim,
    dequantize,
    standard_normal_log_prob,
)
from jetblocks.pretrained import Pretrained
from jetblocks.validation import COUNT, TEMPERATURE, Shape, checked

__all__ = ["CompiledFlow", "ImageFlow"]


class ImageFlow(Flow, Pretrained):
    """Base class of flows over images with a standard-normal prior (see the module doc)."""

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one image's latent (the output of ``forward`` less the batch dim)."""

    # -- the latent API ------------------------------------------------------------------------
    def encode(
        self,
        images: Tensor,
        context: Tensor | None = None,
        *,
        noise: bool = False,
        generator: rng.Generator = None,
    ) -> tuple[Tensor, Tensor]:
        """Images to soft tokens: ``(tokens [B, N, D], logdet [B])``.

        uint8 pixels ``k`` go to the centre of their bin, ``(k + 0.5) / 127.5 - 1``, so
        ``to_uint8(decode(encode(pixels))) == pixels`` holds whenever the flow's round-trip
        error is below half a bin; with ``noise=True`` they get uniform dequantization noise
        from ``generator`` instead (what :meth:`log_prob` and :meth:`bits_per_dim` use).
        Float images must already lie in ``[-1, 1 + 1/127.5]``.
        """
        return self(self._to_unit(images, noise, generator), _checked_context(context))

    def decode(self, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        """Soft tokens back to float images (``jetblocks.to_uint8`` turns them into pixels)."""
        _check_finite(tokens, "tokens")
        return self.inverse(tokens, _checked_context(context))[0]

    @checked(n=COUNT, temperature=TEMPERATURE)
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        context: Tensor | None = None,
        *,
        generator: rng.Generator = None,
    ) -> Tensor:
        """``n`` images decoded from ``z ~ N(0, temperature^2 I)``."""
        weight = next(self.parameters())
        z = rng.randn((n, *self.latent_shape), generator=generator, like=weight)
        return self.decode(temperature * z, context)

    def log_prob(
        self,
        images: Tensor,
        context: Tensor | None = None,
        *,
        generator: rng.Generator = None,
    ) -> Tensor:
        """Log-density ``[B]`` (nats) of the uniformly dequantized images in ``[-1, 1]`` units."""
        z, logdet = self.encode(images, context, noise=True, generator=generator)
        return standard_normal_log_prob(z) + logdet

    def bits_per_dim(
        self,
        images: Tensor,
        context: Tensor | None = None,
        *,
        generator: rng.Generator = None,
    ) -> Tensor:
        """Bits per dimension ``[B]`` (uint8 input is uniformly dequantized first)."""
        return bits_per_dim(*self.encode(images, context, noise=True, generator=generator))

    def compiled(self, *, backend: str = "inductor") -> CompiledFlow:
        r"""This flow's :meth:`encode` and :meth:`decode` compiled for inference with the
        weights frozen as they are now (see :class:`CompiledFlow`). On a CPU the flow is first
        :func:`~jetblocks.acceleration.accelerate`\ d for inference, in place (same
        weights; ``JETBLOCKS_ACCELERATE=0`` turns it off)."""
        device = next(self.parameters()).device
        return CompiledFlow(accelerate_by_default(self, device, inference=True), backend=backend)

    def frozen(self, *, backend: str = "inductor") -> CompiledFlow:
        """Deprecated name of :meth:`compiled`."""
        warnings.warn(
            "ImageFlow.frozen() is now compiled() (compiled, with the weights frozen)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.compiled(backend=backend)

    def _check(self, x: Tensor, what: str, event_shape: tuple[int, ...], layout: str) -> None:
        """Refuse a tensor of the wrong rank, shape, device or dtype (metadata only: no
        device sync)."""
        self._check_placement(x, what, event_shape, layout)
        dtype = next(self.parameters()).dtype
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != dtype:
            model = type(self).__name__
            raise ValueError(
                f"{what} must be a floating-point tensor of this {model}'s dtype {dtype}, got "
                f"{x.dtype}; convert the input (.to({dtype})) or the model (.to(dtype))"
            )

    def _check_placement(
        self, x: Tensor, what: str, event_shape: tuple[int, ...], layout: str
    ) -> None:
        """Refuse a tensor of the wrong rank or shape, or on another device than the weights."""
        Shape(("B", *event_shape)).check(x, type(self).__name__, f"{what} ({layout})")
        device = next(self.parameters()).device
        if x.device != device:
            model = type(self).__name__
            raise ValueError(
                f"{what} are on {x.device} but this {model}'s weights are on {device}; move "
                f"the input (.to({str(device)!r})) or the model"
            )

    def _to_unit(self, images: Tensor, noise: bool, generator: rng.Generator) -> Tensor:
        cfg = self.config
        self._check_placement(images, "images", (cfg.channels, *cfg.image_size), "[B, C, H, W]")
        dtype = next(self.parameters()).dtype
        if images.dtype == torch.uint8:
            if noise:
                return dequantize(images, generator=generator).to(dtype)
            if generator is not None:
                raise ValueError("encode: a generator is only used with noise=True")
            return bin_centers(images).to(dtype)
        if not images.is_floating_point():
            raise ValueError(f"images must be a uint8 or floating-point tensor, got {images.dtype}")
        _check_finite(images, "images")
        if images.numel() and not torch.compiler.is_compiling():
            low, high = images.min().item(), images.max().item()
            if low < -1.0 or high > 1.0 + PIXEL_BIN:
                raise ValueError(
                    f"float images must lie in [-1, 1] (+{PIXEL_BIN:.4f} of dequantization), "
                    f"got values in [{low:.4g}, {high:.4g}]; pass uint8 pixels or rescale"
                )
        return images


class CompiledFlow:
    """Fast inference: a flow's ``encode`` / ``decode`` as ``torch.compile`` graphs with
    Inductor's *freezing*: the weights become constants, so the compiler folds what depends
    on them only (and pre-packs the weights of plain ``nn.Linear`` layers; accelerated
    layers' float32 oneDNN products run as they are), and the graphs fuse
    the layer norms, GELUs and bias adds that eager mode runs one by one.

    The weights are a snapshot: after they change (training, ``load_state_dict``) a call
    raises ``RuntimeError``; freeze again. Inputs are checked as the flow's own ``encode``
    and ``decode`` check them; the first call of each shape compiles (tens of seconds).
    """

    def __init__(self, flow: ImageFlow, *, backend: str = "inductor") -> None:
        self.flow = flow.eval()
        options = {"freezing": True} if backend == "inductor" else None
        self._forward = torch.compile(flow, backend=backend, options=options)
        self._inverse = torch.compile(flow.inverse, backend=backend, options=options)
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[int]:
        return [t._version for t in (*self.flow.parameters(), *self.flow.buffers())]

    def _check_weights(self) -> None:
        if self._weight_versions() != self._versions:
            raise RuntimeError(
                "the flow's weights changed after freezing; call flow.compiled() again"
            )

    @torch.no_grad()
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The raw bijection, as ``flow(x, context)`` (no input checks)."""
        self._check_weights()
        return self._forward(x, context)

    @torch.no_grad()
    def inverse(self, tokens: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The raw inverse, as ``flow.inverse(tokens, context)`` (no input checks)."""
        self._check_weights()
        return self._inverse(tokens, context)

    def encode(
        self,
        images: Tensor,
        context: Tensor | None = None,
        *,
        noise: bool = False,
        generator: rng.Generator = None,
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`ImageFlow.encode`."""
        x = self.flow._to_unit(images, noise, generator)
        return self.forward(x, _checked_context(context))

    def decode(self, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        """As :meth:`ImageFlow.decode`."""
        _check_finite(tokens, "tokens")
        return self.inverse(tokens, _checked_context(context))[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(x: Tensor, what: str) -> None:
    """Refuse NaN or inf at a public entry point (one device sync; skipped when compiling)."""
    if isinstance(x, Tensor) and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
        raise ValueError(f"{what} contain non-finite values (NaN or inf)")


def _checked_context(context: Tensor | None) -> Tensor | None:
    if context is not None:
        _check_finite(context, "context")
    return context


class _ConfigDict(Config, PatchGrid):
    """What ``ConfigDict`` was: dict/JSON round trips and the patch grid."""


def __getattr__(name: str) -> Any:
    if name == "ConfigDict":
        warnings.warn(
            "jetblocks.imageflow.ConfigDict is deprecated: derive a config from "
            "jetblocks.config.Config (and PatchGrid for image_size, channels and patch_size)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _ConfigDict
    if name == "FrozenFlow":
        warnings.warn("FrozenFlow is now CompiledFlow", DeprecationWarning, stacklevel=2)
        return CompiledFlow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
