import math

import pytest
import torch

from jetblocks.heads import (
    GaussianMixture,
    GMMHead,
    guided_gaussian,
    rejection_guided,
    sample_guided,
    squareplus,
)


def perturbed_head(width=6, k=3, d=2, seed=0):
    torch.manual_seed(seed)
    head = GMMHead(width, k, d)
    with torch.no_grad():
        head.proj.weight.normal_(0, 0.5)
        head.proj.bias.normal_(0, 0.5)
    return head


def direct_log_prob(head, h, z):
    """``log sum_k pi_k prod_j N(z_j; mu_kj, sigma_kj)`` in float64, written out by hand."""
    k, d = head.num_mixtures, head.dim
    out = h.double() @ head.proj.weight.double().T + head.proj.bias.double()
    logits, rest = out[..., :k], out[..., k:].reshape(*out.shape[:-1], k, 2, d)
    mu, s = rest[..., 0, :], rest[..., 1, :]
    sigma = torch.clamp((s + torch.sqrt(s * s + 4)) / 2, min=1e-6)
    weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    density = torch.exp(-0.5 * ((z.double()[..., None, :] - mu) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return torch.log((weights * density.prod(-1)).sum(-1))


def test_log_prob_matches_a_direct_float64_computation():
    head = perturbed_head()
    h, z = torch.randn(4, 5, 6), torch.randn(4, 5, 2)
    log_p = head.log_prob(h, z)
    assert log_p.shape == (4, 5) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), direct_log_prob(head, h, z), atol=1e-5, rtol=1e-5)


def test_log_prob_is_float32_under_bf16_autocast():
    head = perturbed_head()
    h, z = torch.randn(4, 5, 6), torch.randn(4, 5, 2)
    with torch.autocast("cpu", torch.bfloat16):
        log_p = head.log_prob(h, z)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), direct_log_prob(head, h, z), atol=1e-5, rtol=1e-5)


def test_scales_are_squareplus_floored_and_layout_matches_the_reference():
    head = GMMHead(2, 2, 3)
    with torch.no_grad():
        head.proj.bias.zero_()
        head.proj.bias[2 + 3 : 2 + 6] = -1e7  # component 0, scale pre-activations
        head.proj.bias[2 + 6 : 2 + 9] = 4.0  # component 1, means
    mixture = head(torch.zeros(1, 2))
    assert mixture.logits.shape == (1, 2) and mixture.means.shape == (1, 2, 3)
    assert torch.all(mixture.scales[0, 0] == 1e-6)
    assert torch.all(mixture.means[0, 1] == 4.0) and torch.all(mixture.scales[0, 1] == 1.0)
    assert squareplus(torch.tensor(0.0)) == 1.0


def test_init_breaks_the_symmetry_between_components():
    torch.manual_seed(0)
    head = GMMHead(8, 4, 3)
    mixture = head(torch.randn(2, 8))
    means = mixture.means[0]
    assert torch.all(torch.pdist(means) > 1e-3)  # all components start apart
    assert torch.all(mixture.scales == 1.0) and torch.all(mixture.logits == 0)
    head.nll(torch.randn(16, 8), torch.randn(16, 3)).mean().backward()
    grads = head.proj.weight.grad[4:].view(4, 2, 3, 8)[:, 0]  # mean rows per component
    assert torch.all(torch.pdist(grads.flatten(1)) > 1e-6)


def mixture_cdf(mixture: GaussianMixture, x: torch.Tensor, dim: int, temperature=1.0):
    """Exact marginal CDF of dim ``dim`` at points ``x`` (one position: logits [K])."""
    weights = mixture.logits.double().softmax(-1)
    mu = mixture.means[..., dim].double()
    sigma = temperature * mixture.scales[..., dim].double()
    return (weights * torch.special.ndtr((x.double()[:, None] - mu) / sigma)).sum(-1)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    x, _ = samples.double().sort()
    n = len(x)
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


def test_plain_and_unguided_sampling_follow_the_mixture():
    """One-sample Kolmogorov-Smirnov tests against the exact marginal CDFs (fixed seeds)."""
    head = perturbed_head(width=4, k=3, d=2, seed=1)
    h = torch.randn(1, 4)
    n, temperature = 20_000, 0.8
    mixture = head(h)
    one = GaussianMixture(mixture.logits[0], mixture.means[0], mixture.scales[0])
    h_many = h.expand(n, 4)
    plain = head.sample(h_many, temperature, generator=torch.Generator().manual_seed(0))
    guided = head.sample_guided(
        h_many, torch.randn(n, 4), 0.0, temperature, generator=torch.Generator().manual_seed(1)
    )
    critical = 1.63 / math.sqrt(n)  # alpha = 0.01
    for samples in (plain, guided):
        assert samples.shape == (n, 2)
        for dim in range(2):
            stat = ks_statistic(samples[:, dim], lambda x, d=dim: mixture_cdf(one, x, d, 0.8))
            assert stat < critical, (dim, stat)
    # and the test has power: the wrong temperature is rejected
    stat = ks_statistic(plain[:, 0], lambda x: mixture_cdf(one, x, 0, 1.0))
    assert stat > critical


def test_guided_gaussian_matches_the_normalised_density_product():
    """``N_c^(1+w) / N_u^w`` normalised on a fine grid in float64 has the stated mean and sigma."""
    x = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    for mu_c, s_c, mu_u, s_u, w in [(0.5, 1.0, -0.3, 1.5, 2.0), (1.0, 0.7, 2.0, 0.9, 0.5)]:
        log_density = (1 + w) * torch.distributions.Normal(mu_c, s_c).log_prob(x) - w * (
            torch.distributions.Normal(mu_u, s_u).log_prob(x)
        )
        p = torch.exp(log_density - log_density.max())
        p = p / p.sum()
        mean = (p * x).sum()
        std = torch.sqrt((p * (x - mean) ** 2).sum())
        got_mean, got_std = guided_gaussian(
            *(torch.tensor(v, dtype=torch.float64) for v in (mu_c, s_c, mu_u, s_u)), w
        )
        torch.testing.assert_close(got_mean, mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_std, std, atol=1e-6, rtol=1e-6)
        precision = (1 + w) / s_c**2 - w / s_u**2
        assert got_std.item() == pytest.approx(precision**-0.5)


def test_guided_gaussian_falls_back_to_the_conditional_when_not_normalisable():
    mu_c, s_c = torch.tensor([0.3]), torch.tensor([2.0])
    mu_u, s_u = torch.tensor([-1.0]), torch.tensor([0.5])  # (1+w)/4 - w*4 < 0 for w = 1
    mean, std = guided_gaussian(mu_c, s_c, mu_u, s_u, 1.0)
    assert torch.equal(mean, mu_c) and torch.equal(std, s_c)


def test_guided_sampling_draws_the_component_from_the_conditional_mixture():
    """Components far apart: the guided sample's component is always a conditional one, and
    per dim the draws have the guided Gaussian's mean and temperature-scaled sigma."""
    n, w, temperature = 40_000, 1.5, 0.9
    cond = GaussianMixture(
        torch.tensor([[30.0, -30.0]]).expand(n, 2),  # component 0 nearly always
        torch.tensor([[[10.0], [-10.0]]]).expand(n, 2, 1),
        torch.tensor([[[1.0], [1.0]]]).expand(n, 2, 1),
    )
    uncond = GaussianMixture(
        torch.tensor([[-30.0, 30.0]]).expand(n, 2),  # would pick component 1
        torch.tensor([[[9.0], [0.0]]]).expand(n, 2, 1),
        torch.tensor([[[1.2], [1.0]]]).expand(n, 2, 1),
    )
    samples = sample_guided(
        cond, uncond, w, temperature, generator=torch.Generator().manual_seed(0)
    )
    mean, std = guided_gaussian(
        torch.tensor(10.0), torch.tensor(0.9), torch.tensor(9.0), torch.tensor(1.08), w
    )
    assert abs(samples.mean().item() - mean.item()) < 4 * std.item() / math.sqrt(n) + 0.01
    assert samples.std().item() == pytest.approx(std.item(), rel=0.02)


def rejection_target_moments(mu_c, s_c, mu_u, s_u, w, max_draws=1000):
    """Mean and std of what the reference's rejection sampler draws, written out independently
    of it on a fine float64 grid: ``min(p, M q)`` normalised where one of ``max_draws``
    proposals is accepted (each with probability ``a = int min(p, M q) / M``), else the
    conditional ``N(mu_c, s_c)`` (probability ``(1 - a)^max_draws``)."""
    x = torch.linspace(mu_c - 40, mu_c + 40, 400_001, dtype=torch.float64)

    def log_p(v):
        return (1 + w) * torch.distributions.Normal(mu_c, s_c).log_prob(v) - w * (
            torch.distributions.Normal(mu_u, s_u).log_prob(v)
        )

    proposal = torch.distributions.Normal(mu_c, 2 * max(s_c, s_u))
    envelope_factor = log_p(mu_c + torch.linspace(-10, 10, 1001, dtype=torch.float64)).max()
    envelope_factor = envelope_factor - proposal.log_prob(torch.tensor(mu_c, dtype=torch.float64))
    log_density = torch.minimum(log_p(x), envelope_factor + proposal.log_prob(x))
    step = (x[1] - x[0]).log()
    accept = torch.exp(torch.logsumexp(log_density, 0) + step - envelope_factor)
    accepted = 1 - (1 - accept) ** max_draws
    p = torch.exp(log_density - log_density.max())
    p = p / p.sum()
    mean = accepted * (p * x).sum() + (1 - accepted) * mu_c
    second = accepted * (p * x * x).sum() + (1 - accepted) * (s_c**2 + mu_c**2)
    return mean.item(), torch.sqrt(second - mean**2).item()


@pytest.mark.parametrize(
    "mu_c, s_c, mu_u, s_u, w",
    [
        (0.5, 1.0, -0.3, 1.5, 2.0),  # normalisable, under the envelope
        (0.0, 1.0, -1.0, 1.0, 3.0),  # normalisable; the capped envelope shifts the mean
        (1.0, 0.3, 0.0, 1.0, 9.0),  # the text-to-image weight
        (0.0, 0.5, 1.0, 0.4, 3.0),  # precision < 0: no proposal accepted, the fallback
        (0.0, 1.0, 0.5, 0.9, 1.0),  # precision < 0, some accepted: a mixture of both
    ],
)
def test_rejection_sampler_moments_match_the_density_it_samples(mu_c, s_c, mu_u, s_u, w):
    n = 40_000
    args = (torch.full((n,), v) for v in (mu_c, s_c, mu_u, s_u))
    samples = rejection_guided(*args, w, generator=torch.Generator().manual_seed(0))
    mean, std = rejection_target_moments(mu_c, s_c, mu_u, s_u, w)
    assert abs(samples.mean().item() - mean) < 4 * std / math.sqrt(n)
    assert samples.std().item() == pytest.approx(std, rel=0.03)


def test_rejection_and_exact_guidance_differ_where_the_envelope_is_capped():
    mu_c, s_c, mu_u, s_u, w = 0.0, 1.0, -1.0, 1.0, 3.0  # the product is N(3, 1)
    exact_mean, _ = guided_gaussian(*(torch.tensor(v) for v in (mu_c, s_c, mu_u, s_u)), w)
    mean, _ = rejection_target_moments(mu_c, s_c, mu_u, s_u, w)
    assert exact_mean.item() == pytest.approx(3.0) and abs(mean - 3.0) > 0.3


def test_sample_guided_rejection_uses_the_conditional_component_and_temperature():
    n, w, temperature = 20_000, 2.0, 0.9
    cond = GaussianMixture(
        torch.tensor([[30.0, -30.0]]).expand(n, 2),
        torch.tensor([[[10.0], [-10.0]]]).expand(n, 2, 1),
        torch.tensor([[[1.0], [1.0]]]).expand(n, 2, 1),
    )
    uncond = GaussianMixture(
        torch.tensor([[-30.0, 30.0]]).expand(n, 2),
        torch.tensor([[[9.0], [0.0]]]).expand(n, 2, 1),
        torch.tensor([[[1.2], [1.0]]]).expand(n, 2, 1),
    )
    samples = sample_guided(
        cond, uncond, w, temperature, sampler="rejection",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    mean, std = rejection_target_moments(10.0, 0.9, 9.0, 1.08, w)
    assert abs(samples.mean().item() - mean) < 4 * std / math.sqrt(n)
    assert samples.std().item() == pytest.approx(std, rel=0.03)
    with pytest.raises(ValueError, match="sampler must be one of 'exact', 'rejection'"):
        sample_guided(cond, uncond, w, sampler="gibbs")
