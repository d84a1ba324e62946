"""zuko, nflows and normflows flows behind the jetblocks flow contract, for ``check_flow``.

    check_flow(from_zuko(zuko.flows.MAF(4, transforms=2)), event_shape=(4,))
    check_flow(from_nflows(MaskedAffineAutoregressiveTransform(4, 16)), event_shape=(4,))
    check_flow(from_normflows(normflows.flows.MaskedAffineFlow(mask, t, s)), event_shape=(4,))

Each adapter is an ``nn.Module`` whose ``forward(x, context=None) -> (y, logdet [B])`` maps
data to latent (the direction a likelihood uses) and whose ``inverse(y, context=None)`` maps
back, each with the log-det of the map it applies. The wrapped flow is its submodule
``wrapped``, so its parameters are cast, perturbed and checked. Log-dets are put in the
contract's form: summed over every dim after the batch dim (zuko's elementwise transforms
give one per element), a scalar (normflows' constant log-dets) broadcast to the batch, in
float64 for float64 inputs and float32 otherwise. Each library is imported only when its
adapter is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from jetblocks.testing.properties import expected_logdet_dtype

__all__ = ["from_nflows", "from_normflows", "from_zuko"]


def from_zuko(transform: Any) -> ZukoAdapter:
    """A zuko ``LazyTransform`` (such as ``MaskedAutoregressiveTransform(4)``) as a jetblocks
    flow; of a zuko ``Flow`` (such as ``MAF(4)``), its ``.transform``. A fixed
    ``torch.distributions.Transform`` keeps its tensors outside any module: wrap it in
    ``zuko.flows.UnconditionalTransform(TransformClass, *tensors)`` first."""
    flows = _library("zuko.flows", "zuko", "from_zuko")
    if isinstance(transform, flows.Flow):
        transform = transform.transform
    _require_type(
        transform,
        flows.LazyTransform,
        "from_zuko",
        "a zuko LazyTransform or Flow (wrap a fixed Transform in "
        "zuko.flows.UnconditionalTransform)",
    )
    return ZukoAdapter(transform)


def from_nflows(transform: Any) -> NflowsAdapter:
    """An nflows ``Transform`` (such as ``MaskedAffineAutoregressiveTransform(4, 16)``) as a
    jetblocks flow."""
    transforms = _library("nflows.transforms", "nflows", "from_nflows")
    _require_type(transform, transforms.Transform, "from_nflows", "an nflows Transform")
    return NflowsAdapter(transform)


def from_normflows(flow: Any) -> NormflowsAdapter:
    """A normflows ``Flow`` layer (such as ``MaskedAffineFlow(mask, t, s)``) as a jetblocks
    flow. normflows' ``forward`` maps latent to data (it samples), so the adapter's
    ``forward`` is the flow's ``inverse`` and its ``inverse`` the flow's ``forward``."""
    flows = _library("normflows.flows", "normflows", "from_normflows")
    _require_type(flow, flows.Flow, "from_normflows", "a normflows Flow")
    return NormflowsAdapter(flow)


class _Adapter(nn.Module):
    """A third-party flow, ``wrapped``, behind the flow contract; subclasses call it in
    ``_to_latent`` (data to latent) and ``_to_data``, returning ``(output, its log-det)``."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = self._to_latent(x, context)
        return y, _per_example(logdet, x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet = self._to_data(y, context)
        return x, _per_example(logdet, y)


class ZukoAdapter(_Adapter):
    """A zuko lazy transform: ``transform(context)`` maps data to latent."""

    def _to_latent(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.wrapped(context).call_and_ladj(x)

    def _to_data(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.wrapped(context).inv.call_and_ladj(y)


class NflowsAdapter(_Adapter):
    """An nflows transform: ``forward`` maps data to noise, as in the contract."""

    def _to_latent(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.wrapped(x, context=context)

    def _to_data(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.wrapped.inverse(y, context=context)


class NormflowsAdapter(_Adapter):
    """A normflows flow: its ``inverse`` maps data to latent, its ``forward`` samples."""

    def _to_latent(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Any]:
        return _with_context(self.wrapped.inverse, x, context)

    def _to_data(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Any]:
        return _with_context(self.wrapped.forward, y, context)


def _with_context(method: Callable, inp: Tensor, context: Tensor | None) -> tuple[Tensor, Any]:
    """Call a normflows method, passing ``context`` only to the conditional flows that take
    one (most normflows flows have no context argument)."""
    return method(inp) if context is None else method(inp, context=context)


def _per_example(logdet: Tensor | float, inp: Tensor) -> Tensor:
    """``logdet`` as the contract's ``[B]``: a scalar broadcast to the batch, dims after the
    batch dim summed, in the contract's dtype for ``inp``."""
    logdet = torch.as_tensor(logdet, device=inp.device)
    if logdet.dim() == 0:
        logdet = logdet.expand(inp.shape[0])
    elif logdet.dim() > 1:
        logdet = logdet.flatten(1).sum(-1)
    return logdet.to(expected_logdet_dtype(inp.dtype))


def _library(module: str, package: str, adapter: str) -> ModuleType:
    """Import ``module``, or raise a one-line ``ImportError`` naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{adapter} needs {package}: pip install {package} (or 'jetblocks[adapters]')"
        ) from error


def _require_type(value: Any, cls: type, adapter: str, expected: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{adapter} expects {expected}, got {type(value).__name__}")
