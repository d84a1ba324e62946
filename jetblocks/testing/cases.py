"""One-line pytest entries for :func:`~jetblocks.testing.check_flow`.

test_my_flow = flow_test(MyFlow, event_shape=(8,))        # a whole test, one line

CASES = [FlowCase("my_flow", MyFlow, event_shape=(8,)), ...]

@parametrize_flows(CASES)                                 # one test per case
def test_flows(case):
    case.check()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from jetblocks.testing.checks import FlowCheckReport, check_flow
from jetblocks.testing.options import CheckOptions

__all__ = ["FlowCase", "flow_test", "parametrize_flows"]


@dataclasses.dataclass(frozen=True)
class FlowCase:
    """A flow to check: an id, a factory (or a module), its shapes and the
    :class:`CheckOptions` to check it with."""

    id: str
    flow: Callable[[], nn.Module] | nn.Module
    event_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None = None
    options: CheckOptions = dataclasses.field(default_factory=CheckOptions)

    def check(self, **overrides: Any) -> FlowCheckReport:
        """Run :func:`check_flow` on this case (``overrides`` replace settings of
        ``options``)."""
        __tracebackhide__ = True
        return check_flow(
            self.flow,
            event_shape=self.event_shape,
            context_shape=self.context_shape,
            options=self.options,
            **overrides,
        )

    def __str__(self) -> str:
        return self.id


def flow_test(
    flow: Callable[[], nn.Module] | nn.Module,
    *,
    event_shape: tuple[int, ...],
    context_shape: tuple[int, ...] | None = None,
    options: CheckOptions | None = None,
    **overrides: Any,
) -> Callable[[], None]:
    """A pytest test function running :func:`check_flow` with these arguments; assign it
    to a ``test_*`` name in a test module. An unknown setting fails at once (``TypeError``)."""
    name = getattr(flow, "__name__", type(flow).__name__)
    case = FlowCase(
        name, flow, event_shape, context_shape, CheckOptions.resolve(options, overrides)
    )

    def test() -> None:
        __tracebackhide__ = True
        case.check()

    test.__name__ = test.__qualname__ = f"test_{name}_follows_the_flow_contract"
    test.__doc__ = f"check_flow on {case!r}"
    return test


def parametrize_flows(cases: Iterable[FlowCase], argname: str = "case"):
    """``pytest.mark.parametrize`` over ``cases``, with each case's id as the test id."""
    import pytest

    cases = list(cases)
    ids = [case.id for case in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"flow case ids must be unique; repeated: {duplicated}")
    return pytest.mark.parametrize(argname, [pytest.param(case, id=case.id) for case in cases])
