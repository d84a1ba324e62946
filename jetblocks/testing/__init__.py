"""Testing tools for flows: parameter perturbation and the property-check kit.

``check_flow(flow, event_shape=...)`` runs hypothesis-driven checks of the flow contract
(round trips, log-dets against autograd Jacobians, batch independence, gradients, ...) and
raises :class:`FlowCheckError` naming the broken property. Needs ``hypothesis``.
"""

from jetblocks.testing.perturb import perturb_parameters_, perturbed_copy

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jetblocks.testing needs hypothesis: pip install 'hypothesis>=6.100'"
    ) from error

from jetblocks.testing import strategies
from jetblocks.testing.cases import FlowCase, flow_test, parametrize_flows
from jetblocks.testing.checks import (
    DEFAULT_TOLERANCES,
    FlowCheckReport,
    check_flow,
    default_tolerances,
)
from jetblocks.testing.properties import PROPERTIES, FlowCheckError

__all__ = [
    "DEFAULT_TOLERANCES",
    "PROPERTIES",
    "FlowCase",
    "FlowCheckError",
    "FlowCheckReport",
    "check_flow",
    "default_tolerances",
    "flow_test",
    "parametrize_flows",
    "perturb_parameters_",
    "perturbed_copy",
    "strategies",
]
