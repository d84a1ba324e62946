import math

import pytest
import torch

from jetblocks import Jet, JetConfig, merge_tokens, split_tokens, to_uint8
from jetblocks.couplings import SPATIAL_PATTERNS
from jetblocks.testing import perturb_parameters_
from jetblocks.testing.properties import per_example_log_abs_det as jacobian_logdet

SMALL = dict(
    image_size=(4, 8),
    channels=2,
    patch_size=2,
    depth=8,
    block_depth=1,
    emb_dim=8,
    num_heads=2,
    kinds=("channels", "spatial"),
    spatial_patterns=SPATIAL_PATTERNS,
)


def count_trainable(config):
    with torch.device("meta"):
        return sum(p.numel() for p in Jet(config).parameters() if p.requires_grad)


def test_imagenet64_preset_has_the_reference_parameter_count():
    assert count_trainable(JetConfig.preset("imagenet64")) == 207_177_216


def test_other_presets_have_the_papers_sizes():
    assert round(count_trainable(JetConfig.preset("imagenet64_large")) / 1e9, 2) == 1.02
    assert round(count_trainable(JetConfig.preset("jetformer_adaptor")) / 1e9, 2) == 0.43
    adaptor = JetConfig.preset("jetformer_adaptor")
    assert (adaptor.num_tokens, adaptor.token_dim) == (256, 768)


def test_layer_plan_cycles_kinds_and_patterns():
    plan = JetConfig.preset("imagenet64").layer_plan()
    assert len(plan) == 32
    assert [kind for kind, _ in plan[:6]] == ["channels"] * 4 + ["spatial", "channels"]
    spatial = [pattern for kind, pattern in plan if kind == "spatial"]
    assert spatial == list(SPATIAL_PATTERNS)  # layers 4, 9, ..., 29


def test_whole_jet_logdet_matches_the_jacobian_both_ways():
    jet = perturb_parameters_(Jet(JetConfig(**SMALL)).double(), scale=0.2, seed=3)
    x = torch.rand(2, 2, 4, 8, dtype=torch.float64) * 2 - 1
    z, logdet = jet(x)
    assert z.shape == (2, 8, 8) and logdet.dtype == torch.float64
    back, inverse_logdet = jet.inverse(z)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    expected = jacobian_logdet(jet, x, None)
    expected_inverse = jacobian_logdet(jet.inverse, z, None)
    assert (logdet - expected).abs().max() < 1e-8
    assert (inverse_logdet - expected_inverse).abs().max() < 1e-8
    assert expected.abs().min() > 0.1


def test_conditioned_jet_logdet_matches_the_jacobian():
    jet = Jet(JetConfig(**{**SMALL, "depth": 3}, context_dim=4)).double()
    perturb_parameters_(jet, scale=0.2, seed=4)
    x = torch.rand(1, 2, 4, 8, dtype=torch.float64) * 2 - 1
    context = torch.randn(1, 5, 4, dtype=torch.float64)
    z, logdet = jet(x, context)
    expected = jacobian_logdet(jet, x, context)
    assert (logdet - expected).abs().max() < 1e-8
    torch.testing.assert_close(jet.inverse(z, context)[0], x, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def deep_jet():
    torch.manual_seed(0)
    config = JetConfig(
        image_size=(16, 16),
        channels=3,
        patch_size=4,
        depth=32,
        block_depth=1,
        emb_dim=32,
        num_heads=4,
        kinds=("channels", "channels", "spatial"),
        spatial_patterns=SPATIAL_PATTERNS,
    )
    return perturb_parameters_(Jet(config), scale=0.05, seed=5)


def test_deep_jet_round_trips_float32(deep_jet):
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z, logdet = deep_jet(x)
        back, inverse_logdet = deep_jet.inverse(z)
    assert (back - x).abs().max() < 1e-4
    assert (logdet + inverse_logdet).abs().max() < 1e-3
    assert (
        z - x.reshape(4, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(4, 16, 48)
    ).abs().max() > 0.1


def test_examples_do_not_depend_on_their_batch_mates(deep_jet):
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z, logdet = deep_jet(x)
        other = torch.cat([x[2:3], torch.rand(5, 3, 16, 16) * 2 - 1])
        z_alone, logdet_alone = deep_jet(other)
        back = deep_jet.inverse(z[1:2])[0]
    torch.testing.assert_close(z_alone[0], z[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet_alone[0], logdet[2], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(back[0], x[1], atol=1e-4, rtol=0)


def test_every_trainable_parameter_receives_a_gradient():
    jet = perturb_parameters_(Jet(JetConfig(**SMALL, context_dim=3)), scale=0.1)
    z, logdet = jet(torch.rand(2, 2, 4, 8) * 2 - 1, torch.randn(2, 4, 3))
    (z.square().sum() - logdet.sum()).backward()
    for name, parameter in jet.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name


def test_permutations_survive_a_state_dict_round_trip():
    config = JetConfig(**SMALL)
    jet = perturb_parameters_(Jet(config), scale=0.1)
    assert "couplings.flows.0.split.perm" in jet.state_dict()
    other = Jet(JetConfig(**SMALL, seed=123))
    assert not torch.equal(other.couplings[0].split.perm, jet.couplings[0].split.perm)
    other.load_state_dict(jet.state_dict())
    x = torch.rand(3, 2, 4, 8) * 2 - 1
    for a, b in zip(jet(x), other(x), strict=True):
        assert torch.equal(a, b)


def test_permutations_are_frozen_buffers():
    jet = Jet(JetConfig(**SMALL))
    names = {name for name, _ in jet.named_parameters()}
    assert not any(name.endswith(("perm", "order")) for name in names)
    assert sum(name.endswith(("perm", "order")) for name, _ in jet.named_buffers()) == 8


def test_jet_is_the_identity_on_patches_at_init():
    jet = Jet(JetConfig(**SMALL))
    x = torch.rand(2, 2, 4, 8) * 2 - 1
    z, logdet = jet(x)
    assert torch.equal(logdet, torch.zeros(2))
    assert torch.equal(jet.decode(z), x)


def test_non_square_images_round_trip():
    config = JetConfig(
        image_size=(8, 16),
        channels=3,
        patch_size=4,
        depth=4,
        emb_dim=16,
        kinds=("spatial", "channels"),
        spatial_patterns=SPATIAL_PATTERNS,
    )
    jet = perturb_parameters_(Jet(config), scale=0.1)
    x = torch.rand(2, 3, 8, 16) * 2 - 1
    z, _ = jet(x)
    assert z.shape == (2, 8, 48)
    assert (jet.inverse(z)[0] - x).abs().max() < 1e-5


# -- configuration --------------------------------------------------------------------------


def test_config_json_round_trip():
    config = JetConfig.preset("imagenet64", seed=7, context_dim=32)
    text = config.to_json()
    assert JetConfig.from_json(text) == config
    assert isinstance(JetConfig.from_json(text).image_size, tuple)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=(28, 28), patch_size=4, channels=1), "unequal halves"),  # 7x7 tokens
        (
            dict(image_size=(12, 16), kinds=("spatial",), spatial_patterns=("hstripes",)),
            "hstripes.*3x4 token grid.*change image_size or patch_size",
        ),
        (
            dict(channels=1, patch_size=3, image_size=(9, 9)),
            "D = .* = 9 is odd.*patch_size or channels",
        ),
        (dict(image_size=(30, 32)), r"image_size \(30, 32\) is not divisible by patch_size 4"),
        (dict(emb_dim=30, num_heads=4), "emb_dim 30 is not divisible by num_heads 4"),
        (dict(kinds=("channel",)), r"kinds\[0\] must be one of 'channels', 'spatial'"),
        (dict(spatial_patterns=("diagonal",)), r"spatial_patterns\[0\] must be one of"),
        (dict(spatial_patterns=()), "spatial_patterns is empty"),
        (dict(depth=0), r"depth must be an int in \[1, 4096\], got 0"),
        (dict(scale_factor=0.0), "scale_factor must be a finite number > 0"),
    ],
)
def test_invalid_configs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        JetConfig(**{**JetConfig.preset("tiny").to_dict(), **overrides})


def test_unknown_presets_and_fields_are_refused():
    with pytest.raises(ValueError, match="unknown JetConfig preset 'huge'"):
        JetConfig.preset("huge")
    with pytest.raises(ValueError, match=r"unknown JetConfig fields: \['width'\]"):
        JetConfig.from_dict({"width": 3})


def test_channels_only_configs_ignore_the_grid():
    config = JetConfig.preset("mnist")
    assert config.grid == (7, 7) and config.kinds == ("channels",)
    assert Jet(config)(torch.zeros(1, 1, 28, 28))[0].shape == (1, 49, 16)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 8, 4), r"\(\[B, C, H, W\]\) of shape \[B, 2, 4, 8\], got \[2, 8, 4\]"),
        (torch.zeros(2, 3, 4, 8), r"got \[2, 3, 4, 8\]"),
        (torch.zeros(2, 2, 8, 4), r"got \[2, 2, 8, 4\]"),
        (torch.zeros(2, 2, 4, 8, dtype=torch.int32), "floating-point tensor, got torch.int32"),
        (torch.zeros(2, 2, 4, 8, dtype=torch.uint8), "floating-point tensor, got torch.uint8"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        Jet(JetConfig(**SMALL))(images)


def test_non_finite_values_are_refused_at_the_public_entry_points():
    jet = Jet(JetConfig(**SMALL))
    with pytest.raises(ValueError, match="images contain non-finite"):
        jet.encode(torch.full((2, 2, 4, 8), float("nan")))
    with pytest.raises(ValueError, match="tokens contain non-finite"):
        jet.decode(torch.full((2, 8, 8), float("inf")))


def test_bad_tokens_and_encode_inputs_are_refused():
    jet = Jet(JetConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expects tokens \(\[B, N, D\]\) of shape \[B, 8, 8\]"):
        jet.inverse(torch.zeros(2, 8, 7))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*got values in \[0, 2\]"):
        jet.encode(torch.ones(1, 2, 4, 8) * 2 - torch.eye(8)[:4] * 2)
    with pytest.raises(ValueError, match="uint8 or floating-point tensor, got torch.int64"):
        jet.encode(torch.zeros(1, 2, 4, 8, dtype=torch.long))


# -- the latent API -------------------------------------------------------------------------


def test_encode_dequantizes_uint8_with_the_callers_generator():
    jet = perturb_parameters_(Jet(JetConfig(**SMALL)), scale=0.1)
    pixels = torch.randint(0, 256, (3, 2, 4, 8), dtype=torch.uint8)
    a = jet.encode(pixels, noise=True, generator=torch.Generator().manual_seed(1))
    b = jet.encode(pixels, noise=True, generator=torch.Generator().manual_seed(1))
    c = jet.encode(pixels, noise=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    images = jet.decode(a[0])
    assert torch.equal(to_uint8(images), pixels)
    floats = pixels.float() / 127.5 - 1
    assert torch.equal(jet.encode(floats)[0], jet(floats)[0])


def test_bits_per_dim_follows_the_formula():
    jet = perturb_parameters_(Jet(JetConfig(**SMALL)).double(), scale=0.1)
    x = torch.rand(2, 2, 4, 8, dtype=torch.float64) * 2 - 1
    z, logdet = jet(x)
    dims = 2 * 4 * 8
    nll = (0.5 * z**2 + 0.5 * math.log(2 * math.pi) + math.log(127.5)).sum((1, 2))
    expected = (nll - logdet) / (dims * math.log(2))
    torch.testing.assert_close(jet.bits_per_dim(x), expected)
    torch.testing.assert_close(jet.log_prob(x), -(nll - logdet) + dims * math.log(127.5))


def test_identity_jet_on_uniform_noise_gives_about_eight_and_a_half_bpd():
    jet = Jet(JetConfig.preset("tiny"))
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    bpd = jet.bits_per_dim(pixels, generator=torch.Generator().manual_seed(0))
    # z ~ U[-1, 1]: E[z^2]/2 = 1/6 nats, so bpd = (1/6 + ln(2 pi)/2 + ln 127.5) / ln 2.
    expected = (1 / 6 + 0.5 * math.log(2 * math.pi) + math.log(127.5)) / math.log(2)
    assert abs(bpd.mean().item() - expected) < 0.02


def test_sample_is_reproducible_and_scales_with_temperature():
    jet = perturb_parameters_(Jet(JetConfig(**SMALL)), scale=0.1)
    a = jet.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(3))
    b = jet.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 2, 4, 8) and torch.equal(a, b)
    zero = jet.sample(2, temperature=0.0)
    torch.testing.assert_close(zero, jet.decode(torch.zeros(2, 8, 8)))


def test_split_and_merge_tokens_factor_out_exactly():
    tokens = torch.randn(2, 8, 12)
    kept, rest = split_tokens(tokens, 4)
    assert kept.shape == (2, 8, 4) and rest.shape == (2, 8, 8)
    torch.testing.assert_close(kept, tokens[..., :4])
    assert torch.equal(merge_tokens(kept, rest), tokens)
    assert split_tokens(tokens, 12)[1].shape == (2, 8, 0)
    with pytest.raises(ValueError, match=r"keep must be in \[0, 12\].*got 13"):
        split_tokens(tokens, 13)
    with pytest.raises(ValueError, match="must agree on all but the last dim"):
        merge_tokens(kept, rest[:, :7])


def test_save_and_load_pretrained_round_trip_exactly(tmp_path):
    jet = perturb_parameters_(Jet(JetConfig(**SMALL)), scale=0.1)
    jet.save_pretrained(tmp_path / "jet")
    jet.save_pretrained(tmp_path / "jet")  # overwriting replaces the directory whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jet"]
    loaded = Jet.from_pretrained(tmp_path / "jet")
    assert loaded.config == jet.config
    x = torch.rand(2, 2, 4, 8) * 2 - 1
    assert torch.equal(loaded(x)[0], jet(x)[0])


def test_broken_pretrained_directories_are_refused(tmp_path):
    from jetblocks.checkpoint import CheckpointError, write_model_files

    jet = Jet(JetConfig(**SMALL))
    jet.save_pretrained(tmp_path / "jet")
    (tmp_path / "jet" / "config.json").write_text('{"depth": 0}')
    with pytest.raises(CheckpointError, match="config.json does not match the configuration"):
        Jet.from_pretrained(tmp_path / "jet")
    invalid = {**jet.config.to_dict(), "depth": 0}  # the weights' copy says the same
    write_model_files(tmp_path / "invalid", jet.state_dict(), invalid)
    with pytest.raises(CheckpointError, match="config.json is not a valid JetConfig.*depth"):
        Jet.from_pretrained(tmp_path / "invalid")
    (tmp_path / "jet" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Jet.from_pretrained(tmp_path / "jet")
    with pytest.raises(CheckpointError, match="is missing"):
        Jet.from_pretrained(tmp_path / "nothing")
