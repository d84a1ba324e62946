"""Writing image grids as PNG files (with Pillow), atomically."""

from __future__ import annotations

import os
from pathlib import Path

import einops
import torch
from torch import Tensor

from jetblocks.checkpoint import atomic_file
from jetblocks.optional import require

__all__ = [
    "GRID_FORMATS",
    "GRID_SUFFIXES",
    "MAX_GRID_PIXELS",
    "check_grid_size",
    "save_grid",
    "save_images",
    "tile",
]

# The grid's file format follows the file name: lossless PNG, or JPEG (lossy, quality 95).
GRID_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
}
GRID_SUFFIXES = tuple(GRID_FORMATS)
# The largest grid written: Pillow's default limit on the images it opens (a larger file
# would be refused as a possible decompression bomb when read back).
MAX_GRID_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def check_grid_size(count: int, ncols: int, height: int, width: int) -> None:
    """Refuse a grid of ``count`` images of ``height x width`` in ``ncols`` columns that
    would exceed :data:`MAX_GRID_PIXELS` (before anything is computed)."""
    rows = -(-count // max(ncols, 1))
    pixels = rows * height * min(count, ncols) * width
    if pixels > MAX_GRID_PIXELS:
        raise ValueError(
            f"a grid of {count:,} images of {height}x{width} has {pixels:,} pixels, more than "
            f"{MAX_GRID_PIXELS:,} (the most an image viewer or Pillow opens); ask for fewer"
        )


def tile(pixels: Tensor, ncols: int) -> Tensor:
    """uint8 images ``[B, C, H, W]`` tiled row-major into one ``[rows * H, ncols * W, C]``
    image; missing cells of the last row are mid-grey (128)."""
    padding = -len(pixels) % ncols
    pixels = torch.cat([pixels, pixels.new_full((padding, *pixels.shape[1:]), 128)])
    return einops.rearrange(pixels.cpu(), "(r k) c h w -> (r h) (k w) c", k=ncols)


def save_grid(pixels: Tensor, path: str | os.PathLike, ncols: int) -> Path:
    """Tile uint8 images ``[B, C, H, W]`` (C = 1 or 3) row-major into an image file at
    ``path`` (PNG, or JPEG for a ``.jpg``/``.jpeg`` name).

    The file is written to a temporary name beside ``path`` and renamed into place, so a
    crash never leaves a truncated file. Missing cells of the last row are mid-grey (128).
    """
    Image = require("PIL.Image", "save_grid")
    _check_pixels(pixels, "save_grid")
    if len(pixels) == 0 or ncols < 1:
        raise ValueError(
            f"save_grid needs at least one image and ncols >= 1, got {len(pixels)} "
            f"images and ncols={ncols}"
        )
    check_grid_size(len(pixels), ncols, *pixels.shape[2:])
    suffix = Path(path).suffix.lower()
    if suffix not in GRID_FORMATS:
        raise ValueError(
            f"cannot write a grid as {path}: expected a name ending in {', '.join(GRID_SUFFIXES)}"
        )
    file_format, options = GRID_FORMATS[suffix]
    image = Image.fromarray(tile(pixels, ncols).squeeze(-1).numpy())
    with atomic_file(path) as staging:
        image.save(staging, format=file_format, **options)
    return Path(path)


def _check_pixels(pixels: Tensor, caller: str) -> None:
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(
            f"{caller} expects uint8 images [B, 1 or 3, H, W], got {pixels.dtype} "
            f"{list(pixels.shape)}"
        )


def save_images(pixels: Tensor, paths: list[Path]) -> list[Path]:
    """Write uint8 images ``[B, C, H, W]`` as PNG files ``paths`` (one per image, folders
    created), each atomically. Nothing is written if any of them exists already.

    The paths are the caller's: names read from a file go through
    :func:`jetblocks.paths.plan_outputs` first.
    """
    Image = require("PIL.Image", "save_images")
    _check_pixels(pixels, "save_images")
    if len(paths) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(paths)} file names")
    taken = [path for path in paths if os.path.lexists(path)]
    if taken:
        raise FileExistsError(
            f"{len(taken)} of the {len(paths)} files exist already (first: {taken[0]}); "
            "choose an empty folder (nothing was written)"
        )
    for image, path in zip(pixels.cpu(), paths, strict=True):
        array = einops.rearrange(image, "c h w -> h w c").squeeze(-1).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as staging:
            Image.fromarray(array).save(staging, format="PNG")
    return paths
