"""Memory-saving backprop through a chain of flows: recompute inputs from outputs.

For ``y = f_n(... f_1(x))`` with ``x_i = f_i(x_{i-1})`` and log-det ``L = sum_i l_i(x_{i-1})``,
ordinary backprop stores the activations of every layer. Because each ``f_i`` is
invertible, the backward pass needs only ``y``: walking ``i = n, ..., 1`` it reconstructs
``x_{i-1} = f_i^{-1}(x_i)``, re-runs ``f_i`` on it with autograd on, and takes one layer's
vector-Jacobian products

    g_{i-1}   = (d x_i / d x_{i-1})^T g_i  + (d l_i / d x_{i-1})^T g_L
    theta_i'  = (d x_i / d theta_i)^T g_i  + (d l_i / d theta_i)^T g_L    (and the context's)

before freeing that layer's graph. Activation memory is one layer's, whatever the depth.

Each layer rebuilds its own input with its ``rebuild_input`` method
(:meth:`jetblocks.flow.Flow.rebuild_input`): in general ``f^-1`` without autograd, then
``f`` with it (one more forward), and for an affine coupling one conditioner pass on the
untouched half, which gives both the inverse and the graph (the extra cost is one
conditioner forward per coupling, the same as activation checkpointing). This module
knows no particular flow.

The whole chain is one :class:`torch.autograd.Function` whose inputs include the
parameters, so their gradients arrive as ordinary ``.grad`` accumulation (DDP's gradient
hooks, optimizers and ``clip_grad_norm_`` see nothing unusual; FSDP, which gathers sharded
parameters inside each coupling's call, is refused with a clear error). The
autocast state of the forward pass is restored in the backward pass, so a bf16 conditioner
is recomputed in bf16 (the affine update, scale and log-det stay float32). Gradients equal
ordinary backprop's up to the rounding of the reconstruction (float64: ~1e-13 relative).
Requirements: every flow is deterministic (no dropout) and invertible to working precision.
Under ``torch.compile`` the chain runs eager (a graph break), with the gradients above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["invertible_backprop"]

# ``chain(x, context, inverse) -> (y, logdet)``: the plain composition of the flows.
Chain = Callable[[Tensor, Tensor | None, bool], tuple[Tensor, Tensor]]


def invertible_backprop(
    chain: Chain,
    flows: Sequence[nn.Module],
    x: Tensor,
    context: Tensor | None = None,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """``chain(x, context, inverse)``, the composition of ``flows`` (in listed order, or
    their inverses in reverse order with ``inverse``), with memory-saving gradients.

    When a gradient is needed only the output (and the context) is kept for the backward
    pass, which rebuilds every flow's input from its output (see the module docstring).
    Without a gradient to compute (``torch.no_grad()``, or nothing requires grad) it is
    ``chain`` itself, at no extra cost.
    """
    order = tuple(reversed(flows)) if inverse else tuple(flows)
    params = _unique(p for flow in order for p in flow.parameters() if p.requires_grad)
    wanted = x.requires_grad or (context is not None and context.requires_grad) or params
    if not (order and torch.is_grad_enabled() and wanted):
        return chain(x, context, inverse)
    if any(_is_sharded(p) for p in params):
        raise ValueError(
            "backprop='invertible' does not support FSDP-sharded parameters (FSDP gathers "
            "them inside each coupling's call, out of this path's reach); train with DDP, or "
            "use backprop='checkpoint' under FSDP"
        )
    return _run_invertible(x, context, _Layers(chain, order, inverse), *params)


def _is_sharded(param: Tensor) -> bool:
    return type(param).__name__ == "DTensor" or hasattr(param, "_local_tensor")


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


@dataclass(frozen=True)
class _Layers:
    """The chain's plain composition, its flows in the order applied, and the direction."""

    chain: Chain
    order: tuple[nn.Module, ...]
    inverse: bool


@torch.compiler.disable  # dynamo cannot trace the nested autograd.grad of the backward
def _run_invertible(x, context, layers, *params):
    return _InvertibleStack.apply(x, context, layers, *params)


def _autocast_state(device_type: str) -> dict[str, Any]:
    return dict(
        device_type=device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
        cache_enabled=torch.is_autocast_cache_enabled(),
    )


class _InvertibleStack(torch.autograd.Function):
    """``(x, context, layers, *params) -> (y, logdet)``; backward recomputes."""

    @staticmethod
    def forward(ctx, x, context, layers, *params):  # type: ignore[override]
        y, logdet = layers.chain(x, context, layers.inverse)
        ctx.layers = layers
        ctx.autocast = _autocast_state(x.device.type)
        ctx.index = {id(p): i for i, p in enumerate(params)}
        ctx.versions = [p._version for p in params]  # autograd's check for saved tensors
        ctx.save_for_backward(y, context)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):  # type: ignore[override]
        y, context = ctx.saved_tensors
        layers = ctx.layers
        params_now = {id(p): p._version for f in layers.order for p in f.parameters()}
        if any(params_now.get(i) != v for i, v in zip(ctx.index, ctx.versions, strict=True)):
            raise RuntimeError(
                "a parameter of the flows was modified in place between the forward and the "
                "backward pass of invertible backprop (an optimizer step before backward?)"
            )
        if context is not None:
            context = context.detach().requires_grad_(ctx.needs_input_grad[1])
        walk = _Backward(ctx.index, context, grad_logdet, layers.inverse)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            for flow in reversed(layers.order):
                y, grad_y = walk.layer(flow, y, grad_y)
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        return grad_x, walk.context_grad, None, *walk.param_grads


@dataclass
class _Backward:
    """The backward pass's walk from the last layer to the first, and the gradients it sums.

    ``index`` places each parameter among the Function's inputs; ``context`` is a leaf that
    requires grad when its gradient is wanted; ``grad_logdet`` is every layer's log-det
    gradient (the log-dets add up).
    """

    index: dict[int, int]
    context: Tensor | None
    grad_logdet: Tensor
    inverse: bool
    param_grads: list[Tensor | None] = field(init=False)
    context_grad: Tensor | None = None

    def __post_init__(self) -> None:
        self.param_grads = [None] * len(self.index)

    def layer(self, flow: nn.Module, y: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor]:
        """``flow``'s input and its gradient from its output ``y`` and ``grad_y``; the
        layer's parameter and context gradients are added to the gathered ones."""
        parts, join, output, logdet = flow.rebuild_input(y, self.context, inverse=self.inverse)
        params = _unique(p for p in flow.parameters() if id(p) in self.index)
        wants_context = self.context is not None and self.context.requires_grad
        inputs = [*parts, *params, *([self.context] if wants_context else [])]
        outputs, grad_outputs = [output], [grad_y]
        if logdet.requires_grad:  # not so for a volume-preserving flow's constant zero
            outputs.append(logdet)
            grad_outputs.append(self.grad_logdet)
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        part_grads, param_grads = grads[: len(parts)], grads[len(parts) : len(parts) + len(params)]
        for p, g in zip(params, param_grads, strict=True):
            i = self.index[id(p)]
            self.param_grads[i] = _add(self.param_grads[i], g)
        if wants_context:
            self.context_grad = _add(self.context_grad, grads[-1])
        with torch.no_grad():
            return join(*parts), join(*part_grads)


def _add(total: Tensor | None, grad: Tensor | None) -> Tensor | None:
    """``total + grad``, where ``None`` stands for no gradient (yet)."""
    if grad is None:
        return total
    return grad if total is None else total + grad
