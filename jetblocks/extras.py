"""Deprecated: the optional-dependency helpers are in :mod:`jetblocks.optional`."""

import warnings

from jetblocks.optional import EXTRAS, MissingDependencyError, missing_dependency, require

__all__ = ["EXTRAS", "MissingDependencyError", "missing_dependency", "require"]

warnings.warn(
    "jetblocks.extras is deprecated: import from jetblocks.optional",
    DeprecationWarning,
    stacklevel=2,
)
