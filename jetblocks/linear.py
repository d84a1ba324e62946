"""``nn.Linear``'s maths with float32 CPU matmuls on oneDNN instead of PyTorch's BLAS.

PyTorch's CPU ``F.linear`` calls the BLAS it was built with (MKL in the official wheels), and
MKL runs its AVX2 kernels on AMD processors even where the CPU has AVX-512. oneDNN, which
PyTorch also ships, chooses its kernels from the CPU's instruction sets alone. On an AMD EPYC
(Zen 5) this doubles float32 matmul throughput (``benchmarks/throughput.py`` records each
kernel's peak). :func:`linear` is ``x W^T + b`` computed that way, forward and backward:

- forward: ``oneDNN(x, W) + b``;
- backward: ``dx = oneDNN(dy, W^T)``, ``dW = oneDNN(dy^T, x^T)`` (or ``oneDNN(x^T, dy^T)^T``,
  whichever has fewer rows), ``db = sum(dy)``;

the same function as ``F.linear`` up to float32 rounding (the summation order differs). It
takes over only where it helps: float32 tensors on the CPU outside autocast, with oneDNN
available, in products of at least :data:`ONEDNN_MIN_FLOPS`; everything else (CUDA,
float64, bf16 autocast, which PyTorch already sends to oneDNN) is plain ``F.linear``.

Model code uses plain ``nn.Linear``; :func:`jetblocks.acceleration.accelerate` turns a
model's ``nn.Linear`` layers into :class:`OneDNNLinear` (same parameters and state dict).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

__all__ = ["ONEDNN_MIN_FLOPS", "OneDNNLinear", "linear", "onednn_linear"]

_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()
# Below this many FLOPs (2 * rows * in * out) a call's fixed cost outweighs oneDNN's faster
# kernel (measured: forward breaks even near 8 MFLOP, forward + backward near 16-32 MFLOP).
ONEDNN_MIN_FLOPS = 16_000_000


@torch.library.custom_op("jetblocks::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W^T + b`` on oneDNN (``x [..., in]``, ``W [out, in]``, float32 CPU tensors); an
    operator of its own, so that ``torch.compile`` calls it as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_2d = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t())
    if ctx.needs_input_grad[1]:  # dy^T x, with the smaller of out and in as oneDNN's rows
        x_2d = x.reshape(-1, x.shape[-1])
        if weight.shape[0] < weight.shape[1]:
            grad_weight = onednn_linear(grad_2d.t(), x_2d.t())
        else:
            grad_weight = onednn_linear(x_2d.t(), grad_2d.t()).t()
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_2d.sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_backward, setup_context=_save)


@register_flop_formula(torch.ops.jetblocks.onednn_linear)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """What ``torch.utils.flop_counter`` counts for it: ``2 * rows * in * out``, as ``F.linear``."""
    return 2 * math.prod(x_shape) * weight_shape[0]


def _uses_onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 2
        and 2 * x.numel() * weight.shape[0] >= ONEDNN_MIN_FLOPS
        and not torch.is_autocast_enabled("cpu")
        and _ONEDNN_AVAILABLE
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for float32 CPU tensors (see the module)."""
    if _uses_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and initialisation) computed by :func:`linear`."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)
