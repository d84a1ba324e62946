"""Perturbing a module's parameters so that tests see a non-trivial map.

Jet's couplings start as the exact identity (zero-initialised output layers), which hides
every bug in a log-det or an inverse; tests must perturb the weights first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = [
    "perturb_parameters_",
    "perturbed_copy",
]


@torch.no_grad()
def perturb_parameters_(module: nn.Module, *, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add ``N(0, scale^2)`` noise to every floating-point parameter of ``module`` in place.

    The noise is drawn on the CPU from a generator seeded with ``seed``, so the result is
    the same on every device. Returns ``module``.
    """
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        if parameter.is_floating_point():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_((scale * noise).to(parameter.device, parameter.dtype))
    return module


def perturbed_copy(module: nn.Module, *, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """A deep copy of ``module`` with perturbed parameters; ``module`` is left untouched."""
    return perturb_parameters_(copy.deepcopy(module), scale=scale, seed=seed)
