"""A catalogue of deliberately broken flows, each caught by ``check_flow`` with the right
property named, next to correct reference implementations that pass (no false positives).

The flows are plain ``nn.Module`` s written the way a user would, following the contract
``forward(x, context=None) -> (y, logdet [B])`` and ``inverse(y, context=None) -> (x,
logdet [B])``. Every log-det bug comes in two flavours: one-sided (the inverse is right)
and consistent (the inverse returns exactly minus the wrong forward value, so ``logdet(f) +
logdet(f^-1) == 0`` holds and only the comparison with the autograd Jacobian catches it).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from jetblocks import AffineCoupling, ChannelSplit, ViTConditioner
from jetblocks.testing import FlowCheckError, check_flow, perturbed_copy

N = 6  # elements per example of the elementwise flows and MLP couplings
LOGDET_BUGS = ("sign", "constant", "missing_term", "mean", "at_output")


def log_cosh(x: Tensor) -> Tensor:
    """``log cosh x``, stable for large ``|x|``."""
    return torch.logaddexp(x, -x) - math.log(2)


class Sinh(nn.Module):
    """``y = exp(a) * sinh(x) + b`` per element: ``log|dy/dx| = a + log cosh x``.

    ``bug`` breaks the forward log-det: ``"sign"`` negates it, ``"constant"`` adds 0.5,
    ``"missing_term"`` drops element 0's term, ``"mean"`` averages instead of summing,
    ``"at_output"`` evaluates the terms at ``y`` instead of ``x``. With ``consistent`` the
    inverse returns minus that same wrong value; ``inverse_not_negated`` makes the inverse
    return ``+ld_f`` instead of ``-ld_f``.
    """

    def __init__(self, bug: str | None = None, consistent: bool = False,
                 inverse_not_negated: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.bug, self.consistent, self.inverse_not_negated = bug, consistent, inverse_not_negated
        self.log_a = nn.Parameter(torch.zeros(N))
        self.b = nn.Parameter(torch.zeros(N))

    def terms(self, x: Tensor) -> Tensor:
        return self.log_a + log_cosh(x)

    def forward_logdet(self, x: Tensor, y: Tensor) -> Tensor:
        terms = self.terms(y if self.bug == "at_output" else x)
        if self.bug == "sign":
            return -terms.sum(-1)
        if self.bug == "constant":
            return terms.sum(-1) + 0.5
        if self.bug == "missing_term":
            return terms[..., 1:].sum(-1)
        if self.bug == "mean":
            return terms.mean(-1)
        return terms.sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.log_a.exp() * torch.sinh(x) + self.b
        return y, self.forward_logdet(x, y)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.asinh((y - self.b) * torch.exp(-self.log_a))
        if self.consistent:
            return x, -self.forward_logdet(x, y)
        true = self.terms(x).sum(-1)
        return x, true if self.inverse_not_negated else -true


class ElementwiseAffine(nn.Module):
    """``y = x * exp(s) + t`` per element, log-det ``sum(s)``.

    Bugs: ``"inverse_wrong_order"`` (``x = y * exp(-s) - t``), ``"in_place"`` (writes ``y``
    into the caller's ``x``), ``"detached"`` (``s`` detached everywhere, so it never
    trains), ``"detached_logdet"`` (``s`` detached in the log-det only).
    """

    def __init__(self, bug: str | None = None) -> None:
        super().__init__()
        self.bug = bug
        self.log_scale = nn.Parameter(torch.zeros(N))
        self.shift = nn.Parameter(torch.zeros(N))

    def _scales(self) -> tuple[Tensor, Tensor]:
        s = self.log_scale.detach() if self.bug == "detached" else self.log_scale
        detached = self.bug in ("detached", "detached_logdet")
        return s, (self.log_scale.detach() if detached else self.log_scale).sum()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, logdet = self._scales()
        y = x.mul_(s.exp()).add_(self.shift) if self.bug == "in_place" else x * s.exp() + self.shift
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, logdet = self._scales()
        if self.bug == "inverse_wrong_order":
            x = y * torch.exp(-s) - self.shift
        else:
            x = (y - self.shift) * torch.exp(-s)
        return x, -logdet.expand(y.shape[0])


class ResidualTanh(nn.Module):
    """``y = x + c * tanh(x)`` with ``c = 0.9 tanh(w)`` in ``(-0.9, 0.9)``: increasing, with
    ``log|dy/dx| = log(1 + c sech^2 x)``. The inverse has no closed form: 30 Newton steps
    (exact to rounding), or, with ``approximate``, 3 fixed-point steps (not the inverse)."""

    def __init__(self, approximate: bool = False) -> None:
        super().__init__()
        self.approximate = approximate
        self.w = nn.Parameter(torch.full((N,), 0.5))

    def _log_derivative(self, x: Tensor, c: Tensor) -> Tensor:
        return torch.log1p(c * (1 - torch.tanh(x) ** 2))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = 0.9 * torch.tanh(self.w)
        return x + c * torch.tanh(x), self._log_derivative(x, c).sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = 0.9 * torch.tanh(self.w)
        x = y
        for _ in range(3 if self.approximate else 30):
            if self.approximate:
                x = y - c * torch.tanh(x)
            else:
                x = x - (x + c * torch.tanh(x) - y) / (1 + c * (1 - torch.tanh(x) ** 2))
        return x, -self._log_derivative(x, c).sum(-1)


class MeanShift(nn.Module):
    """``y = x + mean(x)``, an exact bijection with ``det = 2``: ``mean(y) = 2 mean(x)``, so
    ``x = y - mean(y) / 2``. With ``over_batch`` the mean is over the batch (a batch
    statistic): still invertible on the whole batch, but examples leak into each other."""

    def __init__(self, over_batch: bool = False) -> None:
        super().__init__()
        self.over_batch = over_batch

    def _mean(self, t: Tensor) -> Tensor:
        return t.mean(0, keepdim=True) if self.over_batch else t.mean(-1, keepdim=True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self._mean(x), x.new_full((x.shape[0],), math.log(2))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return y - self._mean(y) / 2, y.new_full((y.shape[0],), -math.log(2))


class MLPCoupling(nn.Module):
    """Affine coupling on ``[B, N]``: ``(t, r) = MLP(x1[, context])``, ``y2 = x2 * exp(tanh r)
    + t``, log-det ``sum(tanh r)``; the MLP's output layer starts at zero (the identity).

    Bugs: ``"logdet_raw"`` uses ``sum(r)`` (right only while ``r = 0``, i.e. while the
    output layer is zero), ``"inverse_ignores_context"`` / ``"forward_ignores_context"``
    replace the context by zeros in one direction. ``dropout`` adds a dropout layer, which
    makes the flow random in training mode; ``activation`` is the hidden nonlinearity.
    """

    def __init__(self, bug: str | None = None, context_dim: int | None = None,
                 dropout: float = 0.0, activation: type[nn.Module] = nn.Tanh) -> None:  # fmt: skip
        super().__init__()
        self.bug = bug
        layers = [nn.Linear(N // 2 + (context_dim or 0), 16), activation()]
        layers += [nn.Dropout(dropout)] if dropout else []
        self.net = nn.Sequential(*layers, nn.Linear(16, N))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, x1: Tensor, context: Tensor | None, direction: str):
        if context is not None and self.bug == f"{direction}_ignores_context":
            context = torch.zeros_like(context)
        h = x1 if context is None else torch.cat([x1, context], -1)
        shift, raw = self.net(h).chunk(2, -1)
        log_scale = torch.tanh(raw)
        return shift, log_scale, (raw if self.bug == "logdet_raw" else log_scale).sum(-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x.chunk(2, -1)
        shift, log_scale, logdet = self._params(x1, context, "forward")
        return torch.cat([x1, x2 * log_scale.exp() + shift], -1), logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y1, y2 = y.chunk(2, -1)
        shift, log_scale, logdet = self._params(y1, context, "inverse")
        return torch.cat([y1, (y2 - shift) * torch.exp(-log_scale)], -1), -logdet


class RandomPermutation(nn.Module):
    """Permutes the ``N`` elements by a permutation drawn from torch's global RNG.

    The permutation must be a (persistent) buffer so a checkpoint restores it; with
    ``persistent=False`` it is missing from the state dict.
    """

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("perm", torch.randperm(N), persistent=persistent)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[..., self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return y[..., torch.argsort(self.perm)], y.new_zeros(y.shape[0])


class SignFlippedCoupling(AffineCoupling):
    """jetblocks' coupling with both log-dets negated: a consistent sign bug that an
    identity-initialised (zero output layer) coupling hides, since its log-det is 0."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = super().forward(x, context)
        return y, -logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet = super().inverse(y, context)
        return x, -logdet


def jet_coupling(cls: type[AffineCoupling] = AffineCoupling) -> AffineCoupling:
    """A Jet coupling on tokens ``[B, 2, 4]`` with a zero-initialised ViT output layer."""
    vit = ViTConditioner(d_in=2, d_out=4, num_tokens=2, emb_dim=8, depth=1, num_heads=2)
    return cls(ChannelSplit(4, seed=0), vit)


# (id, factory, event shape, context shape, the property that must be named)
BROKEN = [
    *(
        (f"logdet_{bug}{'_consistent' * consistent}", partial(Sinh, bug, consistent), (N,),
         None, "forward_logdet")
        for bug in LOGDET_BUGS
        for consistent in (False, True)
    ),
    ("inverse_wrong_order", partial(ElementwiseAffine, "inverse_wrong_order"), (N,), None,
     "round_trip_x"),
    ("inverse_approximate", partial(ResidualTanh, approximate=True), (N,), None, "round_trip_x"),
    ("inverse_logdet_not_negated", partial(Sinh, inverse_not_negated=True), (N,), None,
     "inverse_logdet"),
    ("batch_statistics", partial(MeanShift, over_batch=True), (N,), None, "batch_independence"),
    ("context_ignored_by_inverse", partial(MLPCoupling, "inverse_ignores_context", 3), (N,),
     (3,), "round_trip_x"),
    ("context_ignored_by_forward", partial(MLPCoupling, "forward_ignores_context", 3), (N,),
     (3,), "round_trip_x"),
    ("logdet_right_only_at_zero_output", partial(MLPCoupling, "logdet_raw"), (N,), None,
     "forward_logdet"),
    ("logdet_sign_jet_coupling", partial(jet_coupling, SignFlippedCoupling), (2, 4), None,
     "forward_logdet"),
    ("in_place_input", partial(ElementwiseAffine, "in_place"), (N,), None, "no_input_mutation"),
    ("dropout_in_train_mode", partial(MLPCoupling, dropout=0.5), (N,), None, "determinism"),
    ("detached_parameter", partial(ElementwiseAffine, "detached"), (N,), None, "gradients"),
    ("detached_logdet", partial(ElementwiseAffine, "detached_logdet"), (N,), None, "gradients"),
    ("buffer_not_in_state_dict", partial(RandomPermutation, persistent=False), (N,), None,
     "state_dict"),
]  # fmt: skip

# The correct reference implementations of the broken flows above.
CORRECT = [
    ("sinh", Sinh, (N,), None),
    ("elementwise_affine", ElementwiseAffine, (N,), None),
    ("residual_tanh_newton_inverse", ResidualTanh, (N,), None),
    ("mean_shift_per_example", MeanShift, (N,), None),
    ("mlp_coupling", MLPCoupling, (N,), None),
    ("relu_mlp_coupling", partial(MLPCoupling, activation=nn.ReLU), (N,), None),  # kinks
    ("conditional_mlp_coupling", partial(MLPCoupling, context_dim=3), (N,), (3,)),
    ("dropout_coupling_in_eval_mode", lambda: MLPCoupling(dropout=0.5).eval(), (N,), None),
    ("random_permutation", RandomPermutation, (N,), None),
    ("jet_coupling", jet_coupling, (2, 4), None),
]


@pytest.mark.parametrize(
    ("factory", "event_shape", "context_shape", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in BROKEN],
)
def test_broken_flow_is_caught_with_the_right_property(
    factory, event_shape, context_shape, expected
):
    with pytest.raises(FlowCheckError) as caught:
        check_flow(factory, event_shape=event_shape, context_shape=context_shape)
    assert caught.value.property == expected, str(caught.value)
    assert f"property {expected!r}" in str(caught.value)


@pytest.mark.parametrize(
    ("factory", "event_shape", "context_shape"),
    [pytest.param(*case[1:], id=case[0]) for case in CORRECT],
)
def test_correct_reference_flow_passes(factory, event_shape, context_shape):
    report = check_flow(factory, event_shape=event_shape, context_shape=context_shape)
    assert report.examples == 20


@pytest.mark.parametrize("bug", LOGDET_BUGS)
def test_consistent_logdet_bugs_fool_the_sum_check(bug):
    """What many libraries test, ``logdet(f) + logdet(f^-1) == 0`` with an exact round
    trip, passes for every consistent bug: only the Jacobian comparison catches them."""
    flow = perturbed_copy(Sinh(bug, consistent=True).double(), scale=0.3)
    x = torch.linspace(-3, 3, 4 * N, dtype=torch.float64).reshape(4, N)
    y, forward_logdet = flow(x)
    x_back, inverse_logdet = flow.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(forward_logdet + inverse_logdet, torch.zeros(4, dtype=x.dtype))
    with pytest.raises(FlowCheckError, match="forward_logdet"):
        check_flow(partial(Sinh, bug, consistent=True), event_shape=(N,))


@pytest.mark.parametrize(
    ("factory", "event_shape"),
    [
        pytest.param(partial(MLPCoupling, "logdet_raw"), (N,), id="mlp_coupling_logdet_raw"),
        pytest.param(partial(jet_coupling, SignFlippedCoupling), (2, 4), id="jet_coupling_sign"),
    ],
)
def test_identity_initialised_bug_is_caught_only_with_perturbation(factory, event_shape):
    """Why ``perturb=True`` is the default: a zero-initialised output layer makes the
    coupling the identity (log-det 0, scale 1), where these log-det bugs vanish."""
    check_flow(factory, event_shape=event_shape, perturb=False)  # misses the bug
    with pytest.raises(FlowCheckError) as caught:
        check_flow(factory, event_shape=event_shape)
    assert caught.value.property == "forward_logdet"


def test_a_buffer_missing_from_the_state_dict_needs_a_factory_to_be_seen():
    """A deep copy of a module shares its non-persistent buffer, so only a freshly built
    instance (pass the class or a factory, not a module) shows the lost state."""
    torch.manual_seed(0)
    check_flow(RandomPermutation(persistent=False), event_shape=(N,))
    with pytest.raises(FlowCheckError, match="state_dict"):
        check_flow(partial(RandomPermutation, persistent=False), event_shape=(N,))
