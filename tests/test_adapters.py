"""check_flow on zuko, nflows and normflows flows through ``jetblocks.testing``'s adapters.

Each library is optional (the ``adapters`` extra): its tests are skipped without it, except
the ones about the message a missing library gives, which simulate its absence.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import Tensor, nn

from jetblocks.testing import (
    CheckOptions,
    FlowCheckError,
    check_flow,
    from_nflows,
    from_normflows,
    from_zuko,
)

FAST = CheckOptions(max_examples=5)  # float64, the default
ADAPTERS = {"zuko": from_zuko, "nflows": from_nflows, "normflows": from_normflows}


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)


# -- zuko ------------------------------------------------------------------------------------


def zuko_autoregressive():
    import zuko

    return zuko.flows.MaskedAutoregressiveTransform(4, hidden_features=(8,))


@pytest.mark.parametrize("context", [None, 2], ids=["unconditional", "context"])
def test_a_zuko_maf_passes(context):
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.MAF(3, context=context or 0, transforms=2, hidden_features=(16,))
    assert from_zuko(flow).wrapped is flow.transform  # a flow's transform is what is checked
    report = check_flow(from_zuko(flow), event_shape=(3,), context_shape=context, options=FAST)
    assert report.flow == "ZukoAdapter" and report.examples == 5


def test_a_zuko_elementwise_transform_has_its_log_dets_summed_per_example():
    """An elementwise transform's ``call_and_ladj`` gives one log-det per element."""
    zuko = pytest.importorskip("zuko")
    transform = zuko.flows.UnconditionalTransform(
        zuko.transforms.MonotonicAffineTransform, torch.zeros(4), torch.zeros(4)
    )
    assert transform().call_and_ladj(torch.zeros(3, 4))[1].shape == (3, 4)
    check_flow(from_zuko(transform), event_shape=(4,), options=FAST)


def test_zukos_forward_is_the_likelihood_direction():
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.MAF(3, transforms=2, hidden_features=(8,)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    z, logdet = from_zuko(flow)(x)
    expected = flow().log_prob(x)
    torch.testing.assert_close(standard_normal_log_prob(z) + logdet, expected)


# -- nflows ----------------------------------------------------------------------------------


def nflows_coupling():
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import AffineCouplingTransform

    def net(features_in: int, features_out: int) -> nn.Module:
        return ResidualNet(features_in, features_out, hidden_features=8, num_blocks=1)

    return AffineCouplingTransform(torch.tensor([1, 0, 1, 0]), net)


def nflows_maf():
    from nflows.transforms import MaskedAffineAutoregressiveTransform

    return MaskedAffineAutoregressiveTransform(4, 16)


@pytest.mark.parametrize("transform", [nflows_maf, nflows_coupling])
def test_an_nflows_transform_passes(transform):
    pytest.importorskip("nflows")
    report = check_flow(lambda: from_nflows(transform()), event_shape=(4,), options=FAST)
    assert report.flow == "NflowsAdapter"


def test_nflows_forward_is_the_likelihood_direction():
    pytest.importorskip("nflows")
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow

    transform = nflows_maf().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    z, logdet = from_nflows(transform)(x)
    expected = Flow(transform, StandardNormal([4])).log_prob(x)
    torch.testing.assert_close(standard_normal_log_prob(z) + logdet, expected)


# -- normflows -------------------------------------------------------------------------------


def normflows_masked_affine(cls=None):
    import normflows

    cls = cls or normflows.flows.MaskedAffineFlow
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    nets = [normflows.nets.MLP([4, 16, 4], init_zeros=True) for _ in range(2)]
    return cls(mask, *nets)


def normflows_coupling_block():
    import normflows

    return normflows.flows.AffineCouplingBlock(normflows.nets.MLP([2, 16, 4], init_zeros=True))


def normflows_constant():
    """An affine map with learned constants: its log-det is a scalar, not ``[B]``."""
    import normflows

    return normflows.flows.AffineConstFlow((4,))


@pytest.mark.parametrize(
    "flow", [normflows_masked_affine, normflows_coupling_block, normflows_constant]
)
def test_a_normflows_flow_passes(flow):
    pytest.importorskip("normflows")
    report = check_flow(lambda: from_normflows(flow()), event_shape=(4,), options=FAST)
    assert report.flow == "NormflowsAdapter"


def test_a_conditional_normflows_flow_gets_the_context():
    normflows = pytest.importorskip("normflows")

    def flow():
        maf = normflows.flows.MaskedAffineAutoregressive(4, 16, context_features=2, num_blocks=1)
        return from_normflows(maf)

    check_flow(flow, event_shape=(4,), context_shape=(2,), options=FAST)


def test_normflows_inverse_is_the_likelihood_direction():
    """normflows' ``forward`` samples (latent to data): the adapter's ``forward`` is the
    flow's ``inverse``, the map ``NormalizingFlow.log_prob`` applies."""
    normflows = pytest.importorskip("normflows")
    flow = normflows_masked_affine().double()
    torch.nn.init.normal_(flow.s.net[-1].weight)  # not the identity
    base = normflows.distributions.DiagGaussian(4, trainable=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    z, logdet = from_normflows(flow)(x)
    torch.testing.assert_close(z, flow.inverse(x)[0])
    expected = normflows.NormalizingFlow(base, [flow]).log_prob(x)
    torch.testing.assert_close(standard_normal_log_prob(z) + logdet, expected)


def test_a_bug_behind_an_adapter_is_still_caught():
    """A sign bug in the wrapped flow's log-det (hidden by its zero-initialised nets until
    check_flow perturbs them) is reported as a bug of the adapter's forward log-det."""
    normflows = pytest.importorskip("normflows")

    class FlippedLogdet(normflows.flows.MaskedAffineFlow):
        def inverse(self, z):
            z, log_det = super().inverse(z)
            return z, -log_det

    with pytest.raises(FlowCheckError) as caught:
        check_flow(lambda: from_normflows(normflows_masked_affine(FlippedLogdet)), event_shape=(4,))
    assert caught.value.property == "forward_logdet"


# -- all adapters ----------------------------------------------------------------------------

EXAMPLE_FLOWS = {"zuko": zuko_autoregressive, "nflows": nflows_maf,
                 "normflows": normflows_masked_affine}  # fmt: skip


@pytest.mark.parametrize("package", ADAPTERS)
def test_the_wrapped_flow_is_a_submodule_so_its_parameters_are_checked(package):
    pytest.importorskip(package)
    flow = EXAMPLE_FLOWS[package]()
    adapted = ADAPTERS[package](flow)
    assert adapted.wrapped is flow
    assert list(adapted.parameters()) == list(flow.parameters()) != []


@pytest.mark.parametrize("package", ADAPTERS)
def test_an_object_of_the_wrong_type_is_refused(package):
    pytest.importorskip(package)
    adapter = ADAPTERS[package]
    with pytest.raises(TypeError, match=f"{adapter.__name__} expects .*, got Linear"):
        adapter(nn.Linear(4, 4))


@pytest.mark.parametrize("package", ADAPTERS)
def test_a_missing_library_is_named_in_one_line(package, monkeypatch):
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)  # also when it was never imported
    adapter = ADAPTERS[package]
    with pytest.raises(ImportError) as caught:
        adapter(nn.Linear(4, 4))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{adapter.__name__} needs {package}: pip install {package}")
