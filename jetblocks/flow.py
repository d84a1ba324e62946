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
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from jetblocks.memory import invertible_backprop
from jetblocks.validation import Choice

__all__ = [
    "BACKPROP",
    "BACKPROP_MODES",
    "Flow",
    "FlowSequence",
    "Inverse",
    "Rebuilt",
    "logdet_dtype",
    "zero_logdet",
]


def logdet_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a log-det for input ``x``: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_logdet(x: Tensor) -> Tensor:
    """A zero log-det ``[B]`` for a volume-preserving map of ``x``."""
    return x.new_zeros(x.shape[0], dtype=logdet_dtype(x))


class Rebuilt(NamedTuple):
    """A flow re-run with autograd on its input rebuilt from its output
    (:meth:`Flow.rebuild_input`).

    The input is ``join(*parts)``, ``parts`` being fresh leaves that require grad, and
    ``output, logdet`` the flow's map of it, computed from ``parts``. ``join`` only moves
    elements (a permutation), so it also maps the parts' gradients to the input's.
    """

    parts: tuple[Tensor, ...]
    join: Callable[..., Tensor]
    output: Tensor
    logdet: Tensor


def _itself(x: Tensor) -> Tensor:
    return x


class Flow(nn.Module, abc.ABC):
    """Base class of an invertible map with per-example log-determinants.

    Subclasses implement :meth:`forward` and :meth:`inverse`; both take an optional
    ``context`` that conditions the map (it is not transformed). A subclass may override
    :meth:`rebuild_input` when it can rebuild its input more cheaply than by inverting.
    """

    @abc.abstractmethod
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map ``x`` to ``y``; return ``(y, logdet)`` with ``logdet`` of shape ``[B]``."""

    @abc.abstractmethod
    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map ``y`` back to ``x``; return ``(x, logdet)`` of the inverse map."""

    def rebuild_input(
        self, y: Tensor, context: Tensor | None = None, inverse: bool = False
    ) -> Rebuilt:
        """Rebuild the input ``x`` from the output ``y = forward(x)[0]`` (``inverse(x)[0]``
        with ``inverse``) and re-run that map on it with autograd, for one vector-Jacobian
        product of memory-saving backprop (:mod:`jetblocks.memory`).

        Called with grad enabled (``y`` needs none); returns :class:`Rebuilt` whose ``output``
        and ``logdet`` equal the map's at ``x`` up to rounding, on the autograd graph of the
        ``parts``, the parameters and ``context``. The default takes ``x = f^-1(y)`` without
        autograd, then ``f(x)`` with it (one pass more than the map itself).
        """
        apply, undo = (self.inverse, self) if inverse else (self, self.inverse)
        with torch.no_grad():
            x = undo(y, context)[0]
        x = x.detach().requires_grad_()
        return Rebuilt((x,), _itself, *apply(x, context))

    def leaves(self) -> list[Flow]:
        """Flows whose composition, in order, is this flow: ``[self]`` for a single layer.
        Composite flows list their parts' leaves, so that checkpointing and memory-saving
        backprop treat every layer of a nested flow as a layer of their own."""
        return [self]


BACKPROP_MODES = ("standard", "checkpoint", "invertible")
BACKPROP = Choice(BACKPROP_MODES)


class FlowSequence(Flow):
    """The composition of ``flows`` applied in listed order: ``f_n(...f_2(f_1(x)))``.

    Log-dets add up; :meth:`inverse` runs the flows' inverses in reverse order.
    ``backprop`` (an attribute that may be changed at any time) chooses how gradients are
    computed, all giving the same gradients up to rounding:

    - ``"standard"``: autograd stores every flow's activations;
    - ``"checkpoint"``: each layer's activations are recomputed in the backward pass
      (``torch.utils.checkpoint``), as the reference does per coupling; every layer's input
      is still stored;
    - ``"invertible"``: only the final output is stored; the backward pass rebuilds each
      layer's input from its output (:meth:`Flow.rebuild_input`, :mod:`jetblocks.memory`),
      so activation memory does not grow with the number of layers.

    The last two work layer by layer through nested flows (:meth:`Flow.leaves`: the layers
    of sequences inside sequences, of ``Inverse`` and of ``FactorOut``), whatever mode
    the nested sequences have. Without gradients (``torch.no_grad()``) every mode is the
    plain loop.
    """

    def __init__(self, flows: Iterable[Flow], backprop: str = "standard") -> None:
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self.backprop = backprop

    @property
    def backprop(self) -> str:
        return self._backprop

    @backprop.setter
    def backprop(self, mode: str) -> None:
        self._backprop = BACKPROP.check(mode, "FlowSequence: backprop")

    def leaves(self) -> list[Flow]:
        return [leaf for flow in self.flows for leaf in flow.leaves()]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._compose(x, context, inverse=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._compose(y, context, inverse=True)

    def _compose(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.backprop == "standard" or not torch.is_grad_enabled():
            return _chain(self.flows, x, context, inverse)
        layers = self.leaves()
        if self.backprop == "checkpoint":
            return _chain(layers, x, context, inverse, checkpoint=True)
        chain = functools.partial(_chain, layers)
        return invertible_backprop(chain, layers, x, context, inverse=inverse)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return self.flows[index]


def _chain(
    flows: Sequence[Flow],
    x: Tensor,
    context: Tensor | None,
    inverse: bool,
    checkpoint: bool = False,
) -> tuple[Tensor, Tensor]:
    """The plain loop: ``flows`` in order, or their inverses in reverse order; with
    ``checkpoint`` each one's activations are recomputed in the backward pass."""
    logdet = zero_logdet(x)
    for flow in reversed(flows) if inverse else flows:
        step = flow.inverse if inverse else flow
        if checkpoint:
            x, step_logdet = torch.utils.checkpoint.checkpoint(
                step, x, context, use_reentrant=False
            )
        else:
            x, step_logdet = step(x, context)
        logdet = logdet + step_logdet
    return x, logdet


class Inverse(Flow):
    """The inverse of ``flow``: its ``forward`` is ``flow.inverse`` and vice versa."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(y, context)

    def rebuild_input(
        self, y: Tensor, context: Tensor | None = None, inverse: bool = False
    ) -> Rebuilt:
        return self.flow.rebuild_input(y, context, inverse=not inverse)

    def leaves(self) -> list[Flow]:
        return [_inverted(leaf) for leaf in reversed(self.flow.leaves())]


def _inverted(flow: Flow) -> Flow:
    return flow.flow if isinstance(flow, Inverse) else Inverse(flow)
