"""The multi-scale blocks and the flow composed from them (their flow contract is checked in
``tests/test_all_blocks.py``): configs, the latent API, checkpoints, trainer and CLI."""

import json

import pytest
import torch

from jetblocks import to_uint8
from jetblocks.checkpoint import CheckpointError
from jetblocks.cli import main
from jetblocks.multiscale import Logit, MultiScaleConfig, MultiScaleFlow, Repatchify
from jetblocks.testing import perturb_parameters_
from jetblocks.train import checkpoints_in

DIGITS = dict(image_size=(8, 8), channels=1, patch_size=2, scales=2, couplings_per_scale=2,
              width=8, blocks=1)  # fmt: skip


def test_the_mnist_preset_has_three_scales_of_halving_dims():
    config = MultiScaleConfig.preset("mnist-multiscale")
    assert [config.grid_at(s) for s in range(3)] == [(14, 14), (7, 7), (7, 7)]
    flow = MultiScaleFlow(config)
    z, logdet = flow(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert z.shape == (2, 196, 4) and logdet.shape == (2,)
    assert flow.latent_shape == (196, 4) and config.num_dims == 784


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=(9, 9)), "divisible by patch_size 2"),
        (dict(channels=1, patch_size=1, scales=2), "odd dim 1"),
        (dict(width=0), r"width must be an int in \[1, 65536\]"),
        (dict(scale_factor=float("inf")), "scale_factor must be a finite number > 0"),
        (dict(model="jet"), "model must be one of 'multiscale'"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        MultiScaleConfig(**{**DIGITS, **overrides})


def test_logit_maps_the_pixel_range_onto_the_real_line_and_back():
    logit = Logit(alpha=1e-3)
    x = torch.tensor([[-1.0, 0.0, 1.0 + 1 / 127.5]], dtype=torch.float64)
    y, logdet = logit(x)
    torch.testing.assert_close(y[0, [0, 2]], torch.tensor([-1, 1], dtype=torch.float64) * 6.9068,
                               atol=1e-4, rtol=0)  # fmt: skip
    back, inverse_logdet = logit.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
    assert torch.isfinite(logit.inverse(torch.tensor([[1e4, -1e4]]))[1]).all()


def test_repatchify_moves_2x2_blocks_of_tokens_into_one():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, raster order
    y, _ = Repatchify((4, 4), 1)(tokens)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match=r"grid \(3, 4\) is not divisible by 2"):
        Repatchify((3, 4), 1)


def test_tokenization_is_lossless_and_checkpoints_round_trip(tmp_path):
    flow = perturb_parameters_(MultiScaleFlow(MultiScaleConfig(**DIGITS)), scale=0.05).eval()
    pixels = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        tokens, _ = flow.encode(pixels)
        assert torch.equal(to_uint8(flow.decode(tokens)), pixels)
    flow.save_pretrained(tmp_path / "m")
    loaded = MultiScaleFlow.from_pretrained(tmp_path / "m")
    assert loaded.config == flow.config
    bits = [
        m.bits_per_dim(pixels, generator=torch.Generator().manual_seed(0)) for m in (loaded, flow)
    ]
    assert torch.equal(*bits)
    assert flow.sample(3, 0.7, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)
    with pytest.raises(CheckpointError, match="holds a Jet .*not a MultiScaleFlow"):
        MultiScaleFlow.from_pretrained(_jet_directory(tmp_path))


def _jet_directory(tmp_path):
    from jetblocks import Jet, JetConfig

    Jet(JetConfig.preset("tiny", depth=2)).save_pretrained(tmp_path / "jet")
    return tmp_path / "jet"


def test_the_cli_trains_resumes_evaluates_and_samples_a_multiscale_flow(tmp_path, capsys):
    (tmp_path / "ms.json").write_text(MultiScaleConfig(**DIGITS).to_json())
    args = ["train", "--config", str(tmp_path / "ms.json"), "--data", "digits", "--batch-size",
            "16", "--lr", "3e-3", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--steps", "3"]) == 0
    assert "training MultiScaleFlow" in capsys.readouterr().out
    assert main([*args, "--steps", "5", "--resume"]) == 0
    assert [p.name for p in checkpoints_in(tmp_path / "run")] == ["step_00000003", "step_00000005"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", "digits"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["bits_per_dim"] < 30
    out = tmp_path / "s.png"
    assert (
        main(["sample", "--checkpoint", str(tmp_path / "run"), "--n", "4", "--out", str(out)]) == 0
    )
    assert isinstance(MultiScaleFlow.from_pretrained(tmp_path / "run"), MultiScaleFlow)


# -- memory-saving backprop through the nested scales ----------------------------------------------
SCALES3 = dict(image_size=(8, 8), channels=1, patch_size=2, scales=3, width=8, blocks=1)


def _gradients(flow, x):
    flow.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    z, logdet = flow(x)
    (z.square().sum() - logdet.sum()).backward()
    return [x.grad, *(p.grad for p in flow.parameters())]


@pytest.mark.parametrize("mode", ["checkpoint", "invertible"])
def test_the_backprop_setting_reaches_every_nested_scale_with_the_gradients_of_standard(mode):
    torch.manual_seed(0)
    flow = perturb_parameters_(MultiScaleFlow(MultiScaleConfig(**SCALES3)), scale=0.1).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 1.9 - 0.95
    standard = _gradients(flow, x)
    flow.flow.backprop = mode
    assert len(flow.flow.leaves()) == 1 + 3 * 4  # the logit, then each coupling of each scale
    for got, want in zip(_gradients(flow, x), standard, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _saved_and_peak_bytes(flow, x):
    """Bytes autograd saves in the forward pass, and the step's allocator peak above the
    memory held before it less the parameters' gradients."""
    from torch.profiler import ProfilerActivity, profile

    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            z, logdet = flow(x)
        (z.square().sum() - logdet.sum()).backward()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    gradients = sum(p.numel() * p.element_size() for p in flow.parameters())
    flow.zero_grad(set_to_none=True)
    return saved, peak - gradients


def test_invertible_backprop_memory_is_flat_in_the_couplings_per_scale():
    x = torch.rand(32, 1, 28, 28) * 1.9 - 0.95
    measured = {}
    for mode in ("standard", "invertible"):
        for couplings in (2, 6):
            torch.manual_seed(0)
            config = MultiScaleConfig.preset(
                "mnist-multiscale", couplings_per_scale=couplings, backprop=mode, width=16
            )
            measured[mode, couplings] = _saved_and_peak_bytes(MultiScaleFlow(config), x)
    (saved_2, peak_2), (saved_6, peak_6) = measured["invertible", 2], measured["invertible", 6]
    assert saved_2 == saved_6 == x.numel() * 4  # the tokens, whatever the depth
    assert peak_6 < 1.1 * peak_2  # flat: one coupling's activations at a time
    assert peak_6 < measured["standard", 6][1] / 4  # and far below ordinary backprop
    assert measured["standard", 6][1] > 2.5 * measured["standard", 2][1]


def test_backprop_is_checked_when_set_on_a_built_flow():
    flow = MultiScaleFlow(MultiScaleConfig(**DIGITS))
    with pytest.raises(ValueError, match="backprop must be one of"):
        flow.flow.backprop = "reversible"
