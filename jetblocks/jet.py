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
from typing import Any, ClassVar

import torch
from torch import Tensor

from jetblocks.config import Config, PatchGrid, setting
from jetblocks.couplings import (
    SPATIAL_PATTERNS,
    AffineCoupling,
    ChannelSplit,
    SpatialSplit,
    spatial_halves,
)
from jetblocks.flow import BACKPROP_MODES, FlowSequence
from jetblocks.imageflow import ImageFlow, _is_int
from jetblocks.latents import patchify, unpatchify
from jetblocks.validation import POSITIVE, SEED, Choice, Items, Number
from jetblocks.vit import ATTENTION_BACKENDS, ViTConditioner

__all__ = ["PRESETS", "Jet", "JetConfig"]

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


MAX_TOKENS = 2**16  # a 256 x 256 grid: 1024 x 1024 images in 4 x 4 patches
MAX_TOKEN_DIM = 2**16
SIZE = Number(int, low=1, high=2**16)


@dataclasses.dataclass(frozen=True)
class JetConfig(Config, PatchGrid):
    """Everything that defines a Jet's architecture. Invalid combinations are refused."""

    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    image_size: tuple[int, int] = setting(
        (32, 32), Items(SIZE, length=2), "image height and width (an int: square)"
    )
    channels: int = setting(3, Number(int, low=1, high=1024), "image channels")
    patch_size: int = setting(4, Number(int, low=1, high=1024), "side of a token's patch")
    depth: int = setting(8, Number(int, low=1, high=4096), "number of couplings")
    block_depth: int = setting(1, Number(int, low=1, high=1024), "ViT blocks per coupling")
    emb_dim: int = setting(64, SIZE, "ViT width")
    num_heads: int = setting(4, SIZE, "attention heads")
    kinds: tuple[str, ...] = setting(
        ("channels", "channels", "spatial"),
        Items(Choice(KINDS), min_length=1),
        "coupling kinds, cycled over the layers",
    )
    channel_patterns: tuple[str, ...] = setting(("random",), Items(Choice(CHANNEL_PATTERNS)))
    spatial_patterns: tuple[str, ...] = setting(
        ("checkerboard", "checkerboard-inv"), Items(Choice(SPATIAL_PATTERNS))
    )
    scale_factor: float = setting(2.0, POSITIVE, "the coupling scale's bound")
    seed: int = setting(0, SEED, "seed of the channel permutations")
    context_dim: int | None = setting(
        None, Number(int, low=1, high=2**16, optional=True), "width of a context to attend to"
    )
    attention_backend: str = setting(
        "auto", Choice(ATTENTION_BACKENDS), "see jetblocks.vit", runtime=True
    )
    backprop: str = setting(
        "standard", Choice(BACKPROP_MODES), "see jetblocks.flow.FlowSequence", runtime=True
    )
    model: str = setting("jet", Choice(("jet",)), "the model class a saved config names")

    def __post_init__(self) -> None:
        if _is_int(self.image_size):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        super().__post_init__()

    def validate(self) -> None:
        self.check_patch_grid(MAX_TOKENS, MAX_TOKEN_DIM)
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
        for kind, patterns in (("spatial", "spatial_patterns"), ("channels", "channel_patterns")):
            if kind in self.kinds and not getattr(self, patterns):
                raise ValueError(f"JetConfig.kinds has '{kind}' layers but {patterns} is empty")
        for pattern in self.spatial_patterns if "spatial" in self.kinds else ():
            try:
                spatial_halves(pattern, self.grid)
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
