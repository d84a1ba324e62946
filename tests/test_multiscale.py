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
        (dict(width=0), "width must be a positive int"),
        (dict(scale_factor=float("inf")), "scale_factor must be positive and finite"),
        (dict(model="jet"), "model must be 'multiscale'"),
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
    with pytest.raises(CheckpointError, match="not a valid MultiScaleConfig"):
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
