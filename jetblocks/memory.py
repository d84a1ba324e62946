"""Memory-saving backprop through a stack of flows: recompute inputs from outputs.

For ``y = f_n(... f_1(x))`` with ``x_i = f_i(x_{i-1})`` and log-det ``L = sum_i l_i(x_{i-1})``,
ordinary backprop stores the activations of every layer. Because each ``f_i`` is
invertible, the backward pass needs only ``y``: walking ``i = n, ..., 1`` it reconstructs
``x_{i-1} = f_i^{-1}(x_i)``, re-runs ``f_i`` on it with autograd on, and takes one layer's
vector-Jacobian products

    g_{i-1}   = (d x_i / d x_{i-1})^T g_i  + (d l_i / d x_{i-1})^T g_L
    theta_i'  = (d x_i / d theta_i)^T g_i  + (d l_i / d theta_i)^T g_L    (and the context's)

before freeing that layer's graph. Activation memory is one layer's, whatever the depth.

For an affine coupling ``y1 = x1, y2 = (x2 + b(x1)) * s(x1)`` the conditioner sees the
untouched half, ``x1 = y1``, so one conditioner pass on ``y1`` gives both the inverse
``x2 = y2 / s - b`` and the graph of the products: the extra cost is one conditioner
forward per coupling, the same as activation checkpointing. Other flows take the generic
path (``f^-1`` without autograd, then ``f`` with it: one more forward).

The whole stack is one :class:`torch.autograd.Function` whose inputs include the
parameters, so their gradients arrive as ordinary ``.grad`` accumulation (DDP's gradient
hooks, optimizers and ``clip_grad_norm_`` see nothing unusual; FSDP, which gathers sharded
parameters inside each coupling's call, is refused with a clear error). The
autocast state of the forward pass is restored in the backward pass, so a bf16 conditioner
is recomputed in bf16 (the affine update, scale and log-det stay float32). Gradients equal
ordinary backprop's up to the rounding of the reconstruction (float64: ~1e-13 relative).
Requirements: every flow is deterministic (no dropout) and invertible to working precision.
Under ``torch.compile`` the stack runs eager (a graph break), with the gradients above.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jetblocks.couplings import AffineCoupling, ChannelSplit, SpatialSplit
from jetblocks.flow import Flow, logdet_dtype, zero_logdet

__all__ = ["invertible_backprop"]

# Splits that are permutations of a token tensor's elements: their transpose is their
# inverse, which the affine fast path relies on to move gradients through them.
_PERMUTATION_SPLITS = (ChannelSplit, SpatialSplit)


def invertible_backprop(
    flows: Iterable[Flow],
    x: Tensor,
    context: Tensor | None = None,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply ``flows`` in listed order (their inverses in reverse order with ``inverse``).

    Returns ``(y, logdet)`` like :class:`~jetblocks.flow.FlowSequence`, but when a gradient
    is needed only ``y`` (and the context) is kept for the backward pass, which rebuilds
    every layer's input from its output (see the module docstring). Without a gradient to
    compute (``torch.no_grad()``, or nothing requires grad) it is the plain loop, at no
    extra cost.
    """
    flows = tuple(flows)
    order = tuple(reversed(flows)) if inverse else flows
    params = _unique(p for flow in flows for p in flow.parameters() if p.requires_grad)
    wanted = x.requires_grad or (context is not None and context.requires_grad) or params
    if not (order and torch.is_grad_enabled() and wanted):
        return _apply(order, x, context, inverse)
    if any(_is_sharded(p) for p in params):
        raise ValueError(
            "backprop='invertible' does not support FSDP-sharded parameters (FSDP gathers "
            "them inside each coupling's call, out of this path's reach); train with DDP, or "
            "use backprop='checkpoint' under FSDP"
        )
    return _run_invertible(x, context, order, inverse, params)


def _is_sharded(param: Tensor) -> bool:
    return type(param).__name__ == "DTensor" or hasattr(param, "_local_tensor")


@torch.compiler.disable  # dynamo cannot trace the nested autograd.grad of the backward
def _run_invertible(x, context, flows, inverse, params):
    return _InvertibleStack.apply(x, context, flows, inverse, *params)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _apply(
    flows: Sequence[Flow], x: Tensor, context: Tensor | None, inverse: bool
) -> tuple[Tensor, Tensor]:
    logdet = zero_logdet(x)
    for flow in flows:
        x, step = (flow.inverse if inverse else flow)(x, context)
        logdet = logdet + step
    return x, logdet


def _autocast_state(device_type: str) -> dict[str, Any]:
    return dict(
        device_type=device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
        cache_enabled=torch.is_autocast_cache_enabled(),
    )


class _InvertibleStack(torch.autograd.Function):
    """``(x, context, flows, inverse, *params) -> (y, logdet)``; backward recomputes."""

    @staticmethod
    def forward(ctx, x, context, flows, inverse, *params):  # type: ignore[override]
        y, logdet = _apply(flows, x, context, inverse)
        ctx.flows, ctx.inverse = flows, inverse
        ctx.autocast = _autocast_state(x.device.type)
        ctx.index = {id(p): i for i, p in enumerate(params)}
        ctx.versions = [p._version for p in params]  # autograd's check for saved tensors
        ctx.save_for_backward(y, context)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):  # type: ignore[override]
        y, context = ctx.saved_tensors
        params_now = {id(p): p._version for f in ctx.flows for p in f.parameters()}
        if any(params_now.get(i) != v for i, v in zip(ctx.index, ctx.versions, strict=True)):
            raise RuntimeError(
                "a parameter of the flows was modified in place between the forward and the "
                "backward pass of invertible backprop (an optimizer step before backward?)"
            )
        param_grads: list[Tensor | None] = [None] * len(ctx.index)
        need_context = context is not None and ctx.needs_input_grad[1]
        if context is not None:
            context = context.detach().requires_grad_(need_context)
        grad_context = None
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            for i in reversed(range(len(ctx.flows))):
                flow = ctx.flows[i]
                params = _unique(p for p in flow.parameters() if id(p) in ctx.index)
                need_input = i > 0 or ctx.needs_input_grad[0]
                layer = _affine_layer if _fast_path(flow) else _generic_layer
                y, grad_y, grads = layer(
                    flow, y, grad_y, grad_logdet, context, ctx.inverse, params, need_input,
                    need_context,
                )  # fmt: skip
                for p, g in zip(params, grads[: len(params)], strict=True):
                    if g is not None:
                        j = ctx.index[id(p)]
                        param_grads[j] = g if param_grads[j] is None else param_grads[j] + g
                if need_context and grads[-1] is not None:
                    grad_context = grads[-1] if grad_context is None else grad_context + grads[-1]
        return grad_y, grad_context, None, None, *param_grads


def _fast_path(flow: Flow) -> bool:
    return isinstance(flow, AffineCoupling) and isinstance(flow.split, _PERMUTATION_SPLITS)


def _grads(outputs, grad_outputs, leaves, params, context, need_context):
    """``(leaf grads, param grads + [context grad])`` of ``sum(grad_outputs * outputs)``."""
    inputs = [*leaves, *params, *([context] if need_context else [])]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if inputs and pairs:
        outs, grad_outs = zip(*pairs, strict=True)
        grads = torch.autograd.grad(outs, inputs, grad_outs, allow_unused=True)
    else:  # a parameter-free layer whose input needs no gradient
        grads = (None,) * len(inputs)
    return grads[: len(leaves)], list(grads[len(leaves) :]) + ([] if need_context else [None])


def _affine_layer(
    coupling: AffineCoupling,
    out: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    context: Tensor | None,
    inverse: bool,
    params: list[nn.Parameter],
    need_input: bool,
    need_context: bool,
):
    """One coupling's backward from its output ``out``: ``(input, grad_input, grads)``.

    Forward direction: ``out`` holds ``[y1 | y2]`` after the split; ``x1 = y1`` and
    ``x2 = y2 / s - b``, then ``y2 = (x2 + b) * s`` is rebuilt on the graph. The inverse
    direction swaps the two formulas (and negates the log-det).
    """
    split = coupling.split
    with torch.no_grad():
        kept, moved = split(out)[0].chunk(2, dim=-1)
        grad_kept, grad_moved = split(grad_out)[0].chunk(2, dim=-1)
    island = logdet_dtype(out)
    x1 = kept.detach().requires_grad_(need_input)
    bias, scale, logdet = coupling.affine_params(x1, context, island)
    with torch.no_grad():  # the exact inverse of this layer's affine map
        moved = moved.to(island)
        x2 = (moved + bias) * scale if inverse else moved / scale - bias
    x2 = x2.to(out.dtype).requires_grad_(need_input)
    if inverse:
        rebuilt, logdet = (x2.to(island) / scale - bias).to(out.dtype), -logdet
    else:
        rebuilt = ((x2.to(island) + bias) * scale).to(out.dtype)
    leaves = [x1, x2] if need_input else []
    (*leaf_grads,), grads = _grads(
        (rebuilt, logdet), (grad_moved, grad_logdet), leaves, params, context, need_context
    )
    with torch.no_grad():
        inp = split.inverse(torch.cat([x1.detach(), x2.detach()], dim=-1))[0]
        grad_inp = None
        if need_input:
            grad_x1 = grad_kept if leaf_grads[0] is None else grad_kept + leaf_grads[0]
            grad_x2 = torch.zeros_like(x2) if leaf_grads[1] is None else leaf_grads[1]
            grad_inp = split.inverse(torch.cat([grad_x1, grad_x2], dim=-1))[0]
    return inp, grad_inp, grads


def _generic_layer(
    flow: Flow,
    out: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    context: Tensor | None,
    inverse: bool,
    params: list[nn.Parameter],
    need_input: bool,
    need_context: bool,
):
    """Any flow: ``input = f^-1(out)`` without autograd, then ``f(input)`` with it."""
    apply, undo = (flow.inverse, flow) if inverse else (flow, flow.inverse)
    with torch.no_grad():
        inp = undo(out, context)[0]
    leaf = inp.detach().requires_grad_(need_input)
    rebuilt, logdet = apply(leaf, context)
    leaves = [leaf] if need_input else []
    (*leaf_grads,), grads = _grads(
        (rebuilt, logdet), (grad_out, grad_logdet), leaves, params, context, need_context
    )
    grad_inp = None
    if need_input:
        grad_inp = torch.zeros_like(leaf) if leaf_grads[0] is None else leaf_grads[0]
    return leaf.detach(), grad_inp, grads
