"""torch.compile: Jet's forward, inverse and training step trace to single graphs.

``fullgraph=True`` makes any graph break an error, and a counting backend asserts that
exactly one graph is captured; cheap backends keep this fast on a CPU. The optimizer's
``step`` is compiled separately, as PyTorch recommends (its wrapper breaks the graph around
the update on purpose, so that the update runs outside autograd). Inductor, the real
compiler, is exercised by the ``slow`` test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from jetblocks import Jet, JetConfig

CONFIG = JetConfig(
    image_size=(8, 8),
    patch_size=2,
    depth=3,
    block_depth=1,
    emb_dim=16,
    num_heads=2,
    kinds=("channels", "spatial"),
    context_dim=3,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def perturbed_jet(**overrides) -> Jet:
    torch.manual_seed(0)
    jet = Jet(JetConfig(**{**CONFIG.to_dict(), **overrides}))
    with torch.no_grad():
        for parameter in jet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return jet


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    return x, torch.randn(2, 4, 3, generator=generator)


@pytest.mark.parametrize("attention_backend", ["sdpa", "math"])
def test_forward_and_inverse_compile_to_one_graph_each(attention_backend):
    jet, (x, context) = perturbed_jet(attention_backend=attention_backend), inputs()
    forward, inverse = CompileCounter(), CompileCounter()
    compiled_forward = torch.compile(jet, backend=forward, fullgraph=True)
    compiled_inverse = torch.compile(jet.inverse, backend=inverse, fullgraph=True)
    with torch.no_grad():
        z, logdet = compiled_forward(x, context)
        back, inverse_logdet = compiled_inverse(z, context)
        compiled_forward(x, context)  # a second call reuses the graph
        z_eager, logdet_eager = jet(x, context)
    assert (forward.frame_count, inverse.frame_count) == (1, 1)
    assert forward.op_count > 0 and inverse.op_count > 0
    torch.testing.assert_close(z, z_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, logdet_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-5, rtol=0)


def _train(jet: Jet, steps: int, compile_backend: str | None) -> tuple[list[float], int]:
    """``steps`` SGD steps on bits/dim; compiled loss (with its backward) and update.

    SGD rather than Adam: attention key biases get a zero gradient in exact arithmetic
    (softmax ignores a shift shared by all keys), and Adam would blow its rounding noise up
    to full-size steps, so compiled and eager runs would differ for no fault of either.
    """
    x, context = inputs()
    optimizer = torch.optim.SGD(jet.parameters(), lr=0.1, momentum=0.9)

    def loss_fn(images, context):
        return jet.bits_per_dim(images, context).mean()

    counter = None
    step = optimizer.step
    if compile_backend is not None:
        counter = CompileCounterWithBackend(compile_backend)
        loss_fn = torch.compile(loss_fn, backend=counter, fullgraph=True)
        step = torch.compile(optimizer.step, backend=compile_backend)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(x, context)
        loss.backward()
        step()
        losses.append(loss.item())
    return losses, counter.frame_count if counter else 0


def test_training_step_compiles_without_graph_breaks_and_matches_eager():
    jet = perturbed_jet()
    eager = copy.deepcopy(jet)
    losses, frames = _train(jet, steps=2, compile_backend="aot_eager")
    eager_losses, _ = _train(eager, steps=2, compile_backend=None)
    assert frames == 1  # forward + loss in one graph; AOTAutograd compiles its backward
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    assert losses[1] < losses[0]
    for (name, got), expected in zip(jet.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_inductor_matches_eager():
    jet, (x, context) = perturbed_jet(), inputs()
    eager = copy.deepcopy(jet)
    with torch.no_grad():
        z, logdet = torch.compile(jet, fullgraph=True)(x, context)
        back, _ = torch.compile(jet.inverse, fullgraph=True)(z, context)
        z_eager, logdet_eager = eager(x, context)
    torch.testing.assert_close(z, z_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, logdet_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    losses, _ = _train(jet, steps=2, compile_backend="inductor")
    eager_losses, _ = _train(eager, steps=2, compile_backend=None)
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for got, expected in zip(jet.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _frozen_round_trip(backend: str) -> None:
    jet, (x, context) = perturbed_jet(), inputs()
    pixels = ((x + 1) * 127.5).floor().clamp(0, 255).to(torch.uint8)
    frozen = jet.compiled(backend=backend)
    z, logdet = frozen.encode(pixels, context)
    z_eager, logdet_eager = jet.encode(pixels, context)
    torch.testing.assert_close(z, z_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, logdet_eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(frozen.decode(z, context), jet.decode(z, context), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expects images \(\[B, C, H, W\]\) of shape"):
        frozen.encode(pixels[:, :2], context)  # checked as encode checks
    with torch.no_grad():
        next(jet.parameters()).add_(0.01)  # the snapshot is stale now
    with pytest.raises(RuntimeError, match="weights changed after freezing"):
        frozen.encode(pixels, context)


def test_frozen_inference_matches_eager_and_refuses_stale_weights():
    _frozen_round_trip("aot_eager")  # the wiring, fast; Inductor's freezing: the slow test


@pytest.mark.slow
def test_frozen_inference_with_inductor_freezing_matches_eager():
    _frozen_round_trip("inductor")
