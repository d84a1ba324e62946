"""``jetblocks.linear``: the oneDNN float32 CPU path computes ``F.linear`` and its gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jetblocks.linear import ONEDNN_MIN_FLOPS, OneDNNLinear, linear

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


def operands(rows: int = 96, d_in: int = 300, d_out: int = 400, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, d_in, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(d_out, generator=generator, dtype=dtype, requires_grad=True)
    return x, weight, bias


def values_and_grads(fn, x, weight, bias):
    y = fn(x, weight, bias)
    upstream = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    return (y, *torch.autograd.grad(y, (x, weight, bias), upstream))


def on_onednn(y: torch.Tensor) -> bool:
    return "onednn_linear" in type(y.grad_fn).__name__


@needs_onednn
@pytest.mark.parametrize("shape", [(96, 300, 400), (400, 400, 60), (700, 30, 500)])
def test_values_and_gradients_match_f_linear(shape):
    x, weight, bias = operands(*shape)
    assert 2 * x.numel() * weight.shape[0] >= ONEDNN_MIN_FLOPS
    assert on_onednn(linear(x, weight, bias))
    ours = values_and_grads(linear, x, weight, bias)
    theirs = values_and_grads(F.linear, x, weight, bias)
    for name, a, b in zip(("y", "dx", "dW", "db"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)


@needs_onednn
def test_without_bias_and_on_non_contiguous_input():
    x, weight, _ = operands()
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not x_t.is_contiguous()
    torch.testing.assert_close(linear(x_t, weight), F.linear(x_t, weight), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_second_derivatives_match():
    x, weight, bias = operands(rows=64, d_in=200, d_out=300)

    def grad_of_grad(fn):
        dx, dw = torch.autograd.grad(
            fn(x, weight, bias).tanh().sum(), (x, weight), create_graph=True
        )
        return torch.autograd.grad(dx.square().sum() + dw.square().sum(), (x, weight, bias))

    for a, b in zip(grad_of_grad(linear), grad_of_grad(F.linear), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_only_large_float32_cpu_products_outside_autocast_take_the_onednn_path():
    x, weight, bias = operands()
    assert on_onednn(linear(x, weight, bias))
    small = operands(rows=4, d_in=8, d_out=8)
    assert not on_onednn(linear(*small))
    assert not on_onednn(linear(*operands(dtype=torch.float64)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, weight, bias)
    assert y.dtype == torch.bfloat16 and not on_onednn(y)


def test_linear_module_is_an_nn_linear_with_the_same_state_and_output():
    torch.manual_seed(0)
    ours = OneDNNLinear(300, 400)
    torch.manual_seed(0)
    theirs = nn.Linear(300, 400)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key])
    x = torch.randn(2, 96, 300)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_flop_counter_counts_it_as_f_linear():
    x, weight, bias = operands()
    counts = []
    for fn in (linear, F.linear):
        with FlopCounterMode(display=False) as counter:
            fn(x, weight, bias).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * x.numel() * weight.shape[0]


@needs_onednn
def test_compiles_without_graph_breaks():
    layer = OneDNNLinear(300, 400)
    x = torch.randn(2, 96, 300, requires_grad=True)
    compiled = torch.compile(lambda x: layer(x).tanh().sum(), backend="aot_eager", fullgraph=True)
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    expected = F.linear(x, layer.weight, layer.bias).tanh().sum()
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-4)
