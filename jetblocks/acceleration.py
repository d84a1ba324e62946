"""Faster kernels for the CPU, applied to a built model in one step.

The model code is plain PyTorch: ``nn.Linear``, ``nn.GELU(approximate="tanh")`` and attention
through SDPA (xformers on CUDA where installed). What makes it faster on the CPUs measured
here is kept apart, in :func:`accelerate`, which changes the class of a model's layers in
place to a subclass computing the same function on other kernels; parameters, buffers and
the state dict are untouched, and :func:`decelerate` changes them back:

- ``nn.Linear`` -> :class:`~jetblocks.linear.OneDNNLinear`: float32 CPU products on oneDNN,
  forward and backward (MKL runs AVX2 kernels on AMD CPUs that have AVX-512; see
  :mod:`jetblocks.linear`);
- :class:`~jetblocks.vit.Attention` -> :class:`TunedAttention`: ``"auto"`` also picks the
  plain math attention for bfloat16/float16 CPU tensors (SDPA's CPU flash kernel is slow
  there, above all backward) and inside a compiled float32 training step (Inductor fuses
  the softmax; SDPA's CPU backward is slow on small heads);
- with ``inference=True``, ``nn.GELU(approximate="tanh")`` -> :class:`SigmoidGELU`, the same
  function as ``x * sigmoid(2u)`` (PyTorch's tanh is slow on these CPUs). Inference only:
  an invertible backward recomputes a layer with grad mode on, which must give the forward's
  values to the last bit.

Applied by default where it pays: by :class:`~jetblocks.train.Trainer` on a CPU, by
:meth:`~jetblocks.imageflow.ImageFlow.frozen` and by the ``jetblocks`` command's inference
on a CPU. One switch turns every default off: ``JETBLOCKS_ACCELERATE=0``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from jetblocks.linear import OneDNNLinear
from jetblocks.vit import Attention

__all__ = ["SigmoidGELU", "TunedAttention", "accelerate", "accelerate_by_default", "decelerate"]

_HALF_DTYPES = (torch.bfloat16, torch.float16)
# u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 2 sigmoid(2u) - 1.
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_B = _GELU_A * 0.044715


class TunedAttention(Attention):
    """:class:`~jetblocks.vit.Attention` whose ``"auto"`` adds the CPU rules (module docstring)."""

    def auto_backend(self, q: Tensor) -> str:
        if q.device.type != "cpu":
            return super().auto_backend(q)
        compiled_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
        if q.dtype in _HALF_DTYPES or (q.dtype == torch.float32 and compiled_training):
            return "math"
        return "sdpa"


class SigmoidGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")``; for float32 CPU tensors with grad mode off computed as
    ``x * sigmoid(2u)`` (the same function up to float32 rounding). With grad mode on it is
    PyTorch's kernel and its fused backward, whether or not the input needs a gradient."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        return x * torch.sigmoid(x * (_GELU_A + _GELU_B * x * x))


def _swaps(inference: bool) -> dict[type, type]:
    swaps: dict[type, type] = {nn.Linear: OneDNNLinear, Attention: TunedAttention}
    if inference:
        swaps[nn.GELU] = SigmoidGELU
    return swaps


def accelerate(model: nn.Module, *, inference: bool = False) -> nn.Module:
    """Move ``model``'s layers onto the faster kernels (in place; returns ``model``).

    Only layers of exactly the swapped classes change (a subclass of ``nn.Linear`` of your own
    is left as it is), and a GELU only with the tanh approximation.
    """
    swaps = _swaps(inference)
    for module in model.modules():
        faster = swaps.get(type(module))
        if faster is SigmoidGELU and module.approximate != "tanh":
            continue
        if faster is not None:
            module.__class__ = faster
    return model


def decelerate(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every layer back to its plain PyTorch class (in place)."""
    plain = {faster: base for base, faster in _swaps(inference=True).items()}
    for module in model.modules():
        if type(module) in plain:
            module.__class__ = plain[type(module)]
    return model


def accelerate_by_default(
    model: nn.Module, device: torch.device | str, *, inference: bool = False
) -> nn.Module:
    """:func:`accelerate` ``model`` if it runs on the CPU and ``JETBLOCKS_ACCELERATE`` is not
    ``0`` (the library's default wherever it builds or loads a model for you)."""
    switch = os.environ.get("JETBLOCKS_ACCELERATE", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"JETBLOCKS_ACCELERATE must be 0 or 1, got {switch!r}")
    if switch == "1" and torch.device(device).type == "cpu":
        accelerate(model, inference=inference)
    return model
