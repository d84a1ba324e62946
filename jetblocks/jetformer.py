"""Deprecated: ``NoiseCurriculum`` is in :mod:`jetblocks.curriculum` and
``image_bits_per_dim`` in :mod:`jetblocks.likelihood` (both also at the top level)."""

import warnings

from jetblocks.curriculum import NoiseCurriculum
from jetblocks.likelihood import image_bits_per_dim

__all__ = ["NoiseCurriculum", "image_bits_per_dim"]

warnings.warn(
    "jetblocks.jetformer is deprecated: import NoiseCurriculum from jetblocks.curriculum and "
    "image_bits_per_dim from jetblocks.likelihood (or both from jetblocks)",
    DeprecationWarning,
    stacklevel=2,
)
