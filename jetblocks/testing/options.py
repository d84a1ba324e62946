"""The settings of :func:`~jetblocks.testing.check_flow`, as one frozen object."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping
from typing import Any

import torch

from jetblocks.testing import strategies
from jetblocks.testing.properties import PROPERTIES

__all__ = ["DEFAULT_TOLERANCES", "CheckOptions", "default_tolerances"]

#: ``(atol, rtol)`` per dtype. Values must satisfy ``|received - expected| <= atol + rtol *
#: |expected|``; log-dets use ``atol * sqrt(n)`` for ``n`` elements per example.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-6),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` that :func:`check_flow` uses for ``dtype`` (see the table there)."""
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(
            f"no default tolerances for {dtype}; pass atol and rtol (known dtypes: "
            f"{list(DEFAULT_TOLERANCES)})"
        )
    return DEFAULT_TOLERANCES[dtype]


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    """How :func:`~jetblocks.testing.check_flow` checks a flow; its docstring says what each
    setting does. Every setting is optional and validated on construction (``ValueError``).

    ``check_flow``, :class:`~jetblocks.testing.FlowCase` and
    :func:`~jetblocks.testing.flow_test` take one as ``options=`` and any setting as a
    keyword that overrides it: ``check_flow(flow, event_shape=(8,), dtype=torch.float32)``
    is ``check_flow(flow, event_shape=(8,), options=CheckOptions(dtype=torch.float32))``.
    """

    batch_size: int = 3
    dtype: torch.dtype = torch.float64
    max_examples: int = 20
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    perturb: bool = True
    perturb_scale: float = 0.05
    bound: strategies.Bounds = 3.0
    output_bound: strategies.Bounds | None = None
    inverse_inputs: str = "bounded"
    skip: Collection[str] = frozenset()
    device: torch.device | str | None = None
    reproduce: bytes | str | None = None
    num_threads: int | None = 1
    finite_differences: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.skip) - set(PROPERTIES)
        if unknown:
            raise ValueError(
                f"unknown properties in skip: {sorted(unknown)}; known: {list(PROPERTIES)}"
            )
        if self.batch_size < 1 or self.max_examples < 1:
            raise ValueError(
                "batch_size and max_examples must be >= 1, got "
                f"{self.batch_size}, {self.max_examples}"
            )
        if self.inverse_inputs not in ("bounded", "image"):
            raise ValueError(
                f"inverse_inputs must be 'bounded' or 'image', got {self.inverse_inputs!r}"
            )
        strategies.bounds_of(self.bound)
        strategies.bounds_of(self.output_bounds)
        if self.atol is None or self.rtol is None:
            default_tolerances(self.dtype)  # raises for a dtype without defaults
        object.__setattr__(self, "skip", frozenset(self.skip))
        if isinstance(self.reproduce, str):
            object.__setattr__(self, "reproduce", self.reproduce.encode())

    @classmethod
    def resolve(cls, options: CheckOptions | None, overrides: Mapping[str, Any]) -> CheckOptions:
        """``options`` (the defaults if ``None``) with ``overrides`` applied; ``TypeError``
        for an unknown setting or an ``options`` that is not a :class:`CheckOptions`."""
        if options is None:
            options = cls()
        if not isinstance(options, cls):
            raise TypeError(
                f"options must be a CheckOptions, got {type(options).__name__}; pass single "
                "settings as keywords instead"
            )
        known = [field.name for field in dataclasses.fields(cls)]
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"unknown check_flow option {name!r}{hint}; known options: {', '.join(known)}"
                )
        return dataclasses.replace(options, **overrides)

    @property
    def tolerances(self) -> tuple[float, float]:
        """``(atol, rtol)``: the ones given, else the dtype's defaults."""
        if self.atol is not None and self.rtol is not None:
            return self.atol, self.rtol
        default_atol, default_rtol = default_tolerances(self.dtype)
        return (
            default_atol if self.atol is None else self.atol,
            default_rtol if self.rtol is None else self.rtol,
        )

    @property
    def image(self) -> bool:
        """Whether inverse inputs are images ``f(x')`` rather than bounded values."""
        return self.inverse_inputs == "image"

    @property
    def output_bounds(self) -> strategies.Bounds:
        """The bounds of ``y``: ``output_bound``, else ``bound``."""
        return self.bound if self.output_bound is None else self.output_bound
