"""Writing image grids as PNG files (with Pillow), atomically."""

from __future__ import annotations

import os
from pathlib import Path

import einops
import torch
from torch import Tensor

from jetblocks.checkpoint import atomic_file
from jetblocks.extras import require

# The grid's file format follows the file name: lossless PNG, or JPEG (lossy, quality 95).
GRID_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
}
GRID_SUFFIXES = tuple(GRID_FORMATS)


def save_grid(pixels: Tensor, path: str | os.PathLike, ncols: int) -> Path:
    """Tile uint8 images ``[B, C, H, W]`` (C = 1 or 3) row-major into an image file at
    ``path`` (PNG, or JPEG for a ``.jpg``/``.jpeg`` name).

    The file is written to a temporary name beside ``path`` and renamed into place, so a
    crash never leaves a truncated file. Missing cells of the last row are black.
    """
    Image = require("PIL.Image", "save_grid")
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(
            f"save_grid expects uint8 images [B, 1 or 3, H, W], got {pixels.dtype} "
            f"{list(pixels.shape)}"
        )
    if len(pixels) == 0 or ncols < 1:
        raise ValueError(
            f"save_grid needs at least one image and ncols >= 1, got {len(pixels)} "
            f"images and ncols={ncols}"
        )
    suffix = Path(path).suffix.lower()
    if suffix not in GRID_FORMATS:
        raise ValueError(
            f"cannot write a grid as {path}: expected a name ending in {', '.join(GRID_SUFFIXES)}"
        )
    file_format, options = GRID_FORMATS[suffix]
    padding = -len(pixels) % ncols
    pixels = torch.cat([pixels, pixels.new_zeros(padding, *pixels.shape[1:])])
    grid = einops.rearrange(pixels.cpu(), "(r k) c h w -> (r h) (k w) c", k=ncols)
    image = Image.fromarray(grid.squeeze(-1).numpy())
    with atomic_file(path) as staging:
        image.save(staging, format=file_format, **options)
    return Path(path)
