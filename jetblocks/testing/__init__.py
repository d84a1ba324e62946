"""Testing tools for flows: parameter perturbation and the property-check kit.

``check_flow(flow, event_shape=...)`` runs hypothesis-driven checks of the flow contract
(round trips, log-dets against autograd Jacobians, batch independence, gradients, ...) and
raises :class:`FlowCheckError` naming the broken property; its settings are one
:class:`CheckOptions`. ``from_zuko``, ``from_nflows`` and ``from_normflows`` put those
libraries' flows behind the contract. Needs ``hypothesis``.
"""

from jetblocks.testing.perturb import perturb_parameters_, perturbed_copy

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jetblocks.testing needs hypothesis: pip install 'hypothesis>=6.100'"
    ) from error

from jetblocks.testing import strategies
from jetblocks.testing.adapters import from_nflows, from_normflows, from_zuko
from jetblocks.testing.cases import FlowCase, flow_test, parametrize_flows
from jetblocks.testing.checks import FlowCheckReport, check_flow
from jetblocks.testing.options import DEFAULT_TOLERANCES, CheckOptions, default_tolerances
from jetblocks.testing.properties import PROPERTIES, FlowCheckError

__all__ = [
    "DEFAULT_TOLERANCES",
    "PROPERTIES",
    "CheckOptions",
    "FlowCase",
    "FlowCheckError",
    "FlowCheckReport",
    "check_flow",
    "default_tolerances",
    "flow_test",
    "from_nflows",
    "from_normflows",
    "from_zuko",
    "parametrize_flows",
    "perturb_parameters_",
    "perturbed_copy",
    "strategies",
]
