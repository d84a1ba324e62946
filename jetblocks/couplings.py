"""Jet's affine coupling and the two ways it splits tokens ``[B, N, D]`` into halves.

A split is a fixed permutation of a token tensor's elements, so it is itself a
volume-preserving flow: ``forward`` lays a token tensor out as ``[x1 | x2]`` along the
last dimension (``x1`` conditions, ``x2`` is transformed, each ``[B, N, D/2]``) and
``inverse`` puts every element back. Both are index gathers, exact in any precision.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks.flow import Flow, Rebuilt, logdet_dtype, zero_logdet
from jetblocks.validation import Shape

__all__ = [
    "SPATIAL_PATTERNS",
    "AffineCoupling",
    "ChannelSplit",
    "SpatialSplit",
    "spatial_halves",
]

SPATIAL_PATTERNS = (
    "checkerboard",
    "checkerboard-inv",
    "vstripes",
    "vstripes-inv",
    "hstripes",
    "hstripes-inv",
)


class ChannelSplit(Flow):
    """Split every token's ``D`` dims by a fixed random permutation ``perm``.

    ``x1 = x[..., perm[:D/2]]`` and ``x2 = x[..., perm[D/2:]]``. The permutation is drawn
    from ``seed`` and kept as a buffer, so it is saved and loaded with the state dict.
    """

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"ChannelSplit needs an even token dim >= 2, got {dim}")
        self.dim = dim
        self.accepts = Shape(("B", "N", dim))
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(dim, generator=generator, device="cpu")
        self.register_buffer("perm", perm.to(torch.get_default_device()))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.accepts.check(x, type(self).__name__)
        return x[..., self.perm], zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.accepts.check(y, type(self).__name__)
        return torch.index_copy(torch.empty_like(y), -1, self.perm, y), zero_logdet(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def spatial_halves(pattern: str, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Token indices ``(idx1, idx2)`` (conditioning, transformed) of ``pattern`` on a grid.

    On an ``nh x nw`` grid of raster-ordered tokens with row ``r`` and column ``c``:
    ``vstripes`` splits by the parity of the raster index, ``hstripes`` by the parity of
    ``r`` and ``checkerboard`` by the parity of ``r*nw + c + r`` (the reference's formula:
    on a grid of odd width it degenerates to column parity; it is kept so that weights
    port). ``-inv`` swaps the halves. Raises ``ValueError`` if the halves are unequal.
    """
    if pattern not in SPATIAL_PATTERNS:
        raise ValueError(f"unknown spatial pattern {pattern!r}; expected one of {SPATIAL_PATTERNS}")
    nh, nw = grid
    index = torch.arange(nh * nw, device="cpu")
    row = index // nw
    parity = {
        "vstripes": index % 2,
        "hstripes": row % 2,
        "checkerboard": (index + row) % 2,
    }[pattern.removesuffix("-inv")]
    idx1, idx2 = torch.nonzero(parity == 0).flatten(), torch.nonzero(parity == 1).flatten()
    if len(idx1) != len(idx2):
        raise ValueError(
            f"spatial pattern {pattern!r} splits a {nh}x{nw} token grid into unequal halves "
            f"({len(idx1)} vs {len(idx2)} tokens); change image_size or patch_size so that "
            f"the grid fits the pattern, or drop {pattern!r} from spatial_patterns"
        )
    return (idx2, idx1) if pattern.endswith("-inv") else (idx1, idx2)


class SpatialSplit(Flow):
    """Split the ``N`` tokens of a ``grid`` into two sets by ``pattern``, then "cut" them.

    Tokens are gathered in the order ``[idx1, idx2]`` (see :func:`spatial_halves`); each
    half ``[B, N/2, D]`` is cut so that every token becomes two consecutive half-tokens,
    ``"b n (s c) -> b (n s) c"`` with ``s = 2``, giving ``x1, x2`` of shape ``[B, N, D/2]``
    as a channel split does (so one conditioner shape serves both kinds).
    """

    def __init__(self, grid: tuple[int, int], dim: int, pattern: str) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"SpatialSplit needs an even token dim >= 2, got {dim}")
        self.grid, self.dim, self.pattern = tuple(grid), dim, pattern
        self.num_tokens = grid[0] * grid[1]
        self.accepts = Shape(("B", self.num_tokens, dim))
        order = torch.cat(spatial_halves(pattern, self.grid))
        self.register_buffer("order", order.to(torch.get_default_device()))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.accepts.check(x, type(self).__name__)
        halves = x[:, self.order].chunk(2, dim=1)
        cut = [einops.rearrange(h, "b n (s c) -> b (n s) c", s=2) for h in halves]
        return torch.cat(cut, dim=-1), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.accepts.check(y, type(self).__name__)
        halves = [einops.rearrange(h, "b (n s) c -> b n (s c)", s=2) for h in y.chunk(2, dim=-1)]
        gathered = torch.cat(halves, dim=1)
        return torch.index_copy(torch.empty_like(y), 1, self.order, gathered), zero_logdet(y)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.dim}, pattern={self.pattern!r}"


def _affine(half: Tensor, bias: Tensor, scale: Tensor, inverse: bool) -> Tensor:
    """The coupling's map of the transformed half: ``(x2 + bias) * s``, or ``y2 / s - bias``."""
    return half / scale - bias if inverse else (half + bias) * scale


class AffineCoupling(Flow):
    """Jet's affine coupling with bounded scale and the bias added before scaling.

    ``split`` lays ``x`` out as ``[x1 | x2]``; ``conditioner(x1[, context])`` returns
    ``[bias | raw]`` (last dim ``2 * D/2``). With ``s = scale_factor * sigmoid(raw)``:

        forward:  y2 = (x2 + bias) * s,     logdet =  sum(log_sigmoid(raw) + log(scale_factor))
        inverse:  x2 = y2 / s - bias,       logdet = -sum(log_sigmoid(raw) + log(scale_factor))

    and ``y1 = x1``. The affine update, the scale and the log-det run in float32 (float64 for
    float64 inputs) even under reduced-precision autocast. A zero-initialised conditioner
    output makes the coupling the exact identity.
    """

    def __init__(self, split: Flow, conditioner: nn.Module, scale_factor: float = 2.0) -> None:
        super().__init__()
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}")
        self.split, self.conditioner, self.scale_factor = split, conditioner, float(scale_factor)

    def affine_params(
        self, x1: Tensor, context: Tensor | None, island: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(bias, scale, logdet)`` of the affine map given the conditioning half ``x1``.

        ``bias`` and ``scale`` are ``[B, N, D/2]`` and ``logdet = sum(log_sigmoid(raw) +
        log(scale_factor))`` is ``[B]``, all in the float ``island`` dtype (autocast off).
        """
        out = self.conditioner(x1) if context is None else self.conditioner(x1, context)
        if out.shape[:-1] != x1.shape[:-1] or out.shape[-1] != 2 * x1.shape[-1]:
            raise ValueError(
                f"conditioner must return [..., {2 * x1.shape[-1]}] (bias and raw scale) for "
                f"a half of shape {list(x1.shape)}, got {list(out.shape)}"
            )
        with torch.autocast(x1.device.type, enabled=False):
            bias, raw = out.to(island).chunk(2, dim=-1)
            scale = self.scale_factor * torch.sigmoid(raw)
            # log_sigmoid(raw) as -softplus(-raw): the same function, and torch's CPU
            # logsigmoid kernel is orders of magnitude slower with more than one thread.
            log_sigmoid = -F.softplus(-raw)
            logdet = (log_sigmoid + math.log(self.scale_factor)).flatten(1).sum(1)
        return bias, scale, logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        x1, x2 = self.split(x)[0].chunk(2, dim=-1)
        island = logdet_dtype(x)
        bias, scale, logdet = self.affine_params(x1, context, island)
        y2 = _affine(x2.to(island), bias, scale, inverse).to(x.dtype)
        return self._join(x1, y2), -logdet if inverse else logdet

    def _join(self, x1: Tensor, x2: Tensor) -> Tensor:
        """The tensor whose split is ``[x1 | x2]``."""
        return self.split.inverse(torch.cat([x1, x2], dim=-1))[0]

    def rebuild_input(
        self, y: Tensor, context: Tensor | None = None, inverse: bool = False
    ) -> Rebuilt:
        """One conditioner pass on the untouched half ``x1 = y1`` gives the other half of
        the input, ``x2 = y2 / s - bias`` (without autograd), and the graph of
        ``y2 = (x2 + bias) * s`` (the other way round with ``inverse``); the input's parts
        are ``x1, x2``. A split other than :class:`ChannelSplit` and :class:`SpatialSplit`,
        the permutations that ``join`` needs, takes the generic :meth:`Flow.rebuild_input`.
        """
        if not isinstance(self.split, (ChannelSplit, SpatialSplit)):
            return super().rebuild_input(y, context, inverse)
        kept, moved = self.split(y)[0].chunk(2, dim=-1)
        island = logdet_dtype(y)
        x1 = kept.detach().requires_grad_()
        bias, scale, logdet = self.affine_params(x1, context, island)
        with torch.no_grad():
            x2 = _affine(moved.to(island), bias, scale, not inverse).to(y.dtype)
        y2 = _affine(x2.requires_grad_().to(island), bias, scale, inverse).to(y.dtype)
        return Rebuilt((x1, x2), self._join, self._join(x1, y2), -logdet if inverse else logdet)
