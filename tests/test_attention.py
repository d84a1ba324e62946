"""Attention backends: the same function on every backend, and clear refusals."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from jetblocks import Jet, JetConfig, vit
from jetblocks.vit import ATTENTION_BACKENDS, Attention, math_attention

CPU_BACKENDS = ("sdpa", "math", "auto")
HAS_XFORMERS = vit.xformers_available()


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn_like(parameter))
    return module


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_backends_agree_on_self_and_cross_attention(dtype, tol):
    x, source = torch.randn(2, 9, 16, dtype=dtype), torch.randn(2, 5, 6, dtype=dtype)
    outputs = {}
    for backend in CPU_BACKENDS:
        torch.manual_seed(0)
        self_attention = _randomised(Attention(16, 4, backend=backend)).to(dtype)
        cross_attention = _randomised(Attention(16, 4, source_dim=6, backend=backend)).to(dtype)
        outputs[backend] = (self_attention(x), cross_attention(x, source))
    for backend in CPU_BACKENDS:
        for got, expected in zip(outputs[backend], outputs["sdpa"], strict=True):
            torch.testing.assert_close(got, expected, atol=tol, rtol=0)


def test_math_attention_is_the_softmax_of_scaled_dot_products():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(math_attention(q, k, v), weights @ v)
    bf16 = math_attention(*(t.bfloat16() for t in (q, k, v)))
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), weights @ v, atol=5e-2, rtol=5e-2)


def test_jet_outputs_agree_across_backends():
    config = JetConfig(
        image_size=(8, 8), patch_size=2, depth=3, block_depth=1, emb_dim=16, num_heads=2,
        kinds=("channels", "spatial"), context_dim=3,
    )  # fmt: skip
    x, context = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 3)
    results = {}
    for backend in CPU_BACKENDS:
        torch.manual_seed(0)
        jet = _randomised(Jet(JetConfig(**{**config.to_dict(), "attention_backend": backend})))
        assert all(m.backend == backend for m in jet.modules() if isinstance(m, Attention))
        with torch.no_grad():
            z, logdet = jet(x, context)
            results[backend] = (z, logdet, jet.inverse(z, context)[0])
    for backend in CPU_BACKENDS:
        for got, expected in zip(results[backend], results["sdpa"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_config_validates_and_serialises_the_backend():
    assert JetConfig().attention_backend == "auto"
    config = JetConfig(attention_backend="math")
    assert JetConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"attention_backend must be one of .*got 'flash'"):
        JetConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="Attention: backend must be one of"):
        Attention(8, 2, backend="flash")
    assert set(ATTENTION_BACKENDS) == {"sdpa", "math", "xformers", "auto"}


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed")
def test_xformers_without_the_package_is_a_clear_error():
    with pytest.raises(ImportError, match=r"needs the xformers package.*jetblocks\[gpu\]"):
        Attention(8, 2, backend="xformers")
    with pytest.raises(ImportError, match="xformers"):
        Jet(JetConfig(attention_backend="xformers"))
    assert not Attention(8, 2, backend="auto")._xformers  # "auto" falls back to SDPA


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in ``xformers.ops`` that records calls and computes ``[B, N, H, d]`` attention."""
    calls = []

    def memory_efficient_attention(q, k, v):
        calls.append(q.shape)
        return math_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(vit, "xformers_available", lambda: True)
    return calls


def test_xformers_on_cpu_tensors_is_a_clear_error_and_auto_falls_back(fake_xformers):
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="CUDA tensors only, got cpu.*'auto'"):
        Attention(8, 2, backend="xformers")(x)
    auto = Attention(8, 2, backend="auto")
    assert auto._xformers
    sdpa = Attention(8, 2)
    sdpa.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto(x), sdpa(x))
    assert fake_xformers == []  # the CPU call never reached xformers


def test_xformers_adapter_passes_batch_tokens_heads_dims(fake_xformers):
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    torch.testing.assert_close(vit.xformers_attention(q, k, v), math_attention(q, k, v))
    assert fake_xformers == [(2, 5, 3, 4)]


@pytest.mark.skipif(
    not (HAS_XFORMERS and torch.cuda.is_available()), reason="needs xformers and a CUDA GPU"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_sdpa_on_the_gpu(dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x, source = torch.randn(2, 64, 32, device="cuda"), torch.randn(2, 8, 6, device="cuda")
    for source_dim, args in ((None, (x,)), (6, (x, source))):
        torch.manual_seed(0)
        fast = _randomised(Attention(32, 4, source_dim, backend="xformers")).cuda()
        slow = Attention(32, 4, source_dim).cuda()
        slow.load_state_dict(fast.state_dict())
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            torch.testing.assert_close(fast(*args), slow(*args), atol=tol, rtol=tol)


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the torch functions called inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("source_dim", [None, 6])
def test_projections_are_stored_fused_and_never_concatenated_per_call(source_dim):
    attention = Attention(16, 4, source_dim=source_dim)
    fused = attention.kv if source_dim else attention.qkv
    assert fused.weight.shape == (2 * 16 if source_dim else 3 * 16, source_dim or 16)
    args = (torch.randn(2, 9, 16),) + ((torch.randn(2, 5, 6),) if source_dim else ())
    with _Calls() as calls:
        attention(*args)
    assert "cat" not in calls.names
    assert calls.names.count("linear") == (3 if source_dim else 2)  # (q), qkv or kv, out


def _compiled_targets(layer: torch.nn.Module, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The ops Dynamo traces for ``layer(x)``, and the compiled output."""
    targets: list[str] = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module

    torch._dynamo.reset()
    return targets, torch.compile(layer, backend=record)(x)


def _uses_sdpa(targets: list[str]) -> bool:
    return any("scaled_dot_product" in target for target in targets)


def test_accelerated_auto_attention_takes_the_math_path_in_compiled_training_on_the_cpu():
    """Inductor fuses math attention's softmax into its kernels, and SDPA's CPU backward is slow
    on small heads: accelerated, in a compiled step with autograd "auto" traces math for
    float32; without autograd (compiled inference) and in eager mode it stays on SDPA."""
    from jetblocks import accelerate

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    auto = accelerate(_randomised(Attention(8, 2, backend="auto")))
    sdpa = Attention(8, 2, backend="sdpa")
    sdpa.load_state_dict(auto.state_dict())
    auto_targets, compiled = _compiled_targets(auto, x)
    assert _uses_sdpa(_compiled_targets(sdpa, x)[0])
    assert not _uses_sdpa(auto_targets) and any("softmax" in t for t in auto_targets)
    torch.testing.assert_close(compiled, sdpa(x), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert _uses_sdpa(_compiled_targets(auto, x)[0])
