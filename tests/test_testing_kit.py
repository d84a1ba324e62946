"""The testing kit itself: strategies, check_flow's contract and messages, the pytest entry."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jetblocks import Jet
from jetblocks.couplings import SPATIAL_PATTERNS, spatial_halves
from jetblocks.testing import (
    DEFAULT_TOLERANCES,
    PROPERTIES,
    CheckOptions,
    FlowCase,
    FlowCheckError,
    check_flow,
    default_tolerances,
    flow_test,
    parametrize_flows,
    strategies,
)
from jetblocks.testing.properties import _slope_mismatch

# -- flows used below ---------------------------------------------------------------------


class AffineCoupling1d(nn.Module):
    """The README's example: ``y2 = x2 * exp(s) + t`` with ``(t, s) = MLP(x1)``, ``s``
    squashed by tanh; log-det ``sum(s)``. The output layer starts at zero (the identity)."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim // 2, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _shift_and_log_scale(self, half: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(half).chunk(2, dim=-1)
        return shift, torch.tanh(raw)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x.chunk(2, dim=-1)
        shift, log_scale = self._shift_and_log_scale(x1)
        return torch.cat([x1, x2 * log_scale.exp() + shift], dim=-1), log_scale.sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y1, y2 = y.chunk(2, dim=-1)
        shift, log_scale = self._shift_and_log_scale(y1)
        return torch.cat([y1, (y2 - shift) * torch.exp(-log_scale)], dim=-1), -log_scale.sum(-1)


class Scale(nn.Module):
    """``y = x * exp(s)`` with a learnable per-element ``s``; ``mutate`` changes what it
    returns to break one part of the contract."""

    def __init__(self, shape: tuple[int, ...] = (4,), mutate=None) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full(shape, 0.3))
        self.mutate = mutate

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = x * self.log_scale.exp()
        logdet = self.log_scale.sum().expand(x.shape[0]).to(x.dtype)
        return self.mutate(x, y, logdet) if self.mutate else (y, logdet)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return y * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(y.shape[0])


class Flatten(nn.Module):
    """``[B, 2, 3] -> [B, 6]`` followed by an affine map: the output shape differs."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.flatten(1) + self.shift, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (y - self.shift).reshape(-1, 2, 3), y.new_zeros(y.shape[0])


class Sigmoid(nn.Module):
    """``y = sigmoid(a x)``, onto ``(0, 1)``: the inverse is only defined there."""

    def __init__(self) -> None:
        super().__init__()
        self.log_a = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x * self.log_a.exp()
        logdet = self.log_a + torch.nn.functional.logsigmoid(z) + torch.nn.functional.logsigmoid(-z)
        return torch.sigmoid(z), logdet.sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = torch.log(y) - torch.log1p(-y)
        logdet = self.log_a + torch.log(y) + torch.log1p(-y)
        return z * torch.exp(-self.log_a), -logdet.sum(-1)


class FailsOnCall(Scale):
    """Raises on exactly one call (its ``fail_on``-th): a failure that never reproduces."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls, self.fail_on = 0, fail_on

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("transient failure")
        return super().forward(x, context)


class Identity(nn.Module):
    """``y = x``, returning its input tensor itself (no copy) in both directions."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return y, y.new_zeros(y.shape[0])


class LeakyBackwardReLU(torch.autograd.Function):
    """ReLU whose backward is wrong: it lets 10% of the gradient through where ``x < 0``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, 0.1).to(grad.dtype)


class GlowBlock(nn.Module):
    """A Glow step on ``[B, C, H, W]``, like normflows' ``GlowBlock(C, hidden)``: actnorm,
    an invertible 1x1 conv, then an affine coupling ``y2 = (x2 + t) * sigmoid(r + 2)`` with
    ``(t, r)`` from a conv net with ReLUs (3x3, 1x1, 3x3; zero-initialised output layer).

    ``bug``: ``"detached_logdet"`` detaches the coupling's log-det from the conditioner,
    ``"wrong_backward"`` uses a ReLU whose backward is wrong. Neither changes any value
    (round trips, log-dets and their Jacobians are right); only gradients are wrong.
    """

    def __init__(self, channels: int = 4, hidden: int = 16, bug: str | None = None) -> None:
        super().__init__()
        self.bug = bug
        self.log_scale = nn.Parameter(torch.zeros(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))
        weight = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0))
        self.weight = nn.Parameter(torch.linalg.qr(weight)[0])
        self.conv1 = nn.Conv2d(channels // 2, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def _coupling(self, half: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        relu = LeakyBackwardReLU.apply if self.bug == "wrong_backward" else torch.relu
        h = self.conv3(relu(self.conv2(relu(self.conv1(half)))))
        shift, raw = h[:, 0::2], h[:, 1::2] + 2.0
        logdet = torch.nn.functional.logsigmoid(
            raw.detach() if self.bug == "detached_logdet" else raw
        )
        return shift, torch.sigmoid(raw), logdet.flatten(1).sum(-1)

    def _logdet(self, pixels: int) -> Tensor:
        return pixels * (self.log_scale.sum() + torch.linalg.slogdet(self.weight).logabsdet)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.einsum("ij,bjhw->bihw", self.weight, (x + self.bias) * self.log_scale.exp())
        x1, x2 = x.chunk(2, 1)
        shift, scale, logdet = self._coupling(x1)
        y = torch.cat([x1, (x2 + shift) * scale], 1)
        return y, self._logdet(x.shape[-2] * x.shape[-1]) + logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y1, y2 = y.chunk(2, 1)
        shift, scale, logdet = self._coupling(y1)
        x = torch.cat([y1, y2 / scale - shift], 1)
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight), x)
        logdet = self._logdet(y.shape[-2] * y.shape[-1]) + logdet
        return x * torch.exp(-self.log_scale) - self.bias, -logdet


# -- strategies ----------------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@given(strategies.event_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5, max_elements=24))
def test_event_shapes_respect_their_limits(shape):
    assert 1 <= len(shape) <= 3
    assert all(2 <= side <= 5 for side in shape)
    assert math.prod(shape) <= 24


def test_event_shapes_refuse_impossible_limits():
    with pytest.raises(ValueError, match="no shape"):
        seen_in(strategies.event_shapes(min_dims=3, min_side=4, max_elements=8), set)


@given(
    st.data(),
    st.sampled_from(DTYPES),
    st.sampled_from([3.0, (0.5, 2.0), (-1.0, 0.0), 1e-3]),
)
def test_tensors_are_bounded_finite_and_of_the_dtype(data, dtype, bound):
    low, high = strategies.bounds_of(bound)
    t = data.draw(strategies.tensors((2, 3, 4), dtype=dtype, bound=bound))
    assert t.shape == (2, 3, 4) and t.dtype == dtype
    assert torch.isfinite(t).all()
    assert low <= t.double().min() and t.double().max() <= high


def test_bounds_a_dtype_cannot_represent_are_rounded_inwards():
    low, high = strategies.representable_bounds(1e-3, torch.float16)
    assert low >= -1e-3 and high <= 1e-3 and high == torch.tensor(high, dtype=torch.float16)


def seen_in(strategy, describe, max_examples=100) -> set:
    """Everything ``describe`` returns over ``max_examples`` (derandomized) draws."""
    seen: set = set()

    @settings(max_examples=max_examples)
    @given(strategy)
    def record(value):
        seen.update(describe(value))

    record()
    return seen


def test_tensors_reach_the_bounds_and_zero():
    seen = seen_in(strategies.tensors((8,), bound=2.0), lambda t: set(t.tolist()))
    assert {-2.0, 0.0, 2.0} <= seen


def test_bounds_are_validated():
    assert strategies.bounds_of(2) == (-2.0, 2.0)
    for bad in ((1.0, 0.0), (0.0, math.inf), math.nan):
        with pytest.raises(ValueError, match="bounds"):
            strategies.bounds_of(bad)


@given(strategies.flow_examples((2, 3), (6,), (5,), batch_size=4, dtype=torch.float32))
def test_flow_examples_have_the_shapes_asked_for(example):
    assert example.x.shape == (4, 2, 3) and example.y.shape == (4, 6)
    assert example.context.shape == (4, 5) and example.context.dtype == torch.float32


@settings(max_examples=15)
@given(strategies.jet_configs())
def test_jet_configs_are_valid_and_small(config):
    assert config.token_dim % 2 == 0
    assert config.num_dims <= 48 and config.emb_dim % config.num_heads == 0
    if "spatial" in config.kinds:
        for pattern in config.spatial_patterns:
            spatial_halves(pattern, config.grid)  # raises if the grid does not halve
    torch.manual_seed(0)
    tokens, logdet = Jet(config)(torch.zeros(1, config.channels, *config.image_size))
    assert tokens.shape == (1, config.num_tokens, config.token_dim) and logdet.shape == (1,)


def test_jet_configs_cover_both_kinds_and_every_spatial_pattern():
    seen = seen_in(
        strategies.jet_configs(),
        lambda c: {c.kinds, *(c.spatial_patterns if "spatial" in c.kinds else ())},
    )
    assert {("channels",), ("spatial",), ("channels", "spatial")} <= seen
    assert set(SPATIAL_PATTERNS) <= seen


@settings(max_examples=3, suppress_health_check=[HealthCheck.nested_given])
@given(strategies.jet_configs(max_depth=2, context_dim=2))
def test_check_flow_passes_on_generated_jet_configs(config):
    shape = (config.channels, *config.image_size)
    check_flow(partial(Jet, config), event_shape=shape, context_shape=(2, 2), max_examples=4)


# -- check_flow ----------------------------------------------------------------------------


def test_default_tolerances_are_documented_per_dtype():
    assert default_tolerances(torch.float64) == (1e-8, 1e-6)
    assert default_tolerances(torch.float32) == (1e-4, 1e-4)
    assert set(DEFAULT_TOLERANCES) == set(DTYPES)
    doc = " ".join(check_flow.__doc__.split())
    for dtype, (atol, rtol) in DEFAULT_TOLERANCES.items():
        name = str(dtype).removeprefix("torch.")
        atol, rtol = (f"{t:.0e}".replace("e-0", "e-") for t in (atol, rtol))
        assert f"{name} ``atol={atol}, rtol={rtol}``" in doc or (
            f"{name} ``{atol}, {rtol}``" in doc
        ), name
    with pytest.raises(ValueError, match="pass atol and rtol"):
        default_tolerances(torch.complex64)


def test_readme_example_passes_quickly_and_reports_what_it_checked():
    report = check_flow(AffineCoupling1d(8), event_shape=(8,))
    assert report.flow == "AffineCoupling1d" and report.examples == 20
    assert report.output_shape == (8,)
    assert set(report.properties) == set(PROPERTIES) - {"setup"}
    assert report.seconds < 30  # about half a second on a 2-core CI runner


def test_the_users_module_and_global_state_are_left_alone():
    torch.manual_seed(123)
    flow = AffineCoupling1d(6).train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    check_flow(flow, event_shape=(6,), dtype=torch.float64, max_examples=3)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    assert all(p.dtype == torch.float32 and p.grad is None for p in flow.parameters())
    assert flow.training
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads


def test_an_output_of_another_shape_is_supported():
    report = check_flow(Flatten, event_shape=(2, 3))
    assert report.event_shape == (2, 3) and report.output_shape == (6,)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, y, ld: (y, ld[:, None]), r"log-det shape: expected \[B\]=\[3\]"),
        (lambda x, y, ld: (y, ld.float()), "log-det dtype: expected torch.float64"),
        (lambda x, y, ld: (y.float(), ld), "output dtype: expected torch.float64"),
        (lambda x, y, ld: (y[:, :2], ld), "keep the number of elements"),
        (lambda x, y, ld: y, r"must return a pair \(output, logdet\)"),
    ],
    ids=["logdet_shape", "logdet_dtype", "output_dtype", "element_count", "not_a_pair"],
)
def test_shape_and_dtype_violations_are_named(mutate, match):
    with pytest.raises(FlowCheckError, match=match) as caught:
        check_flow(partial(Scale, mutate=mutate), event_shape=(4,))
    assert caught.value.property == "shapes"


def test_non_finite_outputs_are_named():
    def nan_where_large(x, y, ld):
        return torch.where(x > 2.5, torch.nan, y), ld

    with pytest.raises(FlowCheckError, match="non-finite output") as caught:
        check_flow(partial(Scale, mutate=nan_where_large), event_shape=(4,))
    assert caught.value.property == "finite"


def test_an_exception_in_the_flow_names_the_property_and_keeps_the_cause():
    def refuse_single_examples(x, y, ld):
        if x.shape[0] == 1:
            raise RuntimeError("needs at least two examples")
        return y, ld

    with pytest.raises(FlowCheckError, match="needs at least two examples") as caught:
        check_flow(partial(Scale, mutate=refuse_single_examples), event_shape=(4,))
    assert caught.value.property == "batch_independence"
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_the_message_names_property_error_tolerance_shapes_and_reproduction():
    def off_by_one(x, y, ld):
        return y, ld + 1

    flow = partial(Scale, (2, 3), off_by_one)
    with pytest.raises(FlowCheckError) as caught:
        check_flow(flow, event_shape=(2, 3), context_shape=(5,))
    error = caught.value
    assert isinstance(error, AssertionError) and error.property == "forward_logdet"
    message = str(error)
    assert message.startswith("Scale fails property 'forward_logdet'")
    assert "largest error 1 " in message and "tolerance there" in message
    assert "x [3, 2, 3] -> y [3, 2, 3], log-det [3], context [3, 5]" in message
    assert error.error == pytest.approx(1.0) and error.tolerance < 1e-5
    assert error.blob is not None and f"reproduce={error.blob!r}" in message
    with pytest.raises(FlowCheckError, match="forward_logdet") as replayed:
        check_flow(flow, event_shape=(2, 3), context_shape=(5,), reproduce=error.blob)
    assert replayed.value.error == pytest.approx(error.error)


def test_failures_are_reproducible():
    flow = partial(Scale, mutate=lambda x, y, ld: (y, ld * 1.01))
    messages = set()
    for _ in range(2):
        with pytest.raises(FlowCheckError) as caught:
            check_flow(flow, event_shape=(4,))
        messages.add(str(caught.value))
    assert len(messages) == 1


def test_the_earliest_broken_property_is_reported():
    """Mutations that break several properties on different inputs: one FlowCheckError
    (never hypothesis's multiple-bug group) for the earliest property in the order."""

    def several_bugs(x, y, ld):
        high = (x > 2).any(-1)  # per example, so that examples stay independent
        low = (x < -2).any(-1, keepdim=True)
        return y + 1e-3 * low, torch.where(high, -ld, ld)  # round_trip_x, forward_logdet

    with pytest.raises(FlowCheckError) as caught:
        check_flow(partial(Scale, mutate=several_bugs), event_shape=(4,))
    assert caught.value.property == "round_trip_x"


@pytest.mark.parametrize("fail_on", [5, 40])
def test_a_flaky_failure_is_still_a_flow_check_error(fail_on):
    with pytest.raises(FlowCheckError, match="transient failure|flaky") as caught:
        check_flow(FailsOnCall(fail_on), event_shape=(4,))
    assert not isinstance(caught.value, hypothesis.errors.HypothesisException)


def test_inside_another_hypothesis_test_the_health_check_becomes_a_flow_check_error():
    @given(st.just(0))
    def outer(_):
        check_flow(Scale(), event_shape=(4,), max_examples=2)

    with pytest.raises(FlowCheckError, match="nested_given") as caught:
        outer()
    assert caught.value.property == "setup"


def test_a_factory_must_build_a_module():
    with pytest.raises(FlowCheckError, match="must return an nn.Module") as caught:
        check_flow(lambda: "not a flow", event_shape=(4,))
    assert caught.value.property == "setup"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"event_shape": (0, 3)}, "event_shape must be a tuple of positive ints"),
        ({"event_shape": (4,), "skip": ("roundtrip",)}, "unknown properties"),
        ({"event_shape": (4,), "inverse_inputs": "any"}, "inverse_inputs"),
        ({"event_shape": (4,), "bound": (1.0, -1.0)}, "bounds"),
        ({"event_shape": (4,), "batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_flow(Scale(), **kwargs)


def test_options_and_keywords_are_one_set_of_settings():
    """``options=CheckOptions(...)`` holds the same settings as the keywords; keywords win."""
    options = CheckOptions(max_examples=3, seed=1)
    assert check_flow(Scale(), event_shape=(4,), options=options).examples == 3
    assert check_flow(Scale(), event_shape=(4,), options=options, max_examples=2).examples == 2
    resolved = CheckOptions.resolve(options, {"max_examples": 2})
    assert resolved == CheckOptions(max_examples=2, seed=1) and options.max_examples == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 2  # type: ignore[misc]


def test_an_unknown_setting_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"option 'max_example' \(did you mean 'max_examples'\?\)"):
        check_flow(Scale(), event_shape=(4,), max_example=3)
    with pytest.raises(TypeError, match="unknown check_flow option 'tolerance'"):
        FlowCase("scale", Scale, (4,)).check(tolerance=1e-3)
    with pytest.raises(TypeError, match="unknown check_flow option 'examples'"):
        flow_test(Scale, event_shape=(4,), examples=3)  # when the test is made, not run
    with pytest.raises(TypeError, match="options must be a CheckOptions, got dict"):
        check_flow(Scale(), event_shape=(4,), options={"max_examples": 3})


def test_options_are_validated_and_normalised_when_built():
    with pytest.raises(ValueError, match="unknown properties"):
        CheckOptions(skip=("roundtrip",))
    with pytest.raises(ValueError, match="pass atol and rtol"):
        CheckOptions(dtype=torch.complex64)
    assert CheckOptions(dtype=torch.complex64, atol=1e-3, rtol=1e-3).tolerances == (1e-3, 1e-3)
    assert CheckOptions(atol=1e-6).tolerances == (1e-6, 1e-6)  # rtol: float64's default
    options = CheckOptions(skip=["gradients"], reproduce="AXic")
    assert options.skip == frozenset({"gradients"}) and options.reproduce == b"AXic"


def test_flows_onto_a_bounded_set_use_images_as_inverse_inputs():
    with pytest.raises(FlowCheckError) as caught:
        check_flow(Sigmoid, event_shape=(3,))  # inverse of y outside (0, 1) is NaN
    assert caught.value.property == "finite"
    check_flow(Sigmoid, event_shape=(3,), inverse_inputs="image")
    check_flow(Sigmoid, event_shape=(3,), output_bound=(0.05, 0.95))


def test_skipped_properties_are_not_checked():
    class LeakyMean(Scale):
        def forward(self, x, context=None):
            y, logdet = super().forward(x, context)
            return y, logdet + 0 * x.sum()  # a batch-wide sum with zero weight is harmless

    report = check_flow(LeakyMean, event_shape=(4,), skip=("state_dict", "gradients"))
    assert "state_dict" not in report.properties and "gradients" not in report.properties


def test_float32_uses_its_own_tolerances():
    report = check_flow(partial(AffineCoupling1d, 6), event_shape=(6,), dtype=torch.float32)
    assert report.examples == 20
    with pytest.raises(FlowCheckError, match=r"rtol 0\.0001") as caught:
        check_flow(partial(Scale, mutate=lambda x, y, ld: (y, -ld)), event_shape=(4,),
                   dtype=torch.float32)  # fmt: skip
    assert caught.value.property == "forward_logdet"


# -- the pytest entry ----------------------------------------------------------------------

test_readme_flow_in_one_line = flow_test(partial(AffineCoupling1d, 8), event_shape=(8,))


def test_flow_test_builds_a_named_failing_test_for_a_broken_flow():
    test = flow_test(partial(Scale, mutate=lambda x, y, ld: (y, 2 * ld)), event_shape=(4,))
    assert test.__name__.startswith("test_")
    with pytest.raises(FlowCheckError, match="forward_logdet"):
        test()


CASES = [
    FlowCase("scale", Scale, (4,)),
    FlowCase("coupling", partial(AffineCoupling1d, 4), (4,), options=CheckOptions(max_examples=5)),
]


@parametrize_flows(CASES)
def test_parametrized_cases(case):
    assert case.check(max_examples=3).examples == 3
    assert str(case) == case.id


def test_parametrize_flows_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="repeated"):
        parametrize_flows([CASES[0], CASES[0]])


# -- gradients: aliasing, kinks, finite_differences ------------------------------------------


def test_an_identity_returning_its_input_itself_passes():
    """The output *is* the input: finite differences must not restore the moved input before
    evaluating the objective (they used to, and the identity failed ``gradients``)."""
    report = check_flow(Identity, event_shape=(4,))
    assert "gradients" in report.properties


@pytest.mark.parametrize(
    ("event_shape", "seed", "max_examples"),
    [((4, 3, 3), 14, 20), ((4, 8, 8), 15, 2)],
    ids=["4x3x3", "4x8x8"],
)
def test_a_glow_block_with_relus_passes_where_a_step_crosses_a_kink(
    event_shape, seed, max_examples
):
    """At these seeds a ReLU input crosses zero within the central difference's step (the
    estimates at steps 1e-5 and 5e-6 disagree): autograd agrees with a one-sided difference."""
    report = check_flow(GlowBlock, event_shape=event_shape, seed=seed, max_examples=max_examples)
    assert "gradients" in report.properties


@pytest.mark.parametrize("bug", ["detached_logdet", "wrong_backward"])
@pytest.mark.parametrize("seed", [0, 14])
def test_a_wrong_gradient_of_a_relu_flow_is_still_caught(bug, seed):
    with pytest.raises(FlowCheckError, match="disagrees with finite differences") as caught:
        check_flow(partial(GlowBlock, bug=bug), event_shape=(4, 3, 3), seed=seed)
    assert caught.value.property == "gradients"
    assert caught.value.error > caught.value.tolerance


@pytest.mark.parametrize("kink_at", [0.0, 3e-6, -7e-6, 1.5e-5])
def test_finite_differences_across_a_kink_accept_either_side_and_nothing_else(kink_at):
    """``L(t) = 0.3 t + 2 relu(t - kink_at)``, a kink within ``2 eps`` of ``t = 0``: autograd's
    slope of the piece ``t = 0`` is on passes (at the kink itself either piece's slope does),
    any other slope fails and the failure reports the kink."""

    def objective_at(t: float) -> float:
        return 5.0 + 0.3 * t + 2.0 * max(t - kink_at, 0.0)

    right_slopes = {0.0: (0.3, 2.3)}.get(kink_at, (0.3,) if kink_at > 0 else (2.3,))
    for slope in right_slopes:
        assert _slope_mismatch(objective_at, slope, 1e-5, 5.0) is None, slope
    for wrong in (0.6, 0.31, 2.29):
        error, tolerance, details = _slope_mismatch(objective_at, wrong, 1e-5, 5.0)
        assert error > tolerance and "disagree with each other: a kink" in details, wrong


def test_finite_differences_of_a_smooth_objective_accept_only_its_slope():
    def objective_at(t: float) -> float:
        return math.exp(1 + 2 * t)

    assert _slope_mismatch(objective_at, 2 * math.e, 1e-5, math.e) is None
    error, tolerance, details = _slope_mismatch(objective_at, 2.001 * math.e, 1e-5, math.e)
    assert error > tolerance and "no kink here" in details


def test_a_wrong_custom_backward_of_a_smooth_flow_is_caught_as_such():
    class WrongBackwardExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s: Tensor) -> Tensor:
            ctx.save_for_backward(s)
            return s.exp()

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:
            (s,) = ctx.saved_tensors
            return 1.1 * grad * s.exp()

    class WrongScale(Scale):
        def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
            logdet = self.log_scale.sum().expand(x.shape[0])
            return x * WrongBackwardExp.apply(self.log_scale), logdet

    with pytest.raises(FlowCheckError, match="agree with each other") as caught:
        check_flow(WrongScale, event_shape=(4,))
    assert caught.value.property == "gradients"
    assert "no kink here" in str(caught.value) and "'log_scale'" in str(caught.value)


def test_finite_differences_false_keeps_only_the_autograd_part_of_gradients():
    wrong = partial(GlowBlock, bug="wrong_backward")
    report = check_flow(wrong, event_shape=(4, 3, 3), finite_differences=False)
    assert "gradients" in report.properties  # the wrong backward goes unseen

    class UnusedParameter(Scale):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))

    with pytest.raises(FlowCheckError, match="no gradient .* reaches 'unused'") as caught:
        check_flow(UnusedParameter, event_shape=(4,), finite_differences=False)
    assert caught.value.property == "gradients"
    assert "finite_differences=False" in " ".join(check_flow.__doc__.split())
    case = FlowCase("wrong", wrong, (4, 3, 3), options=CheckOptions(finite_differences=False))
    assert case.check(max_examples=2).examples == 2


# -- messages of the shapes property ---------------------------------------------------------


def test_a_scalar_logdet_is_reported_with_the_expected_and_received_shapes():
    with pytest.raises(FlowCheckError) as caught:
        check_flow(partial(Scale, mutate=lambda x, y, ld: (y, ld.sum())), event_shape=(4,))
    assert caught.value.property == "shapes"
    message = str(caught.value)
    assert "log-det shape: expected [B]=[3] (one value per example" in message
    assert "received []" in message
    assert "received from forward(): output [3, 4] (torch.float64), log-det [] " in message
    assert "expected x [3, 4] -> y [3, 4], log-det [B]=[3], context None" in message
    assert "log-det [3]" not in message  # what the flow returned was [], not [3]
