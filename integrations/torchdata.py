"""Resumable, deterministic, rank-sharded image batches built on ``torchdata.nodes``.

:func:`image_loader` returns a :class:`torchdata.nodes.Loader` yielding
``{"image": uint8 [B, C, H, W], "label": int64 [B]}``. Its ``state_dict()`` records where
iteration is (epoch, batch within the epoch, and whatever prefetching threads read ahead), so
``load_state_dict()`` on a freshly built loader of the same arguments continues with exactly
the batches an uninterrupted run would have produced.

Sharding: epoch ``e`` visits the permutation ``numpy.random.default_rng([seed, e])`` of the
source (identity without shuffling), cut into global batches of ``batch_size * world_size``.
Rank ``r`` takes items ``[r * m // W, (r + 1) * m // W)`` of each global batch of ``m`` items
and ``W`` ranks, i.e. the ``r``-th block of ``batch_size`` for full batches. Concatenating the
ranks' batches in rank order therefore gives exactly the batch of a one-process loader with
``batch_size * world_size``, in the same order; every rank yields the same number of batches.

Augmentation: with ``flip=True`` each image is mirrored left-right with probability 1/2,
decided by :func:`flip_bits` from ``seed``, the epoch and the source index alone, so flips too
are the same for any ``num_workers``, after resuming, and when the batch is split over ranks.

Sources (see :mod:`jetblocks.integrations.datasets`) are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jetblocks.optional import missing_dependency

try:
    from torchdata.nodes import BaseNode, Loader, Mapper, ParallelMapper, Prefetcher
except ModuleNotFoundError as error:
    raise missing_dependency(error, "jetblocks.integrations.torchdata") from None

from jetblocks.integrations.datasets import (
    ArraySource,
    DataError,
    ImageFolder,
    ImageSource,
    RestrictedUnpickler,
    Subset,
    UnsafePickleError,
    holdout,
    load_batch,
    load_cifar10,
    load_npz,
    open_source,
)

__all__ = [
    "ArraySource",
    "DataError",
    "ImageFolder",
    "ImageSource",
    "RestrictedUnpickler",
    "ShardedBatchSampler",
    "Subset",
    "UnsafePickleError",
    "flip_bits",
    "holdout",
    "image_loader",
    "load_batch",
    "load_cifar10",
    "load_flipped_batch",
    "load_npz",
    "open_source",
]

_FLIP_STREAM = 0x666C6970  # "flip": keeps flip bits apart from the epoch's permutation stream
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def flip_bits(seed: int, epoch: int, indices: Sequence[int]) -> np.ndarray:
    """Whether each source item of ``indices`` is mirrored in ``epoch`` (bool ``[len(indices)]``).

    A per-``(seed, epoch)`` 64-bit key from :class:`numpy.random.SeedSequence`, offset by
    ``index`` times the golden-ratio constant and hashed with SplitMix64's finalizer; the top
    bit decides. Fair, independent across items and epochs, and a function of its arguments
    only (no global RNG, no thread or worker state).
    """
    key = np.random.SeedSequence([seed, epoch, _FLIP_STREAM]).generate_state(1, np.uint64)
    z = key + np.asarray(indices, dtype=np.uint64).reshape(-1) * _GOLDEN  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(63)).astype(bool)


def load_flipped_batch(
    source: ImageSource, seed: int, item: tuple[int, Sequence[int]]
) -> dict[str, Tensor]:
    """:func:`load_batch` of ``item = (epoch, indices)`` with the images picked by
    :func:`flip_bits` mirrored along their width; every other field is left as loaded."""
    epoch, indices = item
    batch = load_batch(source, indices)
    image = batch["image"]
    chosen = torch.from_numpy(flip_bits(seed, epoch, indices)).view(-1, 1, 1, 1)
    return {**batch, "image": torch.where(chosen, image.flip(-1), image)}


class ShardedBatchSampler(BaseNode[Any]):
    """Yields this rank's list of source indices for each batch, epoch after epoch.

    With ``with_epoch`` it yields ``(epoch, indices)`` instead, for per-epoch augmentation.

    State is ``{"epoch", "batch"}`` (the next batch to yield), so resuming costs nothing.
    Stops after ``epochs`` epochs, or never when ``epochs`` is None; a reset without a state
    starts again at epoch 0.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        with_epoch: bool = False,
    ):
        super().__init__()
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(
                f"need batch_size >= 1, 0 <= rank < world_size and seed >= 0, got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}, seed={seed}"
            )
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.with_epoch = with_epoch
        self.global_batch = batch_size * world_size
        full, rest = divmod(size, self.global_batch)
        self.batches_per_epoch = full if drop_last or not rest else full + 1
        if self.batches_per_epoch == 0:
            raise DataError(
                f"no batches per epoch: {size} images, global batch {self.global_batch} "
                f"(batch_size x world_size), drop_last={drop_last}"
            )
        self._order_epoch, self._order = -1, np.arange(0)

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        state = initial_state or {"epoch": 0, "batch": 0}
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def order(self, epoch: int) -> np.ndarray:
        """The global visiting order of the source in ``epoch``."""
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            self._order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.size)
                if self.shuffle
                else np.arange(self.size)
            )
        return self._order

    def next(self) -> list[int] | tuple[int, list[int]]:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        start = self.batch * self.global_batch
        count = min(self.global_batch, self.size - start)
        first = start + self.rank * count // self.world_size
        last = start + (self.rank + 1) * count // self.world_size
        epoch, indices = self.epoch, self.order(self.epoch)[first:last].tolist()
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return (epoch, indices) if self.with_epoch else indices

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}


def image_loader(
    source: ImageSource,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    epochs: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    flip: bool = False,
) -> Loader:
    """A resumable :class:`~torchdata.nodes.Loader` of ``source``'s ``{"image", "label"}`` batches.

    ``batch_size`` is per rank. One pass over the loader runs ``epochs`` epochs (forever when
    None). Without ``drop_last`` the last global batch of each epoch may be short and is
    split as evenly as possible over ranks (so a rank's batch may even be empty).
    ``num_workers > 0`` loads batches in that many threads, in order, with ``prefetch``
    batches read ahead; with 0 everything runs in the calling thread. Batches depend only on
    ``seed``, epoch and position, never on ``num_workers``. A saved state must be loaded into
    a loader built with the same arguments, except that a positive ``num_workers`` and
    ``prefetch`` may change (0 and positive ``num_workers`` nest their states differently).

    ``flip``: mirror each image left-right with probability 1/2 (train-time augmentation, as
    the reference ImageNet train presets' ``flip_lr``); the bits follow ``seed``, epoch and
    source index only (see :func:`flip_bits`), and labels and other fields are untouched.
    """
    if num_workers < 0 or prefetch < 1:
        raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
    sampler = ShardedBatchSampler(
        len(source),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        epochs=epochs,
        with_epoch=flip,
    )
    load = (
        functools.partial(load_flipped_batch, source, seed)
        if flip
        else functools.partial(load_batch, source)
    )
    if num_workers == 0:
        return Loader(Mapper(sampler, load))
    node = ParallelMapper(sampler, load, num_workers=num_workers, method="thread")
    return Loader(Prefetcher(node, prefetch_factor=prefetch))
