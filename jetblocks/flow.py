"""The flow contract every jetblocks block obeys, and how flows compose.

A flow is an invertible map ``f`` with a tractable Jacobian. Both directions return the
mapped tensor and the per-example log-determinant of the map *they* apply:

    forward(x, context=None) -> (y, log|det df/dx|)        with y = f(x)
    inverse(y, context=None) -> (x, log|det df^-1/dy|)     with x = f^-1(y)

so ``inverse`` returns minus the forward log-det at the matching point. The log-det is
the sum over every non-batch element, shape ``[B]``, float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


def logdet_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a log-det for input ``x``: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_logdet(x: Tensor) -> Tensor:
    """A zero log-det ``[B]`` for a volume-preserving map of ``x``."""
    return x.new_zeros(x.shape[0], dtype=logdet_dtype(x))


class Flow(nn.Module, abc.ABC):
    """Base class of an invertible map with per-example log-determinants.

    Subclasses implement :meth:`forward` and :meth:`inverse`; both take an optional
    ``context`` that conditions the map (it is not transformed).
    """

    @abc.abstractmethod
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map ``x`` to ``y``; return ``(y, logdet)`` with ``logdet`` of shape ``[B]``."""

    @abc.abstractmethod
    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map ``y`` back to ``x``; return ``(x, logdet)`` of the inverse map."""


BACKPROP_MODES = ("standard", "checkpoint", "invertible")


def check_backprop(backprop: str) -> str:
    """Return ``backprop`` if it is one of :data:`BACKPROP_MODES`, else raise ``ValueError``."""
    if backprop not in BACKPROP_MODES:
        raise ValueError(f"unknown backprop {backprop!r}; expected one of {BACKPROP_MODES}")
    return backprop


class FlowSequence(Flow):
    """The composition of ``flows`` applied in listed order: ``f_n(...f_2(f_1(x)))``.

    Log-dets add up; :meth:`inverse` runs the flows' inverses in reverse order.
    ``backprop`` (an attribute that may be changed at any time) chooses how gradients are
    computed, all giving the same gradients up to rounding:

    - ``"standard"``: autograd stores every flow's activations;
    - ``"checkpoint"``: each flow's activations are recomputed in the backward pass
      (``torch.utils.checkpoint``), as the reference does per coupling; every flow's input
      is still stored;
    - ``"invertible"``: only the final output is stored; the backward pass rebuilds each
      flow's input from its output with the exact inverse (:mod:`jetblocks.memory`), so
      activation memory does not grow with the number of flows.

    ``checkpoint=True`` is short for ``backprop="checkpoint"``. Without gradients
    (``torch.no_grad()``) every mode is the plain loop.
    """

    def __init__(
        self, flows: Iterable[Flow], checkpoint: bool = False, backprop: str = "standard"
    ) -> None:
        super().__init__()
        self.flows = nn.ModuleList(flows)
        if checkpoint and backprop not in ("standard", "checkpoint"):
            raise ValueError(f"checkpoint=True contradicts backprop={backprop!r}")
        self.backprop = check_backprop("checkpoint" if checkpoint else backprop)

    @property
    def checkpoint(self) -> bool:
        """Whether ``backprop == "checkpoint"`` (setting it switches to or from it)."""
        return self.backprop == "checkpoint"

    @checkpoint.setter
    def checkpoint(self, value: bool) -> None:
        self.backprop = "checkpoint" if value else "standard"

    def _run(self, step, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.backprop == "checkpoint" and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(step, x, context, use_reentrant=False)
        return step(x, context)

    def _invertible(self, x: Tensor, context: Tensor | None, inverse: bool):
        from jetblocks.memory import invertible_backprop  # memory builds on this module

        return invertible_backprop(self.flows, x, context, inverse=inverse)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.backprop == "invertible" and torch.is_grad_enabled():
            return self._invertible(x, context, inverse=False)
        logdet = zero_logdet(x)
        for flow in self.flows:
            x, step_logdet = self._run(flow, x, context)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.backprop == "invertible" and torch.is_grad_enabled():
            return self._invertible(y, context, inverse=True)
        logdet = zero_logdet(y)
        for flow in reversed(self.flows):
            y, step_logdet = self._run(flow.inverse, y, context)
            logdet = logdet + step_logdet
        return y, logdet

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return self.flows[index]


class Inverse(Flow):
    """The inverse of ``flow``: its ``forward`` is ``flow.inverse`` and vice versa."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(y, context)
