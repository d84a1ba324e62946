"""``jetblocks.acceleration``: the faster kernels compute the same model, swapped in and out
without touching its weights, and applied by default where the library builds a model."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from jetblocks import Jet, accelerate, decelerate
from jetblocks.acceleration import SigmoidGELU, TunedAttention, accelerate_by_default
from jetblocks.linear import OneDNNLinear
from jetblocks.testing import perturb_parameters_
from jetblocks.vit import Attention


def layer_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def perturbed_jet(digits_config, **overrides):
    torch.manual_seed(0)
    return perturb_parameters_(Jet(digits_config.replace(**overrides)), scale=0.1)


def test_model_code_is_plain_pytorch(digits_config):
    types = layer_types(Jet(digits_config))
    assert {nn.Linear, nn.GELU, Attention} <= types
    assert not types & {OneDNNLinear, SigmoidGELU, TunedAttention}


@pytest.mark.parametrize("inference", [False, True])
def test_accelerate_keeps_the_weights_and_computes_the_same_flow(digits_config, inference):
    plain = perturbed_jet(digits_config)
    fast = perturbed_jet(digits_config)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    assert accelerate(fast, inference=inference) is fast
    expected = {OneDNNLinear, TunedAttention} | ({SigmoidGELU} if inference else set())
    assert expected <= layer_types(fast) and nn.Linear not in layer_types(fast)
    assert (nn.GELU in layer_types(fast)) != inference
    state = fast.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        for ours, theirs in zip(fast(x), plain(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    z, logdet = fast(x)
    (z.square().sum() - logdet.sum()).backward()
    z, logdet = plain(x)
    (z.square().sum() - logdet.sum()).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert decelerate(fast) is fast and layer_types(fast) == layer_types(plain)


def test_only_the_exact_plain_classes_are_swapped():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4), nn.GELU(), nn.Linear(4, 4))
    accelerate(model, inference=True)
    assert [type(m) for m in model] == [MyLinear, nn.GELU, OneDNNLinear]


def test_tuned_attention_adds_the_cpu_rules_to_auto(monkeypatch):
    plain, tuned = Attention(8, 2, backend="auto"), Attention(8, 2, backend="auto")
    accelerate(tuned)
    assert type(tuned) is TunedAttention
    q32, q16 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).bfloat16()
    assert plain.auto_backend(q16) == "sdpa" and tuned.auto_backend(q16) == "math"
    assert tuned.auto_backend(q32) == "sdpa"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuned.auto_backend(q32) == "math" and plain.auto_backend(q32) == "sdpa"
    with torch.no_grad():  # compiled inference stays on SDPA
        assert tuned.auto_backend(q32) == "sdpa"


def test_the_defaults_apply_on_the_cpu_unless_switched_off(digits_config, monkeypatch):
    jet = accelerate_by_default(Jet(digits_config), "cpu")
    assert OneDNNLinear in layer_types(jet) and SigmoidGELU not in layer_types(jet)
    monkeypatch.setenv("JETBLOCKS_ACCELERATE", "0")
    assert OneDNNLinear not in layer_types(accelerate_by_default(Jet(digits_config), "cpu"))
    monkeypatch.setenv("JETBLOCKS_ACCELERATE", "yes")
    with pytest.raises(ValueError, match="JETBLOCKS_ACCELERATE must be 0 or 1, got 'yes'"):
        accelerate_by_default(Jet(digits_config), "cpu")
    monkeypatch.setenv("JETBLOCKS_ACCELERATE", "1")
    assert OneDNNLinear not in layer_types(accelerate_by_default(Jet(digits_config), "meta"))


def test_the_trainer_accelerates_and_saves_plain_weights(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, steps=3)
    assert OneDNNLinear in layer_types(trainer.model)
    trainer.fit()
    loaded = Jet.from_pretrained(tmp_path)
    assert OneDNNLinear not in layer_types(loaded)  # a saved model is plain PyTorch
    assert loaded.state_dict().keys() == trainer.model.state_dict().keys()


def test_old_names_point_to_the_new_design():
    import jetblocks

    with pytest.warns(DeprecationWarning, match="OneDNNLinear"):
        assert jetblocks.Linear is OneDNNLinear
    with pytest.raises(AttributeError, match="JETBLOCKS_ACCELERATE=0"):
        jetblocks.cpu_linear_backend  # noqa: B018
    env = {**os.environ, "JETBLOCKS_ACCELERATE": "2"}
    done = subprocess.run([sys.executable, "-c", "import jetblocks"], env=env, check=False)
    assert done.returncode == 0  # read when a model is built, not at import


def test_sigmoid_gelu_is_the_tanh_approximation_with_and_without_autograd():
    gelu = SigmoidGELU(approximate="tanh")
    x = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 4,
                   torch.tensor([0.0, 30.0, -30.0, 1e4, -1e4, 1e20, -1e20])])  # fmt: skip
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    with torch.no_grad():  # the sigmoid form
        fast = gelu(x)
    torch.testing.assert_close(fast.double(), exact, rtol=2e-6, atol=1e-6)
    plain = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.equal(gelu(x), plain)  # grad mode on: PyTorch's kernel, needed or not
    with torch.no_grad():
        for other in (x.double(), x.bfloat16()):  # only float32 takes the sigmoid form
            expected = torch.nn.functional.gelu(other, approximate="tanh")
            assert torch.equal(gelu(other), expected)
    leaf = x.clone().requires_grad_()
    trained = gelu(leaf)  # PyTorch's kernel, whose backward is the reference's
    assert torch.equal(trained, torch.nn.functional.gelu(x, approximate="tanh"))
    (grad,) = torch.autograd.grad(trained.sum(), leaf)
    reference = torch.nn.functional.gelu(leaf, approximate="tanh")
    (expected,) = torch.autograd.grad(reference.sum(), leaf)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)
