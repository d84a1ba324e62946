"""Token layout: images ``[B, C, H, W]`` <-> tokens ``[B, N, D]``, and factoring out dims.

With patch size ``p``, ``N = (H/p)(W/p)`` tokens in raster order and ``D = p*p*C`` dims per
token ordered (row in patch, column in patch, channel): the reference's layout, so weights
and tokens port to and from it.
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from jetblocks.validation import COUNT, POSITIVE_INT, checked

__all__ = [
    "merge_tokens",
    "patchify",
    "split_tokens",
    "unpatchify",
]


@checked(patch_size=POSITIVE_INT)
def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``."""
    return einops.rearrange(
        images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size
    )


@checked(patch_size=POSITIVE_INT)
def unpatchify(tokens: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """``[B, nh*nw, p*p*C]`` -> ``[B, C, nh*p, nw*p]``, the inverse of :func:`patchify`."""
    return einops.rearrange(
        tokens,
        "b (h w) (p q c) -> b c (h p) (w q)",
        h=grid[0],
        w=grid[1],
        p=patch_size,
        q=patch_size,
    )


@checked(keep=COUNT)
def split_tokens(tokens: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Factor out: the first ``keep`` of every token's ``D`` dims, and the other ``D - keep``."""
    dim = tokens.shape[-1]
    if keep > dim:
        raise ValueError(
            f"split_tokens: keep must be in [0, {dim}] for tokens with D={dim}, got {keep}"
        )
    return tokens[..., :keep], tokens[..., keep:]


def merge_tokens(kept: Tensor, rest: Tensor) -> Tensor:
    """The inverse of :func:`split_tokens`: concatenate ``kept`` and ``rest`` per token."""
    if kept.shape[:-1] != rest.shape[:-1]:
        raise ValueError(
            f"kept and rest must agree on all but the last dim, got {list(kept.shape)} "
            f"and {list(rest.shape)}"
        )
    return torch.cat([kept, rest], dim=-1)
