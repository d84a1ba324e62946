"""Jet: a stack of ViT-conditioned affine couplings over image patches (arXiv 2412.15129).

``Jet(config)(images)`` maps images ``[B, C, H, W]`` in ``[-1, 1]`` to soft tokens
``[B, N, D]`` (see :mod:`jetblocks.latents` for the layout) and the log-det ``[B]``; the
prior on every token dim is ``N(0, 1)``. Layer ``i`` is of kind ``cycle(kinds)[i]``;
channel layers take successive ``channel_patterns`` and spatial layers successive
``spatial_patterns``, as in the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
from torch import Tensor

from jetblocks.couplings import (
    SPATIAL_PATTERNS,
    AffineCoupling,
    ChannelSplit,
    SpatialSplit,
    spatial_halves,
)
from jetblocks.flow import FlowSequence, check_backprop
from jetblocks.imageflow import ConfigDict, ImageFlow, is_int
from jetblocks.latents import patchify, unpatchify
from jetblocks.vit import ViTConditioner, check_attention_backend

KINDS = ("channels", "spatial")
CHANNEL_PATTERNS = ("random",)
_ALL_SPATIAL = SPATIAL_PATTERNS
_FIVE_KINDS = ("channels", "channels", "channels", "channels", "spatial")

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train on a CPU.
    "tiny": dict(image_size=(32, 32), channels=3, patch_size=4, depth=8, block_depth=1,
                 emb_dim=64, num_heads=4, kinds=("channels", "channels", "spatial"),
                 spatial_patterns=("checkerboard", "checkerboard-inv")),
    # 28x28 grayscale (MNIST): a 7x7 grid cannot be halved spatially, so channels only.
    "mnist": dict(image_size=(28, 28), channels=1, patch_size=4, depth=32, block_depth=1,
                  emb_dim=32, num_heads=4, kinds=("channels",), spatial_patterns=()),
    # The paper's ImageNet-64 models (reference config: 3.72 and 3.66 bpd).
    "imagenet64": dict(image_size=(64, 64), channels=3, patch_size=4, depth=32, block_depth=2,
                       emb_dim=512, num_heads=8, kinds=_FIVE_KINDS,
                       spatial_patterns=_ALL_SPATIAL),
    "imagenet64_large": dict(image_size=(64, 64), channels=3, patch_size=4, depth=64,
                             block_depth=5, emb_dim=512, num_heads=8, kinds=_FIVE_KINDS,
                             spatial_patterns=_ALL_SPATIAL),
    # The Jet inside JetFormer: 256x256 RGB, 16x16 patches (768-dim tokens), channels only.
    "jetformer_adaptor": dict(image_size=(256, 256), channels=3, patch_size=16, depth=32,
                              block_depth=4, emb_dim=512, num_heads=8, kinds=("channels",),
                              spatial_patterns=()),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class JetConfig(ConfigDict):
    """Everything that defines a Jet's architecture. Invalid combinations are refused."""

    image_size: tuple[int, int] = (32, 32)
    channels: int = 3
    patch_size: int = 4
    depth: int = 8
    block_depth: int = 1
    emb_dim: int = 64
    num_heads: int = 4
    kinds: tuple[str, ...] = ("channels", "channels", "spatial")
    channel_patterns: tuple[str, ...] = ("random",)
    spatial_patterns: tuple[str, ...] = ("checkerboard", "checkerboard-inv")
    scale_factor: float = 2.0
    seed: int = 0
    context_dim: int | None = None
    attention_backend: str = "auto"  # see jetblocks.vit: auto (fastest), sdpa, math, xformers
    backprop: str = "standard"  # see jetblocks.flow.FlowSequence: standard, checkpoint, invertible

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        for name, value in (
            ("image_size", size),
            ("kinds", self.kinds),
            ("channel_patterns", self.channel_patterns),
            ("spatial_patterns", self.spatial_patterns),
        ):
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        positive = ("channels", "patch_size", "depth", "block_depth", "emb_dim", "num_heads")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"JetConfig.{name} must be a positive int, got {value!r}")
        if len(self.image_size) != 2 or not all(is_int(s) and s >= 1 for s in self.image_size):
            raise ValueError(
                f"JetConfig.image_size must be (H, W) with positive ints, got {self.image_size}"
            )
        (height, width), p = self.image_size, self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {p}; "
                "change image_size or patch_size"
            )
        if self.token_dim % 2:
            raise ValueError(
                f"token dim D = patch_size^2 * channels = {self.token_dim} is odd, but couplings "
                "split it in halves; change patch_size or channels"
            )
        if self.emb_dim % self.num_heads:
            raise ValueError(
                f"emb_dim {self.emb_dim} is not divisible by num_heads {self.num_heads}; "
                "change emb_dim or num_heads"
            )
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ValueError(
                f"JetConfig.kinds must be a non-empty sequence of {KINDS}, got {self.kinds}"
            )
        for name, allowed in (
            ("channel_patterns", CHANNEL_PATTERNS),
            ("spatial_patterns", SPATIAL_PATTERNS),
        ):
            patterns = getattr(self, name)
            if set(patterns) - set(allowed):
                raise ValueError(f"JetConfig.{name} must be drawn from {allowed}, got {patterns}")
        if "spatial" in self.kinds and not self.spatial_patterns:
            raise ValueError("JetConfig.kinds has 'spatial' layers but spatial_patterns is empty")
        if "channels" in self.kinds and not self.channel_patterns:
            raise ValueError("JetConfig.kinds has 'channels' layers but channel_patterns is empty")
        for pattern in self.spatial_patterns if "spatial" in self.kinds else ():
            try:
                spatial_halves(pattern, self.grid)
            except ValueError as error:
                raise ValueError(f"JetConfig: {error}") from None
        scale = self.scale_factor
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (0 < scale < math.inf)
        ):
            raise ValueError(f"JetConfig.scale_factor must be positive and finite, got {scale!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise ValueError(f"JetConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.context_dim is not None and (not is_int(self.context_dim) or self.context_dim < 1):
            raise ValueError(
                f"JetConfig.context_dim must be None or a positive int, got {self.context_dim!r}"
            )
        try:
            check_attention_backend(self.attention_backend)
            check_backprop(self.backprop)
        except ValueError as error:
            raise ValueError(f"JetConfig: {error}") from None

    def layer_plan(self) -> list[tuple[str, str]]:
        """``(kind, pattern)`` of every coupling, in order."""
        kinds = itertools.cycle(self.kinds)
        patterns = {
            "channels": itertools.cycle(self.channel_patterns),
            "spatial": itertools.cycle(self.spatial_patterns),
        }
        return [(kind, next(patterns[kind])) for kind in itertools.islice(kinds, self.depth)]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> JetConfig:
        """A named configuration (``tiny``, ``mnist``, ``imagenet64``, ...), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown JetConfig preset {name!r}; expected one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


class Jet(ImageFlow):
    """The Jet flow: ``images -> (tokens, logdet)`` and ``inverse: tokens -> (images, logdet)``.

    Channel permutations are drawn from ``config.seed`` (saved as buffers); weights use
    PyTorch's global RNG like any ``nn.Module``. Every coupling starts as the identity.
    ``config.backprop`` chooses how gradients pass the couplings: ``"standard"``,
    ``"checkpoint"`` or ``"invertible"`` (memory-saving: inputs are rebuilt from outputs in the
    backward pass, see :mod:`jetblocks.memory`); it can be changed on a built model through
    ``jet.couplings.backprop``.
    """

    config_class = JetConfig

    def __init__(self, config: JetConfig) -> None:
        super().__init__()
        self.config = config
        layer_seeds = torch.randint(
            2**62,
            (config.depth,),
            generator=torch.Generator().manual_seed(config.seed),
            device="cpu",
        ).tolist()
        couplings = []
        for (kind, pattern), layer_seed in zip(config.layer_plan(), layer_seeds, strict=True):
            if kind == "channels":
                split = ChannelSplit(config.token_dim, seed=layer_seed)
            else:
                split = SpatialSplit(config.grid, config.token_dim, pattern)
            conditioner = ViTConditioner(
                d_in=config.token_dim // 2,
                d_out=config.token_dim,
                num_tokens=config.num_tokens,
                emb_dim=config.emb_dim,
                depth=config.block_depth,
                num_heads=config.num_heads,
                context_dim=config.context_dim,
                attention_backend=config.attention_backend,
            )
            couplings.append(AffineCoupling(split, conditioner, config.scale_factor))
        self.couplings = FlowSequence(couplings, backprop=config.backprop)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(N, D)``: tokens per image and dims per token."""
        return self.config.num_tokens, self.config.token_dim

    # -- the flow ---------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images ``[B, C, H, W]`` to tokens ``[B, N, D]``: the raw bijection, defined on all
        of ``R^(CHW)`` (values are not range-checked here; :meth:`encode` checks them)."""
        cfg = self.config
        self._check(x, "images", (cfg.channels, *cfg.image_size), "[B, C, H, W]")
        return self.couplings(patchify(x, cfg.patch_size), context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, N, D]`` to images ``[B, C, H, W]``, with the inverse map's log-det."""
        cfg = self.config
        self._check(y, "tokens", (cfg.num_tokens, cfg.token_dim), "[B, N, D]")
        x, logdet = self.couplings.inverse(y, context)
        return unpatchify(x, cfg.patch_size, cfg.grid), logdet


__all__ = ["PRESETS", "Jet", "JetConfig"]
