"""A Gaussian-mixture output head for autoregressive models over continuous soft tokens.

Per position, ``GMMHead`` maps a hidden state ``h [..., width]`` through one
``Linear(width -> K + 2*K*d)`` to mixture logits ``a [K]``, means ``mu [K, d]`` and scale
pre-activations ``s [K, d]`` (laid out as the reference: ``[a | (K, 2, d)]``, loc before
scale), with ``sigma = max(squareplus(s), 1e-6)`` and ``squareplus(s) = (s + sqrt(s^2 + 4))/2``:

    p(z) = sum_k softmax(a)_k prod_j N(z_j; mu_kj, sigma_kj)

Everything downstream of the hidden state runs in float32, also under bf16 autocast.

Classifier-free guidance (:func:`sample_guided`) draws one component ``k`` from the
*conditional* mixture, then samples every dim from the normalised
``N(x; mu_c, sigma_c)^(1+w) / N(x; mu_u, sigma_u)^w`` of component ``k``: a Gaussian with
precision ``(1+w)/sigma_c^2 - w/sigma_u^2`` and mean
``((1+w) mu_c/sigma_c^2 - w mu_u/sigma_u^2) / precision`` where that precision is positive,
and ``N(mu_c, sigma_c)`` where it is not. A temperature ``T`` multiplies every sigma first.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks import rng
from jetblocks.likelihood import HALF_LOG_2PI
from jetblocks.validation import (
    GUIDANCE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SAMPLER,
    TEMPERATURE,
    Shape,
    checked,
)

__all__ = [
    "GMMHead",
    "GaussianMixture",
    "guided_gaussian",
    "rejection_guided",
    "sample_guided",
    "squareplus",
]

SCALE_FLOOR = 1e-6


def squareplus(x: Tensor) -> Tensor:
    """``(x + sqrt(x^2 + 4)) / 2``: smooth, positive, ``~x`` for large ``x``, 1 at 0."""
    return 0.5 * (x + torch.sqrt(x.square() + 4.0))


@dataclasses.dataclass
class GaussianMixture:
    """A diagonal Gaussian mixture per position.

    ``logits [..., K]``, ``means [..., K, d]`` and ``scales [..., K, d]`` (sigmas), float32.
    """

    logits: Tensor
    means: Tensor
    scales: Tensor

    @property
    def num_mixtures(self) -> int:
        return self.logits.shape[-1]

    def component_log_prob(self, tokens: Tensor) -> Tensor:
        """``log N(tokens; mu_k, sigma_k)`` summed over the ``d`` dims, ``[..., K]``."""
        z = tokens.to(self.means.dtype).unsqueeze(-2)
        normal = -0.5 * ((z - self.means) / self.scales).square() - self.scales.log()
        return normal.sum(-1) - tokens.shape[-1] * HALF_LOG_2PI

    def log_prob(self, tokens: Tensor) -> Tensor:
        """``log p(tokens)`` ``[...]`` in nats for tokens ``[..., d]``."""
        log_weights = self.logits.log_softmax(-1)
        return torch.logsumexp(log_weights + self.component_log_prob(tokens), dim=-1)

    def sample_component(self, *, generator: torch.Generator | None = None) -> Tensor:
        """One component index ``[...]`` per position, ``k ~ softmax(logits)``."""
        probs = self.logits.softmax(-1).reshape(-1, self.num_mixtures)
        if generator is not None:
            probs = probs.to(generator.device)
        index = torch.multinomial(probs, 1, generator=generator)
        return index.reshape(self.logits.shape[:-1]).to(self.logits.device)

    def select(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` ``[..., d]`` of component ``index [...]`` at every position."""
        gather = index[..., None, None].expand(*index.shape, 1, self.means.shape[-1])
        return self.means.gather(-2, gather).squeeze(-2), self.scales.gather(-2, gather).squeeze(-2)

    @checked(temperature=TEMPERATURE)
    def sample(
        self, temperature: float = 1.0, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """``z [..., d]``: a component from the mixture, then ``mu_k + T * sigma_k * eps``."""
        mean, scale = self.select(self.sample_component(generator=generator))
        return mean + temperature * scale * rng.randn(mean.shape, generator=generator, like=mean)


class GMMHead(nn.Module):
    """``Linear(width -> K + 2*K*d)`` read as a diagonal Gaussian mixture over ``d`` dims.

    The reference zero-initialises this layer, which leaves all ``K`` components identical
    (and so identically updated) for ever. Here the kernel is zero and the bias is the
    reference's (zero logits, zero scale pre-activations: ``sigma = squareplus(0) = 1``)
    except the mean biases, drawn from ``N(0, mean_init_std^2)`` (default 0.5): every
    component starts as a unit Gaussian at a different place, so the symmetry is broken.
    """

    @checked(
        width=POSITIVE_INT,
        num_mixtures=POSITIVE_INT,
        dim=POSITIVE_INT,
        scale_floor=POSITIVE,
        mean_init_std=NON_NEGATIVE,
    )
    def __init__(
        self,
        width: int,
        num_mixtures: int,
        dim: int,
        *,
        scale_floor: float = SCALE_FLOOR,
        mean_init_std: float = 0.5,
    ) -> None:
        super().__init__()
        self.width, self.num_mixtures, self.dim = width, num_mixtures, dim
        self.scale_floor = scale_floor
        self.proj = nn.Linear(width, num_mixtures + 2 * num_mixtures * dim)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.proj.bias.zero_()
            _, loc_scale = self.proj.bias.split([num_mixtures, 2 * num_mixtures * dim])
            loc_scale.view(num_mixtures, 2, dim)[:, 0].normal_(0.0, mean_init_std)

    def forward(self, h: Tensor) -> GaussianMixture:
        """The mixture at every position of ``h [..., width]``, computed in float32."""
        Shape(("...", self.width)).check(h, "GMMHead", "h")
        with torch.autocast(h.device.type, enabled=False):
            proj = self.proj
            if proj.weight.dtype == torch.float32:
                out = proj(h.float())  # the layer itself: accelerate() may have swapped it
            else:
                out = F.linear(h.float(), proj.weight.float(), proj.bias.float())
        logits, loc_scale = out.split([self.num_mixtures, 2 * self.num_mixtures * self.dim], dim=-1)
        loc_scale = loc_scale.unflatten(-1, (self.num_mixtures, 2, self.dim))
        scales = squareplus(loc_scale[..., 1, :]).clamp_min(self.scale_floor)
        return GaussianMixture(logits, loc_scale[..., 0, :], scales)

    def log_prob(self, h: Tensor, tokens: Tensor) -> Tensor:
        """``log p(tokens | h)`` ``[...]`` in nats (float32) for ``tokens [..., d]``."""
        if tokens.shape[-1] != self.dim or tokens.shape[:-1] != h.shape[:-1]:
            raise ValueError(
                f"tokens must be [..., {self.dim}] matching h {list(h.shape)}, "
                f"got {list(tokens.shape)}"
            )
        return self(h).log_prob(tokens.float())

    def nll(self, h: Tensor, tokens: Tensor) -> Tensor:
        """``-log p(tokens | h)``, ``[...]``."""
        return -self.log_prob(h, tokens)

    @checked(temperature=TEMPERATURE)
    def sample(
        self, h: Tensor, temperature: float = 1.0, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """One token ``[..., d]`` per position of ``h``; ``temperature`` multiplies sigma."""
        return self(h).sample(temperature, generator=generator)

    @checked(weight=GUIDANCE, temperature=TEMPERATURE)
    def sample_guided(
        self,
        h_cond: Tensor,
        h_uncond: Tensor,
        weight: float,
        temperature: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Classifier-free guided tokens from conditional and unconditional hidden states."""
        return sample_guided(self(h_cond), self(h_uncond), weight, temperature, generator=generator)


@checked(weight=GUIDANCE)
def guided_gaussian(
    mu_c: Tensor, sigma_c: Tensor, mu_u: Tensor, sigma_u: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    """Mean and sigma of ``N(mu_c, sigma_c)^(1+w) / N(mu_u, sigma_u)^w``, normalised.

    ``precision = (1+w)/sigma_c^2 - w/sigma_u^2``;
    ``mean = ((1+w) mu_c / sigma_c^2 - w mu_u / sigma_u^2) / precision``. Where the precision
    is not positive the product is not normalisable and ``(mu_c, sigma_c)`` is returned.
    """
    prec_c, prec_u = sigma_c.square().reciprocal(), sigma_u.square().reciprocal()
    precision = (1 + weight) * prec_c - weight * prec_u
    ok = precision > 0
    safe = torch.where(ok, precision, torch.ones_like(precision))
    mean = ((1 + weight) * mu_c * prec_c - weight * mu_u * prec_u) / safe
    return torch.where(ok, mean, mu_c), torch.where(ok, safe.rsqrt(), sigma_c)


@checked(weight=GUIDANCE, max_draws=POSITIVE_INT)
def rejection_guided(
    mu_c: Tensor,
    sigma_c: Tensor,
    mu_u: Tensor,
    sigma_u: Tensor,
    weight: float,
    *,
    max_draws: int = 1000,
    generator: rng.Generator = None,
) -> Tensor:
    """One draw per element from ``N(mu_c, sigma_c)^(1+w) / N(mu_u, sigma_u)^w`` by rejection.

    The reference's sampler (big_vision ``CFGDensity``), element-wise: proposal
    ``q = N(mu_c, 2 max(sigma_c, sigma_u))``; envelope factor ``M = max p(x) / q(mu_c)`` with
    the max over the grid ``mu_c + linspace(-10, 10, 1001)``; ``max_draws`` proposals, the
    first with ``u M q(x) < p(x)`` (``u ~ U[0, 1)``) is kept, else a draw from
    ``N(mu_c, sigma_c)``. ``M q`` is not an envelope in the tails (``M q <= max p``), so the
    samples follow ``min(p, M q)``, not ``p``: this is what the published guidance weights
    and temperatures were tuned with. Computed in log space (the reference's densities
    underflow in float32 where these do not).
    """
    mu_c, sigma_c, mu_u, sigma_u = (t.float() for t in (mu_c, sigma_c, mu_u, sigma_u))

    def log_target(x: Tensor) -> Tensor:
        log_c = -0.5 * ((x - mu_c) / sigma_c).square() - sigma_c.log()
        log_u = -0.5 * ((x - mu_u) / sigma_u).square() - sigma_u.log()
        return (1 + weight) * log_c - weight * log_u

    spread = 2 * torch.maximum(sigma_c, sigma_u)
    grid = torch.linspace(-10.0, 10.0, 1001, device=mu_c.device).view(-1, *[1] * mu_c.dim())
    log_envelope = log_target(mu_c + grid).amax(0) + spread.log()  # log M + log(q normaliser)
    noise = rng.randn((max_draws, *mu_c.shape), generator=generator, like=mu_c)
    proposals = mu_c + spread * noise
    log_q = -0.5 * noise.square() - spread.log()  # log q(x) up to the constant in M
    log_u = rng.rand(proposals.shape, generator=generator, like=mu_c).log()
    accepted = log_u + log_envelope + log_q < log_target(proposals)
    first = accepted.int().argmax(0, keepdim=True)  # 0 where none was accepted
    chosen = proposals.gather(0, first).squeeze(0)
    fallback = mu_c + sigma_c * rng.randn(mu_c.shape, generator=generator, like=mu_c)
    return torch.where(accepted.any(0), chosen, fallback)


@checked(weight=GUIDANCE, temperature=TEMPERATURE, sampler=SAMPLER)
def sample_guided(
    cond: GaussianMixture,
    uncond: GaussianMixture,
    weight: float,
    temperature: float = 1.0,
    *,
    sampler: str = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    """CFG sampling: one component ``k`` from ``cond``, then per dim the guided density of it.

    The unconditional mixture contributes the same component ``k``. ``temperature``
    multiplies both sigmas before guidance. ``sampler="exact"`` draws from the normalised
    guided Gaussian (:func:`guided_gaussian`); ``"rejection"`` is the reference's rejection
    sampler (:func:`rejection_guided`), with which the published (w, T) pairs were tuned.
    """
    if cond.means.shape != uncond.means.shape:
        raise ValueError(
            f"conditional and unconditional mixtures differ in shape: "
            f"{list(cond.means.shape)} vs {list(uncond.means.shape)}"
        )
    index = cond.sample_component(generator=generator)
    mu_c, sigma_c = cond.select(index)
    mu_u, sigma_u = uncond.select(index)
    sigma_c, sigma_u = temperature * sigma_c, temperature * sigma_u
    if sampler == "rejection":
        return rejection_guided(mu_c, sigma_c, mu_u, sigma_u, weight, generator=generator)
    mean, sigma = guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, weight)
    return mean + sigma * rng.randn(mean.shape, generator=generator, like=mean)
