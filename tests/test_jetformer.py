import math

import pytest
import torch

from jetblocks import Jet, JetConfig, bits_per_dim, split_tokens
from jetblocks.curriculum import NoiseCurriculum
from jetblocks.heads import GMMHead
from jetblocks.likelihood import image_bits_per_dim
from jetblocks.train import BitsPerDimTask, TrainConfig, Trainer

TINY = JetConfig(
    image_size=(8, 8),
    channels=1,
    patch_size=2,
    depth=2,
    block_depth=1,
    emb_dim=8,
    num_heads=2,
    kinds=("channels",),
)


def test_joint_nll_decomposes_into_ar_prior_and_logdet_terms():
    torch.manual_seed(0)
    gmm_nll, factored, logdet = torch.randn(3, 16).abs(), torch.randn(3, 16, 2), torch.randn(3)
    num_dims = 64
    total = image_bits_per_dim(gmm_nll, factored, logdet, num_dims)
    ln2 = math.log(2)
    ar = gmm_nll.sum(1) / (num_dims * ln2)
    prior = (0.5 * factored**2 + 0.5 * math.log(2 * math.pi)).sum((1, 2)) / (num_dims * ln2)
    jacobian = -(logdet / num_dims - math.log(127.5)) / ln2
    torch.testing.assert_close(total, ar + prior + jacobian)
    # per-token and summed GMM NLLs are the same thing
    torch.testing.assert_close(image_bits_per_dim(gmm_nll.sum(1), factored, logdet, 64), total)
    # with a standard-normal "AR model" on the kept dims it is Jet's bits/dim
    z = torch.randn(3, 16, 4)
    kept, rest = split_tokens(z, 2)
    prior_nll = (0.5 * kept**2 + 0.5 * math.log(2 * math.pi)).sum(-1)  # [B, N]
    torch.testing.assert_close(
        image_bits_per_dim(prior_nll, rest, logdet, num_dims), bits_per_dim(z, logdet)
    )
    # nothing factored out
    torch.testing.assert_close(
        image_bits_per_dim(gmm_nll, factored[..., :0], logdet, num_dims), ar + jacobian
    )


def test_noise_curriculum_schedule_at_its_ends_and_midpoint():
    curriculum = NoiseCurriculum(sigma_start=64, sigma_end=3, total_steps=1000)
    assert curriculum.sigma(0) == 64
    assert curriculum.sigma(500) == pytest.approx(33.5)
    assert curriculum.sigma(1000) == 3 and curriculum.sigma(5000) == 3
    assert NoiseCurriculum(64, 0, 10).sigma(10) == 0


def test_noise_curriculum_rounds_in_pixel_units_without_clipping():
    pixels = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    quiet = NoiseCurriculum(64, 0, 10)
    torch.testing.assert_close(quiet(pixels, 10), pixels.float() / 127.5 - 1)
    # float input in [-1, 1] is rounded to its pixel first
    torch.testing.assert_close(quiet(pixels.float() / 127.5 - 1 + 0.003, 10), quiet(pixels, 10))
    noisy = quiet(pixels, 0, generator=torch.Generator().manual_seed(0))
    x255 = (noisy + 1) * 127.5
    torch.testing.assert_close(x255, x255.round(), atol=1e-4, rtol=0)
    residual = x255 - pixels.float()
    assert residual.std().item() == pytest.approx(64, rel=0.03)
    assert x255.min() < -50 and x255.max() > 300  # not clipped
    normal = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(5))
    expected = torch.round(pixels.float() + 64 * normal) / 127.5 - 1
    torch.testing.assert_close(
        quiet(pixels, 0, generator=torch.Generator().manual_seed(5)), expected
    )


def test_gradients_reach_jet_through_the_ar_loss():
    """The AR term alone (kept dims through a GMM head) trains the flow's weights."""
    torch.manual_seed(0)
    jet = Jet(TINY)
    with torch.no_grad():  # leave the identity start so every weight is on the gradient path
        for p in jet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    keep, width = 2, 16
    embed, head = torch.nn.Linear(keep, width), GMMHead(width, 3, keep)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    z, logdet = jet(images)
    kept, rest = split_tokens(z, keep)
    inputs = torch.cat([torch.zeros_like(kept[:, :1]), kept[:, :-1]], dim=1)  # next-token shift
    gmm_nll = head.nll(torch.cumsum(embed(inputs), dim=1), kept)  # a causal toy "transformer"
    gmm_nll.sum().backward()
    for name, p in jet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    loss = image_bits_per_dim(head.nll(torch.cumsum(embed(inputs), 1), kept), rest, logdet, 64)
    assert loss.shape == (4,) and torch.isfinite(loss).all()


class RecordingTask(BitsPerDimTask):
    def __init__(self):
        self.steps = []

    def set_step(self, step):
        self.steps.append(step)


def test_trainer_tells_the_task_its_step_and_takes_the_optimizer_it_is_given(tmp_path):
    from examples.jetformer.task import jetformer_optimizer
    from jetblocks.integrations.torchdata import image_loader, open_source

    torch.manual_seed(0)
    task = RecordingTask()
    config = TrainConfig(steps=3, batch_size=8, log_every=1, progress=False)
    trainer = Trainer(
        Jet(TINY),
        task,
        config,
        model_config=TINY.to_dict(),
        train_loader=image_loader(open_source("digits", "train"), 8, seed=0),
        eval_batches=None,
        out_dir=tmp_path,
        optimizer=jetformer_optimizer,
    )
    decayed, rest = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == pytest.approx(config.weight_decay / config.lr)
    assert rest["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])  # Linear kernels
    assert any(p.dim() == 3 for p in rest["params"])  # position embeddings are not decayed
    trainer.fit()
    assert task.steps == [0, 1, 2]
