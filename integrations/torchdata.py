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

Workers: with ``num_workers > 0`` batches of an image folder are decoded, cropped and
resized in that many worker processes (in order, so batches are the same for any count);
in-memory sources use threads, which need no copy of the arrays.

Shards (:mod:`jetblocks.integrations.shards`) are a stream rather than a map-style source:
:func:`shard_loader` reads them through a :class:`ShardStream` (shards split over ranks, a
seeded shuffle buffer, exact resume) and decodes images in worker processes.

Sources (see :mod:`jetblocks.integrations.datasets`) are re-exported here.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jetblocks.optional import missing_dependency

try:
    from torchdata.nodes import (
        BaseNode,
        Batcher,
        Loader,
        Mapper,
        ParallelMapper,
        Prefetcher,
        Unbatcher,
    )
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
)
from jetblocks.integrations.datasets import open_source as open_image_source
from jetblocks.integrations.shards import (
    ShardSet,
    decode_sample,
    is_shard_pattern,
    read_sample,
    read_samples,
)
from jetblocks.validation import COUNT, Items

__all__ = [
    "ArraySource",
    "DataError",
    "ImageFolder",
    "ImageSource",
    "RestrictedUnpickler",
    "ShardSet",
    "ShardStream",
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
    "shard_loader",
]

_FLIP_STREAM = 0x666C6970  # "flip": keeps flip bits apart from the epoch's permutation stream
_SHUFFLE_STREAM = 0x73687566  # "shuf": the shard stream's shuffle buffer
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def open_source(spec: str, split: str, **options: Any) -> ImageSource | ShardSet:
    """The ``split`` of ``--data``: a :class:`ShardSet` for tar shards (``.tar`` with
    braces and a ``{split}``, see :mod:`jetblocks.integrations.shards`), else the image
    source :func:`jetblocks.integrations.datasets.open_source` opens with ``options``."""
    if not is_shard_pattern(spec):
        return open_image_source(spec, split, **options)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return ShardSet.open(spec, split, options.get("image_size"), options.get("channels"))


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
    ``num_workers > 0`` loads batches in that many worker processes (threads for in-memory
    arrays), in order, with ``prefetch``
    batches read ahead; with 0 everything runs in the calling thread. Batches depend only on
    ``seed``, epoch and position, never on ``num_workers``. A saved state must be loaded into
    a loader built with the same arguments, except that a positive ``num_workers`` and
    ``prefetch`` may change (0 and positive ``num_workers`` nest their states differently).

    ``flip``: mirror each image left-right with probability 1/2 (train-time augmentation, as
    the reference ImageNet train presets' ``flip_lr``); the bits follow ``seed``, epoch and
    source index only (see :func:`flip_bits`), and labels and other fields are untouched.
    """
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
    return Loader(_parallel(sampler, load, num_workers, prefetch, _decodes_files(source)))


def _decodes_files(source: ImageSource) -> bool:
    """Whether reading ``source`` decodes image files (worth a process), not arrays."""
    while isinstance(source, Subset):
        source = source.source
    return not isinstance(source, ArraySource)


def _freeze_inherited_objects() -> None:
    """In a forked child (a worker): never collect the objects copied from the parent. A
    loader the parent dropped in a reference cycle would otherwise be shut down here, by a
    process that is not its workers' parent (torchdata prints the error)."""
    gc.freeze()


os.register_at_fork(after_in_child=_freeze_inherited_objects)


def _parallel(node: BaseNode, function, num_workers: int, prefetch: int, processes: bool):
    """``function`` mapped over ``node`` in order: in this thread, or in ``num_workers``
    worker processes (``processes``) or threads, with ``prefetch`` results read ahead."""
    if num_workers < 0 or prefetch < 1:
        raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
    if num_workers == 0:
        return Mapper(node, function)
    method = "process" if processes else "thread"
    mapped = ParallelMapper(node, function, num_workers=num_workers, method=method)
    return Prefetcher(mapped, prefetch_factor=prefetch)


class ShardStream(BaseNode[Any]):
    """This rank's samples of a :class:`~jetblocks.integrations.shards.ShardSet`, epoch after
    epoch, as raw :class:`~jetblocks.integrations.shards.Sample` s (decoded later).

    Epoch ``e`` visits the shards in the permutation ``numpy.random.default_rng([seed, e])``
    (identity without ``shuffle``); rank ``r`` of ``W`` reads shards ``r, r + W, ...`` of it,
    so each shard is read by one rank per epoch and ranks' epochs may differ by a shard. The
    samples pass through a shuffle buffer of ``buffer`` samples: each output is drawn
    uniformly from it, by a PCG64 generator seeded with ``[seed, e, rank]``.

    State: the epoch, the position in this rank's shard list, the byte offset of the next
    sample, the buffer as ``(shard, offset)`` references and the generator's state. Loading it
    re-reads the buffered samples from their offsets, so resuming costs ``buffer`` small reads
    and continues with exactly the samples an uninterrupted stream would have given.

    ``skip_corrupt``: a shard that stops parsing is left from there on (the rest of it cannot
    be found), with a warning and a count (``skipped``); otherwise its error is raised.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        seed: int,
        shuffle: bool = True,
        buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        skip_corrupt: bool = False,
    ):
        super().__init__()
        if len(shards) < world_size:
            raise DataError(
                f"{len(shards)} shard(s) cannot be split over {world_size} processes; write at "
                "least one shard per process (jetblocks shards --per-shard)"
            )
        if buffer < 1 or seed < 0:
            raise ValueError(f"need buffer >= 1 and seed >= 0, got {buffer}, {seed}")
        self.shards, self.seed, self.shuffle = list(shards), seed, shuffle
        self.buffer_size = buffer if shuffle else 1
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.skip_corrupt = skip_corrupt
        self._number = {shard: i for i, shard in enumerate(self.shards)}  # for get_state

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        state = _checked_stream_state(initial_state, len(self.shards), self.buffer_size)
        self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]
        self.skipped = state["skipped"]
        self._rng = np.random.Generator(np.random.PCG64(self._seed_sequence()))
        if state["rng"] is not None:
            self._rng.bit_generator.state = state["rng"]
        self._buffer = [read_sample(self.shards[s], o) for s, o in state["buffer"]]
        self._reader = None

    def _seed_sequence(self) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, self.epoch, self.rank, _SHUFFLE_STREAM])

    def rank_shards(self, epoch: int) -> list[int]:
        """The indices of the shards this rank reads in ``epoch``, in order."""
        count = len(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(count)
        else:
            order = np.arange(count)
        return order[self.rank :: self.world_size].tolist()

    def _read(self):
        """The next sample of this rank's epoch, or None at its end."""
        mine = self.rank_shards(self.epoch)
        while self.position < len(mine):
            shard = self.shards[mine[self.position]]
            if self._reader is None:
                self._reader = read_samples(shard, self.offset)
            try:
                sample = next(self._reader, None)
            except DataError as error:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                _warn(f"skipped the rest of {shard}: {error}", self.skipped, self.rank)
                sample = None
            if sample is not None:
                self.offset = sample.end
                return sample
            self._reader, self.position, self.offset = None, self.position + 1, 0
        return None

    def next(self):
        while self.epochs is None or self.epoch < self.epochs:
            while len(self._buffer) < self.buffer_size and (sample := self._read()) is not None:
                self._buffer.append(sample)
            if self._buffer:
                chosen = int(self._rng.integers(len(self._buffer))) if self.shuffle else 0
                self._buffer[chosen], self._buffer[-1] = self._buffer[-1], self._buffer[chosen]
                return self._buffer.pop()
            self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
            self._rng = np.random.Generator(np.random.PCG64(self._seed_sequence()))
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "buffer": [[self._number[s.shard], s.offset] for s in self._buffer],
            "rng": self._rng.bit_generator.state,
            "skipped": self.skipped,
        }


_STREAM_FIELDS = ("epoch", "position", "offset", "buffer", "rng", "skipped")
_REFERENCE = Items(COUNT, length=2)


def _checked_stream_state(state: Any, shards: int, buffer: int) -> dict[str, Any]:
    """A saved :class:`ShardStream` state, checked (it comes from a checkpoint file: anything
    malformed is a clear error, never a crash later); the initial state for ``None``."""
    if not state:
        return {"epoch": 0, "position": 0, "offset": 0, "buffer": [], "rng": None, "skipped": 0}
    if not isinstance(state, dict) or set(state) != set(_STREAM_FIELDS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise DataError(f"a shard stream state has the fields {list(_STREAM_FIELDS)}, got {got}")
    for name in ("epoch", "position", "offset", "skipped"):
        COUNT.check(state[name], f"the shard stream's {name}")
    buffered = state["buffer"]
    if not isinstance(buffered, list) or len(buffered) > buffer:
        raise DataError(f"a shard stream buffer is a list of at most {buffer} samples")
    for item in buffered:
        if _REFERENCE.check(item, "a buffered sample (shard, offset)")[0] >= shards:
            raise DataError(f"a buffered sample names shard {item[0]} of {shards}")
    try:
        np.random.Generator(np.random.PCG64()).bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError) as error:
        raise DataError(f"a shard stream's random state is malformed: {error}") from None
    return state


def _decode(shards: ShardSet, skip_corrupt: bool, samples: list) -> list:
    """Each sample decoded, or (with ``skip_corrupt``) the reason it cannot be; a batch at a
    time, so that worker processes are sent few, large messages."""
    decoded = []
    for sample in samples:
        try:
            decoded.append(decode_sample(sample, shards.image_size, shards.channels))
        except DataError as error:
            if not skip_corrupt:
                raise
            decoded.append(str(error))
    return decoded


class _SkipUndecodable(BaseNode[Any]):
    """Drops the samples ``_decode`` could not decode, with a warning and a count."""

    def __init__(self, source: BaseNode, rank: int):
        super().__init__()
        self.source, self.rank = source, rank

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        self.source.reset(initial_state and initial_state["source"])
        self.skipped = int(initial_state["skipped"]) if initial_state else 0

    def next(self):
        while isinstance(item := next(self.source), str):
            self.skipped += 1
            _warn(f"skipped {item}", self.skipped, self.rank)
        return item

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "skipped": self.skipped}


def _warn(message: str, skipped: int, rank: int) -> None:
    print(f"jetblocks: {message} ({skipped} skipped on rank {rank})", file=sys.stderr, flush=True)


def _collate(items: list[tuple[np.ndarray, int]]) -> dict[str, Tensor]:
    return {
        "image": torch.from_numpy(np.stack([image for image, _ in items])),
        "label": torch.tensor([label for _, label in items], dtype=torch.long),
    }


def shard_loader(
    shards: ShardSet,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    buffer: int = 1000,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    epochs: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    skip_corrupt: bool = False,
) -> Loader:
    """A resumable :class:`~torchdata.nodes.Loader` of ``{"image", "label"}`` batches of
    ``batch_size`` (per rank) from ``shards`` (see :class:`ShardStream`), decoded in
    ``num_workers`` worker processes (0: in this thread). Batches depend on ``seed``, the
    world size and ``rank`` only, never on ``num_workers``. ``skip_corrupt``: corrupt
    shards and images are skipped and counted, with a warning naming each; otherwise the
    first one raises :class:`DataError` naming shard and member."""
    stream = ShardStream(
        shards.shards,
        seed=seed,
        shuffle=shuffle,
        buffer=buffer,
        rank=rank,
        world_size=world_size,
        epochs=epochs,
        skip_corrupt=skip_corrupt,
    )
    decode = functools.partial(_decode, shards, skip_corrupt)
    raw = Batcher(stream, batch_size, drop_last=False)
    decoded = Unbatcher(_parallel(raw, decode, num_workers, prefetch, True))
    kept = _SkipUndecodable(decoded, rank)  # then batched again: skipping keeps batches full
    return Loader(Mapper(Batcher(kept, batch_size, drop_last=drop_last), _collate))
