"""Randomness is passed one way: a ``generator`` argument.

Every random draw in jetblocks takes ``generator``: ``None`` (torch's global generator), a
``torch.Generator`` (numbers are drawn on its device and moved to where they are used), or
a :class:`ShardedGenerator`, which the trainer hands to a task's loss: a generator shared by
the ranks of a data-parallel job whose draws are this rank's slice of one global draw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Generator", "ShardedGenerator", "rand", "randn"]


class ShardedGenerator:
    """A seeded ``torch.Generator`` for one rank of ``world_size``.

    A draw of shape ``[b, ...]`` draws ``[b * world_size, ...]`` and keeps rows
    ``rank * b`` to ``(rank + 1) * b``: every rank advances the same state, and K processes
    get exactly the numbers one process would draw for the whole global batch. The state
    (:meth:`get_state`) goes into checkpoints, so a resumed run draws what it would have.
    """

    def __init__(
        self, seed: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rank, self.world_size = rank, world_size

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _draw(self, sample, shape: tuple[int, ...]) -> Tensor:
        rows = shape[0] if shape else 1
        full = sample((rows * self.world_size, *shape[1:]), generator=self.generator,
                      device=self.device)  # fmt: skip
        mine = full[self.rank * rows : (self.rank + 1) * rows]
        return mine.reshape(shape)

    def rand(self, shape: tuple[int, ...]) -> Tensor:
        """``U[0, 1)`` of ``shape`` (this rank's rows)."""
        return self._draw(torch.rand, tuple(shape))

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """``N(0, 1)`` of ``shape`` (this rank's rows)."""
        return self._draw(torch.randn, tuple(shape))

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


Generator = torch.Generator | ShardedGenerator | None


def rand(shape: Any, *, generator: Generator = None, like: Tensor) -> Tensor:
    """``U[0, 1)`` of ``shape`` from ``generator``, on ``like``'s device (float32)."""
    return _draw("rand", tuple(shape), generator, like.device)


def randn(shape: Any, *, generator: Generator = None, like: Tensor) -> Tensor:
    """``N(0, 1)`` of ``shape`` from ``generator``, on ``like``'s device and in its dtype."""
    normal = _draw("randn", tuple(shape), generator, like.device)
    return normal.to(like.dtype) if like.is_floating_point() else normal


def _draw(kind: str, shape: tuple[int, ...], generator: Generator, device: torch.device):
    if generator is not None and not isinstance(generator, (torch.Generator, ShardedGenerator)):
        raise TypeError(
            "generator must be None, a torch.Generator or a jetblocks ShardedGenerator, got "
            f"{generator!r} ({type(generator).__name__}); seed one with "
            "torch.Generator().manual_seed(seed)"
        )
    if isinstance(generator, ShardedGenerator):
        return getattr(generator, kind)(shape).to(device)
    source = generator.device if generator is not None else device
    return getattr(torch, kind)(shape, generator=generator, device=source).to(device)
