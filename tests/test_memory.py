"""Memory-saving (invertible) backprop: the gradients of ordinary backprop, less memory.

Every comparison perturbs the weights first: Jet's couplings start as the identity, where
a wrong reconstruction or a missing term would go unnoticed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jetblocks import (
    AffineCoupling,
    ChannelSplit,
    FlowSequence,
    Inverse,
    Jet,
    JetConfig,
    SpatialSplit,
    ViTConditioner,
    memory,
)
from jetblocks.checkpoint import read_tensors
from jetblocks.integrations.big_vision import unfuse_projections
from jetblocks.testing import check_flow, perturb_parameters_
from jetblocks.train import checkpoints_in

CONFIG = JetConfig(
    image_size=(8, 8),
    channels=3,
    patch_size=2,
    depth=5,
    block_depth=1,
    emb_dim=16,
    num_heads=2,
    kinds=("channels", "channels", "spatial"),
    spatial_patterns=("checkerboard", "vstripes-inv", "hstripes"),
)


pytestmark = pytest.mark.usefixtures("one_thread")


GRID, DIM = (2, 4), 4  # tokens [B, 8, 4] for the stacks of single couplings
TOKENS = (GRID[0] * GRID[1], DIM)


def coupling(split, context_dim: int | None = None) -> AffineCoupling:
    """An affine coupling on ``TOKENS`` with a one-block ViT conditioner."""
    vit = ViTConditioner(d_in=DIM // 2, d_out=DIM, num_tokens=TOKENS[0], emb_dim=8, depth=1,
                         num_heads=2, context_dim=context_dim)  # fmt: skip
    return AffineCoupling(split, vit)


def jet_pair(config: JetConfig = CONFIG, dtype=torch.float64, scale=0.1):
    """The same perturbed Jet with ordinary and with invertible backprop."""
    torch.manual_seed(0)
    standard = perturb_parameters_(Jet(config), scale=scale).to(dtype)
    invertible = Jet(JetConfig(**{**config.to_dict(), "backprop": "invertible"})).to(dtype)
    invertible.load_state_dict(standard.state_dict())
    return standard, invertible


def gradients(jet: Jet, inp, context=None, inverse=False, autocast=False) -> dict:
    """Gradients of ``sum(w * output) + sum(logdet)`` for the input, context and parameters
    (the forward pass under bf16 autocast with ``autocast``, the backward pass outside)."""
    jet.zero_grad(set_to_none=True)
    inp = inp.detach().clone().requires_grad_(True)
    if context is not None:
        context = context.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out, logdet = (jet.inverse if inverse else jet)(inp, context)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    ((weights * out).sum() + 0.5 * logdet.sum()).backward()
    params = unfuse_projections({n: p.grad for n, p in jet.named_parameters()})
    grads = {"input": inp.grad, **params}  # key biases by name (see assert_same_gradients)
    return grads | ({"context": context.grad} if context is not None else {})


def assert_same_gradients(expected: dict, received: dict, rtol: float) -> None:
    """Each gradient within ``rtol`` (relative, in norm) of the expected one.

    An attention key bias has an exactly zero gradient in exact arithmetic (softmax ignores a
    shift shared by all keys), so its rounding noise is held to ``rtol`` times the norm of
    all the gradients instead of its own.
    """
    assert expected.keys() == received.keys()
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, want in expected.items():
        got = received[name]
        assert got is not None and got.dtype == want.dtype, name
        scale = total if name.endswith("key.bias") else want.norm()
        error = (got - want).norm() / scale
        assert error < rtol, f"{name}: relative difference {error:.3g} >= {rtol:g}"


def images(batch=3, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 8, 8, generator=generator, dtype=dtype) * 2 - 1).to(dtype)


@pytest.mark.parametrize("with_context", [False, True])
def test_float64_gradients_equal_ordinary_backprop_in_both_directions(with_context):
    config = JetConfig(**{**CONFIG.to_dict(), "context_dim": 3 if with_context else None})
    standard, invertible = jet_pair(config)
    x = images()
    context = torch.randn(3, 4, 3, dtype=torch.float64) if with_context else None
    assert_same_gradients(gradients(standard, x, context), gradients(invertible, x, context), 1e-10)
    with torch.no_grad():
        z = standard(x, context)[0]
    assert_same_gradients(
        gradients(standard, z, context, inverse=True),
        gradients(invertible, z, context, inverse=True),
        1e-10,
    )


def test_float32_gradients_at_depth_32_equal_ordinary_backprop():
    config = JetConfig(**{**CONFIG.to_dict(), "depth": 32})
    standard, invertible = jet_pair(config, dtype=torch.float32, scale=0.1)
    x = images(dtype=torch.float32)
    with torch.no_grad():  # the perturbed stack is far from the identity
        assert (standard(x)[0] - x.flatten(1).reshape(3, 16, 12)).abs().max() > 0.5
    assert_same_gradients(gradients(standard, x), gradients(invertible, x), 1e-4)


def test_invertible_sequence_follows_the_flow_contract():
    """The property kit's float64 checks, gradients against finite differences included, on
    a stack that takes both the affine fast path and the generic path (``Inverse``)."""

    def stack():
        flows = [
            coupling(ChannelSplit(DIM, seed=1), context_dim=3),
            Inverse(coupling(ChannelSplit(DIM, seed=2), context_dim=3)),
            ChannelSplit(DIM, seed=3),
            coupling(SpatialSplit(GRID, DIM, "checkerboard-inv"), context_dim=3),
        ]
        return FlowSequence(flows, backprop="invertible")

    report = check_flow(stack, event_shape=TOKENS, context_shape=(2, 3), max_examples=4)
    assert "gradients" in report.properties


def test_generic_and_shared_parameters_match_ordinary_backprop():
    """A coupling used twice (tied weights) and a non-coupling flow: the generic path."""
    torch.manual_seed(0)
    tied = perturb_parameters_(coupling(ChannelSplit(DIM, seed=3)), scale=0.2).double()
    other = perturb_parameters_(coupling(SpatialSplit(GRID, DIM, "vstripes")), scale=0.2)
    flows = [tied, Inverse(other.double()), tied]
    results, start = [], torch.randn(2, *TOKENS, dtype=torch.float64)
    for backprop in ("standard", "invertible"):
        stack = FlowSequence(flows, backprop=backprop)
        stack.zero_grad(set_to_none=True)
        x = start.clone().requires_grad_(True)
        y, logdet = stack(x)
        (y.sin().sum() + logdet.sum()).backward()
        results.append([x.grad, *(p.grad for p in stack.parameters())])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def saved_bytes(jet: Jet, x: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward pass of ``jet(x)``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        jet(x)
    return total


def test_only_the_output_is_kept_whatever_the_depth():
    x = images(batch=2, dtype=torch.float32)
    kept = {}
    for backprop in ("standard", "invertible"):
        for depth in (2, 6):
            torch.manual_seed(0)
            jet = Jet(JetConfig(**{**CONFIG.to_dict(), "depth": depth, "backprop": backprop}))
            kept[backprop, depth] = saved_bytes(jet, x)
    assert kept["invertible", 2] == kept["invertible", 6] == x.numel() * 4  # the tokens
    assert kept["standard", 6] > 2.5 * kept["standard", 2] > 100 * kept["invertible", 2]


def test_no_grad_and_sampling_skip_the_custom_path(monkeypatch):
    standard, invertible = jet_pair(dtype=torch.float32)

    def refuse(*args):
        raise AssertionError("the invertible autograd Function ran without a gradient to take")

    x = images(dtype=torch.float32)
    z = invertible(x)[0]
    assert type(z.grad_fn).__name__ == "_InvertibleStackBackward"
    monkeypatch.setattr(memory._InvertibleStack, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(invertible(x), standard(x), rtol=0, atol=0)
        torch.testing.assert_close(invertible.inverse(z), standard.inverse(z), rtol=0, atol=0)
    frozen = invertible.requires_grad_(False)
    assert frozen(x)[0].grad_fn is None  # nothing needs a gradient: the plain loop
    for jet in (standard, invertible):
        torch.manual_seed(5)
        jet.sample_out = jet.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(invertible.sample_out, standard.sample_out, rtol=0, atol=0)


def test_bf16_autocast_keeps_the_affine_update_scale_and_logdet_in_float32():
    jet, _ = jet_pair(dtype=torch.float32)
    x = images(dtype=torch.float32)
    conditioner_dtypes = []
    jet.couplings[0].conditioner.register_forward_hook(
        lambda module, args, out: conditioner_dtypes.append(out.dtype)
    )
    with torch.autocast("cpu", torch.bfloat16):
        z, logdet = jet(x)
        back, inverse_logdet = jet.inverse(z)
    assert conditioner_dtypes == [torch.bfloat16, torch.bfloat16]
    assert z.dtype == logdet.dtype == back.dtype == inverse_logdet.dtype == torch.float32
    # The conditioner sees the same half both ways, so a float32 affine update round-trips
    # to float32 rounding; in bf16 it would be off by ~1e-2.
    torch.testing.assert_close(back, x, atol=2e-5, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-4, rtol=0)
    with torch.no_grad():
        exact = jet(x)[0]
    assert 1e-4 < (z - exact).abs().max() < 0.1  # the conditioner did run in bf16


def test_bf16_invertible_backprop_recomputes_under_the_forward_autocast():
    standard, invertible = jet_pair(dtype=torch.float32)
    x = images(dtype=torch.float32)
    dtypes = []
    invertible.couplings[0].conditioner.register_forward_hook(
        lambda module, args, out: dtypes.append(out.dtype)
    )
    expected = gradients(standard, x, autocast=True)
    received = gradients(invertible, x, autocast=True)  # backward runs outside autocast
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the forward, then the recompute
    assert_same_gradients(expected, received, 1e-3)


def test_config_and_attribute_choose_one_mechanism():
    assert Jet(JetConfig(backprop="checkpoint")).couplings.backprop == "checkpoint"
    with pytest.raises(ValueError, match=r"backprop must be one of .*got 'reversible'"):
        JetConfig(backprop="reversible")
    assert JetConfig.from_json(JetConfig(backprop="invertible").to_json()).backprop == "invertible"
    with pytest.raises(ValueError, match=r"backprop must be one of .*got 'reversible'"):
        FlowSequence([], backprop="reversible")
    with pytest.raises(TypeError, match="checkpoint"):  # one knob: backprop="checkpoint"
        FlowSequence([], checkpoint=True)
    standard, invertible = Jet(CONFIG), Jet(JetConfig(backprop="invertible"))
    standard.couplings.backprop = "checkpoint"  # the attribute may change on a built model
    assert standard.couplings.backprop == "checkpoint"
    assert invertible.couplings.backprop == "invertible"
    x = images(batch=2, dtype=torch.float32)
    assert saved_bytes(standard, x) < saved_bytes(Jet(CONFIG), x)  # now it recomputes


# The training run of tests/test_cli.py: 4 steps on the built-in digits.
TRAIN = ["--data", "digits", "--steps", "4", "--batch-size", "16", "--lr", "3e-3",
         "--no-progress", "--eval-batch-size", "100"]  # fmt: skip


def test_two_process_ddp_with_invertible_backprop_equals_one_ordinary_process(
    tmp_path, digits_config
):
    """DDP (gloo, 2 processes) sees the invertible path's gradients as ordinary ``.grad``."""
    from jetblocks.cli import main

    for name, backprop in (("standard", "standard"), ("invertible", "invertible")):
        config = JetConfig(**{**digits_config.to_dict(), "backprop": backprop})
        (tmp_path / f"{name}.json").write_text(config.to_json())
    one = ["train", "--config", str(tmp_path / "standard.json"), *TRAIN]
    assert main([*one, "--out", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = ["--nproc_per_node", "2", "-m", "jetblocks.cli", "train"]
    two += ["--config", str(tmp_path / "invertible.json"), *TRAIN, "--out", str(tmp_path / "two")]
    result = subprocess.run([*torchrun, *two], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [  # key biases by name (the reference's projections), to skip them below
        unfuse_projections(read_tensors(checkpoints_in(tmp_path / run)[-1] / "model.safetensors"))
        for run in ("one", "two")
    ]
    assert final[0].keys() == final[1].keys()
    # Key biases have exactly zero gradients, which Adam turns into rounding-noise steps.
    for name in (n for n in final[0] if not n.endswith("key.bias")):
        assert (final[0][name] - final[1][name]).abs().max() < 1e-5, name
    initial = Jet(digits_config).state_dict()["couplings.flows.0.conditioner.final_proj.weight"]
    assert not torch.equal(final[1]["couplings.flows.0.conditioner.final_proj.weight"], initial)


def test_accelerated_auto_attention_takes_the_math_path_for_bf16_on_the_cpu(monkeypatch):
    """SDPA's CPU kernels are slow for bf16 (above all backward): accelerated, "auto" uses
    math there."""
    from jetblocks import accelerate, vit

    calls, math_attention = [], vit.math_attention
    monkeypatch.setattr(vit, "math_attention", lambda *qkv: calls.append(1) or math_attention(*qkv))
    layer = accelerate(vit.Attention(8, 2, backend="auto"))
    x = torch.randn(2, 5, 8)
    layer(x)
    assert calls == []  # float32: SDPA
    with torch.autocast("cpu", torch.bfloat16):
        fast = layer(x)
    assert calls == [1] and fast.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        sdpa = vit.Attention(8, 2, backend="sdpa")
        sdpa.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fast, sdpa(x), atol=2e-2, rtol=2e-2)


def test_compiled_model_runs_the_invertible_stack_eagerly_with_the_same_gradients():
    torch._dynamo.reset()
    config = JetConfig(**{**CONFIG.to_dict(), "depth": 2})
    standard, invertible = jet_pair(config, dtype=torch.float32)
    x = images(dtype=torch.float32)
    compiled = torch.compile(lambda images: invertible.bits_per_dim(images).mean(), backend="eager")
    compiled(x).backward()
    received = {n: p.grad for n, p in invertible.named_parameters()}
    standard.bits_per_dim(x).mean().backward()
    expected = {n: p.grad for n, p in standard.named_parameters()}
    assert_same_gradients(expected, received, 1e-5)
    torch._dynamo.reset()


def test_a_parameter_changed_between_forward_and_backward_is_an_error():
    _, invertible = jet_pair(dtype=torch.float32)
    z, logdet = invertible(images(dtype=torch.float32))
    with torch.no_grad():
        next(invertible.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the"):
        (z.sum() + logdet.sum()).backward()
