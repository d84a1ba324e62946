"""Hypothesis strategies the flow checks are built from: shapes, bounded tensors, Jet configs.

A tensor of ``n`` elements is drawn compactly, so that large tensors stay cheap to generate
and shrink: a base ``a * u`` with ``u`` uniform in ``[low, high]`` from a drawn seed and an
amplitude ``a`` in ``[0, 1]`` (shrinking towards zero), then up to ``max_explicit`` elements
overwritten with explicitly drawn floats (which reach the bounds, zero and tiny values).
Every element is finite and lies in ``[low, high]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "Bounds",
    "FlowExample",
    "batches",
    "bounds_of",
    "contexts",
    "event_shapes",
    "flow_examples",
    "jet_configs",
    "representable_bounds",
    "tensors",
]

Bounds = float | tuple[float, float]

_FLOAT_WIDTH = {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 32}


def bounds_of(bound: Bounds) -> tuple[float, float]:
    """``(low, high)`` from a symmetric bound ``b`` (``[-b, b]``) or an explicit pair."""
    low, high = (-float(bound), float(bound)) if isinstance(bound, int | float) else bound
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"bounds must be finite with low <= high, got {bound!r}")
    return low, high


def representable_bounds(bound: Bounds, dtype: torch.dtype) -> tuple[float, float]:
    """The widest ``[low', high']`` inside the bounds whose ends ``dtype`` represents exactly."""
    low, high = bounds_of(bound)
    lo, hi = torch.tensor(low, dtype=dtype), torch.tensor(high, dtype=dtype)
    if lo.double() < low:
        lo = torch.nextafter(lo, torch.tensor(math.inf, dtype=dtype))
    if hi.double() > high:
        hi = torch.nextafter(hi, torch.tensor(-math.inf, dtype=dtype))
    if lo > hi:
        raise ValueError(f"no {dtype} value lies within the bounds {bound!r}")
    return lo.item(), hi.item()


@st.composite
def event_shapes(
    draw: st.DrawFn,
    *,
    min_dims: int = 1,
    max_dims: int = 3,
    min_side: int = 1,
    max_side: int = 4,
    max_elements: int = 64,
) -> tuple[int, ...]:
    """Shapes (without a batch dim) of ``min_dims..max_dims`` sides, at most ``max_elements``.

    Sides are drawn one after another within the remaining element budget, so no example
    is ever rejected.
    """
    if min_side < 1 or min_side > max_side or min_side**min_dims > max_elements:
        raise ValueError(
            f"no shape has {min_dims} sides of at least {min_side} within {max_elements} elements"
        )
    ndims = draw(st.integers(min_dims, max_dims))
    while ndims > min_dims and min_side**ndims > max_elements:
        ndims -= 1
    shape, budget = [], max_elements
    for i in range(ndims):
        room = budget // min_side ** (ndims - i - 1)
        side = draw(st.integers(min_side, max(min_side, min(max_side, room))))
        shape.append(side)
        budget //= side
    return tuple(shape)


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float64,
    bound: Bounds = 3.0,
    max_explicit: int = 16,
) -> Tensor:
    """Finite CPU tensors of ``shape`` and ``dtype`` with every element in the bounds."""
    low, high = representable_bounds(bound, dtype)
    n = math.prod(shape)
    width = _FLOAT_WIDTH.get(dtype, 64)
    seed = draw(st.integers(0, 2**32 - 1))
    amplitude = draw(st.floats(0.0, 1.0))
    generator = torch.Generator().manual_seed(seed)
    centre, half = (low + high) / 2, (high - low) / 2
    unit = 2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1
    flat = (centre + amplitude * half * unit).clamp(low, high)
    if n:
        edges = [v for v in (0.0, low, high) if low <= v <= high]
        values = st.one_of(
            st.floats(low, high, width=width, allow_subnormal=False), st.sampled_from(edges)
        )
        overrides = draw(
            st.lists(st.tuples(st.integers(0, n - 1), values), max_size=min(n, max_explicit))
        )
        for index, value in overrides:
            flat[index] = value
    # Both bounds are representable, so clamping after rounding keeps every value inside.
    return flat.to(dtype).clamp(low, high).reshape(shape)


def batches(
    event_shape: tuple[int, ...],
    *,
    batch_size: int = 3,
    dtype: torch.dtype = torch.float64,
    bound: Bounds = 3.0,
) -> st.SearchStrategy[Tensor]:
    """Batches ``[batch_size, *event_shape]`` of bounded finite inputs."""
    return tensors((batch_size, *event_shape), dtype=dtype, bound=bound)


def contexts(
    context_shape: tuple[int, ...],
    *,
    batch_size: int = 3,
    dtype: torch.dtype = torch.float64,
    bound: Bounds = 3.0,
) -> st.SearchStrategy[Tensor]:
    """Conditioning contexts ``[batch_size, *context_shape]`` (bounded and finite)."""
    return batches(context_shape, batch_size=batch_size, dtype=dtype, bound=bound)


class FlowExample(NamedTuple):
    """One generated case: ``x`` for the forward map, ``y`` for the inverse, a context."""

    x: Tensor
    y: Tensor
    context: Tensor | None


@st.composite
def flow_examples(
    draw: st.DrawFn,
    event_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    context_shape: tuple[int, ...] | None = None,
    *,
    batch_size: int = 3,
    dtype: torch.dtype = torch.float64,
    bound: Bounds = 3.0,
    output_bound: Bounds | None = None,
) -> FlowExample:
    """``x [B, *event_shape]``, ``y [B, *output_shape]`` and, if asked, a context batch."""
    x = draw(batches(event_shape, batch_size=batch_size, dtype=dtype, bound=bound))
    y_bound = bound if output_bound is None else output_bound
    y = draw(batches(output_shape, batch_size=batch_size, dtype=dtype, bound=y_bound))
    context = None
    if context_shape is not None:
        context = draw(contexts(context_shape, batch_size=batch_size, dtype=dtype, bound=bound))
    return FlowExample(x, y, context)


@st.composite
def jet_configs(
    draw: st.DrawFn,
    *,
    channels: tuple[int, ...] = (1, 2, 3),
    patch_sizes: tuple[int, ...] = (1, 2),
    max_grid_side: int = 4,
    max_elements: int = 48,
    max_depth: int = 3,
    context_dim: int | None = None,
    attention_backends: tuple[str, ...] = ("sdpa", "math"),
):
    """Valid :class:`~jetblocks.JetConfig` s small enough to check on a CPU.

    The token dim ``D = p*p*C`` is even, ``C*H*W <= max_elements`` (the Jacobian checks
    repeat each example once per element), and ``kinds`` only contains ``"spatial"`` when at
    least one spatial pattern halves the token grid; the spatial patterns drawn are
    among those that do. The ViT is one block of width ``4 * num_heads`` to ``8 *
    num_heads`` with an attention backend from ``attention_backends``.
    """
    from jetblocks.couplings import SPATIAL_PATTERNS, spatial_halves
    from jetblocks.jet import JetConfig

    combos = [
        (p, c)
        for p in patch_sizes
        for c in channels
        if (p * p * c) % 2 == 0 and p * p * c <= max_elements
    ]
    if not combos:
        raise ValueError(f"no patch size in {patch_sizes} gives an even token dim for {channels}")
    patch, chans = draw(st.sampled_from(combos))
    token_dim = patch * patch * chans
    max_tokens = max_elements // token_dim
    rows = draw(st.integers(1, max(1, min(max_grid_side, max_tokens))))
    cols = draw(st.integers(1, max(1, min(max_grid_side, max_tokens // rows))))
    grid = (rows, cols)

    def halves(pattern: str) -> bool:
        try:
            spatial_halves(pattern, grid)
        except ValueError:
            return False
        return True

    valid = [pattern for pattern in SPATIAL_PATTERNS if halves(pattern)]
    kind_options = [("channels",)]
    if valid:
        kind_options += [("spatial",), ("channels", "spatial"), ("spatial", "channels")]
    kinds = draw(st.sampled_from(kind_options))
    spatial = ("checkerboard",)  # unused unless "spatial" is in kinds
    if "spatial" in kinds:
        spatial = tuple(draw(st.lists(st.sampled_from(valid), min_size=1, max_size=3)))
    heads = draw(st.sampled_from((1, 2)))
    return JetConfig(
        image_size=(rows * patch, cols * patch),
        channels=chans,
        patch_size=patch,
        depth=draw(st.integers(1, max_depth)),
        block_depth=1,
        emb_dim=heads * draw(st.integers(4, 8)),
        num_heads=heads,
        kinds=kinds,
        channel_patterns=("random",),
        spatial_patterns=spatial,
        scale_factor=draw(st.sampled_from((2.0, 1.5, 3.0))),
        seed=draw(st.integers(0, 2**16)),
        context_dim=context_dim,
        attention_backend=draw(st.sampled_from(attention_backends)),
    )
