"""Blocks for multi-scale flows, and :class:`MultiScaleFlow`, composed from public blocks only.

The blocks follow the flow contract on tokens ``[B, N, D]`` (see :mod:`jetblocks.latents`):

- :class:`Logit`: ``y = logit(a + (1 - 2a) t)`` elementwise, ``t`` the pixel value rescaled
  from ``[-1, 1 + 1/127.5]`` to ``[0, 1]``; it spreads the bounded pixel range over the
  real line, as RealNVP and Glow do before their first coupling.
- :class:`Repatchify`: a change of token resolution (a "squeeze"): tokens on an ``h x w``
  grid with ``D`` dims become tokens on an ``h/f x w/f`` grid with ``f*f*D`` dims.
- :class:`FactorOut`: a flow on the first ``keep`` dims of every token; the other dims leave
  the flow at this point and go straight to the standard-normal prior of the output.
- :class:`ConvConditioner`: a residual conv net over the token grid, an
  :class:`~jetblocks.AffineCoupling` conditioner that is cheaper than a ViT on small grids.

:class:`MultiScaleFlow` composes them (RealNVP's multi-scale architecture with Jet's
couplings): after ``couplings_per_scale`` couplings, half of every token's dims are factored
out and the rest is repatchified to half the resolution for the next scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks.config import Config, PatchGrid, setting
from jetblocks.couplings import AffineCoupling, ChannelSplit
from jetblocks.flow import (
    BACKPROP_MODES,
    Flow,
    FlowSequence,
    Rebuilt,
    logdet_dtype,
    zero_logdet,
)
from jetblocks.imageflow import ImageFlow, _is_int
from jetblocks.jet import MAX_TOKEN_DIM, MAX_TOKENS, SIZE
from jetblocks.latents import merge_tokens, patchify, split_tokens, unpatchify
from jetblocks.likelihood import PIXEL_BIN
from jetblocks.validation import POSITIVE, SEED, Choice, Items, Number, Shape

__all__ = [
    "MULTISCALE_PRESETS",
    "Conjugate",
    "ConvConditioner",
    "FactorOut",
    "Logit",
    "MultiScaleConfig",
    "MultiScaleFlow",
    "Repatchify",
]


class Logit(Flow):
    """``y = log(u) - log(1 - u)`` with ``u = a + (1 - 2a) (x - low) / (high - low)``.

    Defined for ``x`` in ``[low, high]`` (default: the dequantized pixel range
    ``[-1, 1 + 1/127.5]``); per element ``log|dy/dx| = log((1 - 2a) / (high - low)) -
    log(u) - log(1 - u)``. ``alpha = a`` keeps the ends finite.
    """

    def __init__(self, alpha: float = 1e-3, low: float = -1.0, high: float = 1.0 + PIXEL_BIN):
        super().__init__()
        if not 0 < alpha < 0.5 or not low < high:
            raise ValueError(
                f"Logit needs 0 < alpha < 0.5 and low < high, got {alpha}, {low}, {high}"
            )
        self.alpha, self.low, self.high = float(alpha), float(low), float(high)

    def _log_slope(self, y: Tensor) -> Tensor:
        """``log|dy/dx|`` summed per example, from ``y`` (``log u = -softplus(-y)``,
        ``log(1 - u) = -softplus(y)``: finite wherever ``y`` is)."""
        scale = math.log((1 - 2 * self.alpha) / (self.high - self.low))
        return (scale + F.softplus(-y) + F.softplus(y)).flatten(1).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = (x.to(logdet_dtype(x)) - self.low) / (self.high - self.low)
        u = self.alpha + (1 - 2 * self.alpha) * t
        y = torch.log(u) - torch.log1p(-u)
        return y.to(x.dtype), self._log_slope(y)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        wide = y.to(logdet_dtype(y))
        t = (torch.sigmoid(wide) - self.alpha) / (1 - 2 * self.alpha)
        x = self.low + t * (self.high - self.low)
        return x.to(y.dtype), -self._log_slope(wide)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, low={self.low}, high={self.high}"


class Repatchify(Flow):
    """Tokens ``[B, h*w, D]`` on an ``h x w`` grid -> ``[B, (h/f)(w/f), f*f*D]``.

    Each ``f x f`` block of neighbouring tokens becomes one token, dims ordered (row in the
    block, column in the block, token dim): a volume-preserving permutation.
    """

    def __init__(self, grid: tuple[int, int], dim: int, factor: int = 2) -> None:
        super().__init__()
        if grid[0] % factor or grid[1] % factor:
            raise ValueError(f"Repatchify: grid {tuple(grid)} is not divisible by {factor}")
        self.grid, self.dim, self.factor = tuple(grid), dim, factor
        self.accepts = Shape(("B", grid[0] * grid[1], dim))
        self.returns = Shape(("B", grid[0] * grid[1] // factor**2, dim * factor**2))

    @property
    def output_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.factor, self.grid[1] // self.factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.accepts.check(x, f"Repatchify on a {self.grid[0]}x{self.grid[1]} grid")
        h, w = self.output_grid
        y = einops.rearrange(x, "b (h p w q) c -> b (h w) (p q c)", h=h, w=w, p=self.factor)
        return y, zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.returns.check(y, "Repatchify.inverse")
        h, w = self.output_grid
        x = einops.rearrange(
            y, "b (h w) (p q c) -> b (h p w q) c", h=h, w=w, p=self.factor, q=self.factor
        )
        return x, zero_logdet(y)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.dim}, factor={self.factor}"


class Conjugate(Flow):
    """``layout^-1(flow(layout(x)))``: ``flow`` run on a rearrangement of the tokens.

    ``layout`` is a volume-preserving flow without parameters (a :class:`Repatchify`), so
    the log-det is ``flow``'s. Its layers (:meth:`leaves`) are ``flow``'s, each conjugated
    the same way: memory-saving backprop walks them one by one.
    """

    def __init__(self, layout: Flow, flow: Flow) -> None:
        super().__init__()
        self.layout, self.flow = layout, flow

    def _there(self, x: Tensor) -> Tensor:
        return self.layout(x)[0]

    def _back(self, y: Tensor) -> Tensor:
        return self.layout.inverse(y)[0]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = self.flow(self._there(x), context)
        return self._back(y), logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet = self.flow.inverse(self._there(y), context)
        return self._back(x), logdet

    def rebuild_input(
        self, y: Tensor, context: Tensor | None = None, inverse: bool = False
    ) -> Rebuilt:
        inner = self.flow.rebuild_input(self._there(y), context, inverse)

        def join(*parts: Tensor) -> Tensor:
            return self._back(inner.join(*parts))

        return Rebuilt(inner.parts, join, self._back(inner.output), inner.logdet)

    def leaves(self) -> list[Flow]:
        return [Conjugate(self.layout, leaf) for leaf in self.flow.leaves()]


class FactorOut(Flow):
    """``flow`` on the first ``keep`` dims of every token; the rest pass unchanged.

    The passed dims leave the flow here: nothing after this block transforms them, so their
    log-density is the prior's (a standard normal on the output, as for every output dim).
    ``flow`` maps ``[B, N, keep]`` to the same shape, and so does each of its layers
    (:meth:`Flow.leaves`; a change of layout inside goes in a :class:`Conjugate`).
    """

    def __init__(self, flow: Flow, keep: int) -> None:
        super().__init__()
        self.flow, self.keep = flow, keep

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, rest = split_tokens(x, self.keep)
        y, logdet = self.flow(kept, context)
        return merge_tokens(y, rest), logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, rest = split_tokens(y, self.keep)
        x, logdet = self.flow.inverse(kept, context)
        return merge_tokens(x, rest), logdet

    def rebuild_input(
        self, y: Tensor, context: Tensor | None = None, inverse: bool = False
    ) -> Rebuilt:
        """The inner flow's rebuild on the kept dims; the passed dims are a part of their own."""
        kept, rest = split_tokens(y, self.keep)
        inner = self.flow.rebuild_input(kept, context, inverse)
        rest = rest.detach().requires_grad_()

        def join(*parts: Tensor) -> Tensor:
            return merge_tokens(inner.join(*parts[:-1]), parts[-1])

        return Rebuilt((*inner.parts, rest), join, merge_tokens(inner.output, rest), inner.logdet)

    def leaves(self) -> list[Flow]:
        return [FactorOut(leaf, self.keep) for leaf in self.flow.leaves()]

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


class ConvConditioner(nn.Module):
    """``[B, h*w, d_in] -> [B, h*w, d_out]``: 3x3 conv in, ``blocks`` residual blocks
    (GELU, 3x3 conv, GELU, 3x3 conv), GELU, a zero-initialised 3x3 conv out (so the coupling
    it drives starts as the identity)."""

    def __init__(self, grid: tuple[int, int], d_in: int, d_out: int, width: int, blocks: int):
        super().__init__()
        self.grid = tuple(grid)
        self.stem = nn.Conv2d(d_in, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.GELU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(width, width, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.head = nn.Conv2d(width, d_out, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(einops.rearrange(x, "b (h w) c -> b c h w", h=self.grid[0]))
        for block in self.blocks:
            h = h + block(h)
        out = self.head(F.gelu(h))
        return einops.rearrange(out, "b c h w -> b (h w) c")


MULTISCALE_PRESETS: dict[str, dict[str, Any]] = {
    # 28x28 grayscale: 14x14x4 -> 7x7x8 -> 7x7x4 tokens over three scales.
    "mnist-multiscale": dict(image_size=(28, 28), channels=1, patch_size=2, scales=3),
    # 32x32 RGB: 16x16x12 -> 8x8x24 -> 4x4x48.
    "photo-multiscale": dict(image_size=(32, 32), channels=3, patch_size=2, scales=3),
}


@dataclasses.dataclass(frozen=True)
class MultiScaleConfig(Config, PatchGrid):
    """A multi-scale flow: patchify, logit, then ``scales`` stages of couplings where each
    stage but the last factors out half of every token's dims and repatchifies the rest to
    half the resolution (when the grid is even)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = MULTISCALE_PRESETS

    image_size: tuple[int, int] = setting(
        (28, 28), Items(SIZE, length=2), "image height and width (an int: square)"
    )
    channels: int = setting(1, Number(int, low=1, high=1024), "image channels")
    patch_size: int = setting(2, Number(int, low=1, high=1024), "side of a token's patch")
    scales: int = setting(3, Number(int, low=1, high=32), "number of scales")
    couplings_per_scale: int = setting(4, Number(int, low=1, high=1024), "couplings per scale")
    width: int = setting(64, SIZE, "channels of the conv conditioners")
    blocks: int = setting(1, Number(int, low=0, high=1024), "residual blocks per conditioner")
    scale_factor: float = setting(2.0, POSITIVE, "the coupling scale's bound")
    logit_alpha: float = setting(1e-3, Number(float, low=0, high=0.5, open_low=True))
    seed: int = setting(0, SEED, "seed of the channel permutations")
    backprop: str = setting(
        "standard", Choice(BACKPROP_MODES), "see jetblocks.flow.FlowSequence", runtime=True
    )
    model: str = setting(
        "multiscale", Choice(("multiscale",)), "the model class a saved config names"
    )

    def __post_init__(self) -> None:
        if _is_int(self.image_size):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        super().__post_init__()

    def validate(self) -> None:
        self.check_patch_grid(MAX_TOKENS, MAX_TOKEN_DIM)
        if self.logit_alpha == 0.5:
            raise ValueError("MultiScaleConfig.logit_alpha must be below 0.5, got 0.5")
        dim = self.token_dim
        for scale in range(self.scales):
            if dim % 2 or (scale < self.scales - 1 and dim < 2):
                raise ValueError(
                    f"MultiScaleConfig: scale {scale + 1} has tokens of odd dim "
                    f"{dim}; use fewer scales or another patch_size"
                )
            dim = dim // 2 * (4 if self._halves(scale) else 1)

    def _halves(self, scale: int) -> bool:
        """Whether the grid is repatchified after ``scale`` (not the last, grid even)."""
        grid = self.grid_at(scale)
        return scale < self.scales - 1 and grid[0] % 2 == 0 and grid[1] % 2 == 0

    def grid_at(self, scale: int) -> tuple[int, int]:
        """The token grid of ``scale`` (``grid`` at scale 0)."""
        h, w = self.grid
        for earlier in range(scale):
            if self._halves(earlier):
                h, w = h // 2, w // 2
        return h, w


class MultiScaleFlow(ImageFlow):
    """Images -> tokens ``[B, N, D]`` (``N``, ``D`` of the first scale) through
    ``Logit`` and the scales of couplings (see :class:`MultiScaleConfig`); standard-normal
    prior on every output dim. The latent API, checkpoints and training are Jet's."""

    config_class = MultiScaleConfig

    def __init__(self, config: MultiScaleConfig) -> None:
        super().__init__()
        self.config = config
        count = config.scales * config.couplings_per_scale
        generator = torch.Generator().manual_seed(config.seed)
        seeds = iter(torch.randint(2**62, (count,), generator=generator, device="cpu").tolist())
        scales = self._scale(0, config.token_dim, seeds)
        self.flow = FlowSequence([Logit(config.logit_alpha), scales], backprop=config.backprop)

    def _scale(self, scale: int, dim: int, seeds) -> Flow:
        """The couplings of ``scale`` on ``dim``-dim tokens, then the later scales on half."""
        cfg, grid = self.config, self.config.grid_at(scale)
        couplings: list[Flow] = [
            AffineCoupling(
                ChannelSplit(dim, seed=next(seeds)),
                ConvConditioner(grid, dim // 2, dim, cfg.width, cfg.blocks),
                cfg.scale_factor,
            )
            for _ in range(cfg.couplings_per_scale)
        ]
        if scale < cfg.scales - 1:
            keep = dim // 2
            if cfg._halves(scale):
                squeeze = Repatchify(grid, keep)
                inner = Conjugate(squeeze, self._scale(scale + 1, 4 * keep, seeds))
            else:
                inner = self._scale(scale + 1, keep, seeds)
            couplings.append(FactorOut(inner, keep))
        return FlowSequence(couplings)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.num_tokens, self.config.token_dim

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images ``[B, C, H, W]`` (values in the dequantized pixel range) to tokens."""
        cfg = self.config
        self._check(x, "images", (cfg.channels, *cfg.image_size), "[B, C, H, W]")
        return self.flow(patchify(x, cfg.patch_size), context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        self._check(y, "tokens", (cfg.num_tokens, cfg.token_dim), "[B, N, D]")
        x, logdet = self.flow.inverse(y, context)
        return unpatchify(x, cfg.patch_size, cfg.grid), logdet
