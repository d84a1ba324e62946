"""Autoregressive models over Jet's soft tokens: teacher forcing, sampling, decoding.

Everything here works with your own causal transformer through one narrow interface, a
*decoder*: a callable ``decoder(x, cache=None) -> h`` from embedded inputs ``x [B, T, W]``
to hidden states ``h [B, T, W]`` where ``h[:, t]`` depends on ``x[:, :t+1]`` only. A decoder
that has ``new_cache(max_len)`` can be sampled with a KV cache: it is then called with the
new positions only and the cache it made, whose keys and values it extends (a
:class:`KVCache` serves any number of layers; :func:`causal_mask` gives the mask of new
positions over cached ones). Without a cache the whole sequence is recomputed each step.
Padded prompts: a decoder that takes ``mask=`` (``[B, T]``, False: a pad no position
attends to and that takes no position id) is given the prompts' mask.

- Training (teacher forcing): :func:`shift_right` feeds token ``t`` to predict ``t + 1``
  after a start (BOS) prefix; :func:`soft_token_nll` is the whole GMM NLL of the kept dims;
  :func:`add_input_noise` is JetFormer's noise on the soft tokens.
- Sampling: :func:`generate` is the token-by-token loop, :func:`sample_soft_tokens` the
  soft-token sampler on it (temperature, classifier-free guidance);
  :func:`decode_soft_tokens` draws the factored-out dims from ``N(0, 1)`` and inverts the
  flow.

Curriculum-noised training images (:class:`jetblocks.NoiseCurriculum`, bins' left edges that
may leave ``[-1, 1]``) go through ``flow(dequantize(noisy))``, the raw bijection;
:meth:`jetblocks.Jet.encode` is for real images and refuses values out of range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from jetblocks import rng
from jetblocks.heads import GaussianMixture, GMMHead, sample_guided
from jetblocks.latents import merge_tokens
from jetblocks.validation import (
    COUNT,
    GUIDANCE,
    NON_NEGATIVE,
    POSITIVE_INT,
    SAMPLER,
    TEMPERATURE,
    Number,
    checked,
)

__all__ = [
    "Decoder",
    "KVCache",
    "add_input_noise",
    "causal_mask",
    "decode_soft_tokens",
    "generate",
    "sample_soft_tokens",
    "shift_right",
    "soft_token_nll",
]


class Decoder(Protocol):
    """A causal model ``[B, T, W] -> [B, T, W]``; ``new_cache(max_len)`` is optional."""

    def __call__(self, x: Tensor, cache: Any = None) -> Tensor: ...


@checked(queries=COUNT, keys=Number(int, low=0, optional=True))
def causal_mask(queries: int, keys: int | None = None, *, device=None) -> Tensor:
    """Boolean ``[queries, keys]``, True where attending is allowed.

    The queries are the last ``queries`` of ``keys`` positions (``keys`` defaults to
    ``queries``): query ``i`` sees keys ``0 .. keys - queries + i``.
    """
    keys = queries if keys is None else keys
    if keys < queries:
        raise ValueError(f"causal_mask: {queries} queries cannot follow {keys} keys")
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def shift_right(x: Tensor, start: Tensor) -> Tensor:
    """Teacher-forcing inputs: ``[start, x[:, :-1]]``, ``[B, S + T - 1, W]``.

    ``start`` is ``[B, S, W]`` (or ``[S, W]``, shared); the output at position ``S - 1 + t``
    then predicts ``x[:, t]`` from ``start`` and ``x[:, :t]``.
    """
    if start.dim() == 2:
        start = start.expand(len(x), *start.shape)
    if start.shape[0] != x.shape[0] or start.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"shift_right: start {list(start.shape)} does not match x {list(x.shape)} "
            "(expected [B, S, W] with the same B and W)"
        )
    return torch.cat([start, x[:, :-1]], dim=1)


def soft_token_nll(
    decoder: Decoder,
    head: GMMHead,
    embed: Callable[[Tensor], Tensor],
    kept: Tensor,
    prefix: Tensor,
) -> Tensor:
    """``-log p(kept)`` per token ``[B, N]`` (nats) under teacher forcing after ``prefix``.

    ``kept [B, N, d]`` are the soft tokens the model scores, ``embed`` maps them to
    ``[B, N, W]`` and ``prefix [B, S, W]`` (e.g. BOS and a prompt) comes first.
    """
    h = decoder(shift_right(embed(kept), prefix))
    return head.nll(h[:, prefix.shape[1] - 1 :], kept)


@checked(max_std=NON_NEGATIVE)
def add_input_noise(tokens: Tensor, max_std: float, *, generator: rng.Generator = None) -> Tensor:
    """``tokens + s * eps`` with ``s ~ U[0, max_std]`` per example and ``eps ~ N(0, I)``.

    JetFormer's ``input_noise_std`` (0.3 in the reference), for training only: the reference
    feeds the noisy tokens to the decoder *and* scores them (no clean targets), on
    text-first (generation) rows only.
    """
    per_example = (len(tokens),) + (1,) * (tokens.dim() - 1)
    std = max_std * rng.rand(per_example, generator=generator, like=tokens)
    return tokens + std * rng.randn(tokens.shape, generator=generator, like=tokens)


class KVCache:
    """Keys and values of every layer for up to ``max_len`` positions per sequence.

    A decoder calls :meth:`update` in each layer with the new positions' ``k, v
    [B, heads, T, d]`` (it gets back all of them so far) and :meth:`advance` once per call.
    Storage is allocated on the first update with its dtype and device (it follows autocast).
    """

    @checked(depth=POSITIVE_INT, max_len=COUNT)
    def __init__(self, depth: int, max_len: int) -> None:
        self.depth, self.max_len = depth, max_len
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.mask: Tensor | None = None  # [B, max_len]: which stored positions may be attended
        self.length = 0  # positions stored in every layer (before the current call)

    def extend_mask(self, mask: Tensor) -> Tensor:
        """Record which of the new positions (``mask [B, T]``, True: visible, e.g. not a pad)
        may be attended; return the mask of every position so far, ``[B, length + T]``."""
        if self.mask is None:
            self.mask = mask.new_ones(mask.shape[0], self.max_len, dtype=torch.bool)
        end = self.length + mask.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.mask[:, self.length : end] = mask
        return self.mask[:, :end]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` after the cached positions of ``layer``; return all of them."""
        if self.keys is None:
            shape = (self.depth, k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, positions: int) -> None:
        """Mark ``positions`` new positions as stored (after every layer has seen them)."""
        self.length += positions


Step = Callable[[Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
@checked(steps=COUNT)
def generate(
    decoder: Decoder,
    prefix: Tensor,
    steps: int,
    next_token: Step,
    *,
    prefix_mask: Tensor | None = None,
    use_cache: bool | None = None,
) -> list[Tensor]:
    """The token-by-token loop: ``steps`` tokens after the embedded ``prefix [B, S, W]``.

    ``next_token(h)`` gets the last hidden state ``[B, 1, W]`` and returns ``(token,
    embedded)``: what to keep and what to feed back (``[B, 1, W]``). Returns the tokens
    (none for ``steps = 0``). ``use_cache``: None (default) runs the decoder on one
    position per step when it offers ``new_cache(max_len)`` and recomputes the whole
    sequence otherwise; True requires the cache, False never uses it. The tokens are the
    same either way. ``prefix_mask [B, S]`` (False: a pad nobody attends to) is passed on
    as ``mask=``.
    """
    has_cache = hasattr(decoder, "new_cache")
    if use_cache and not has_cache:
        raise TypeError(
            f"use_cache=True, but {type(decoder).__name__} has no new_cache(max_len); pass "
            "use_cache=None (recompute without a cache) or give the decoder a cache"
        )
    if steps == 0:
        return []
    wants_cache = has_cache and use_cache is not False
    cache = decoder.new_cache(prefix.shape[1] + steps) if wants_cache else None

    def run(x: Tensor, mask: Tensor | None) -> Tensor:
        args = () if cache is None else (cache,)
        return decoder(x, *args) if mask is None else decoder(x, *args, mask=mask)

    sequence, mask, tokens = prefix, prefix_mask, []
    h = run(prefix, prefix_mask)[:, -1:]
    for step in range(steps):
        token, embedded = next_token(h)
        tokens.append(token)
        if step == steps - 1:
            break
        new_mask = None if mask is None else mask.new_ones(len(embedded), embedded.shape[1])
        if cache is not None:
            h = run(embedded, new_mask)
        else:
            sequence = torch.cat([sequence, embedded], dim=1)
            mask = None if mask is None else torch.cat([mask, new_mask], dim=1)
            h = run(sequence, mask)[:, -1:]
    return tokens


@torch.no_grad()
@checked(num_tokens=COUNT, guidance=GUIDANCE, temperature=TEMPERATURE, sampler=SAMPLER)
def sample_soft_tokens(
    decoder: Decoder,
    head: GMMHead,
    embed: Callable[[Tensor], Tensor],
    prefix: Tensor,
    num_tokens: int,
    *,
    uncond_prefix: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    sampler: str = "exact",
    use_cache: bool | None = None,
    generator: rng.Generator = None,
) -> Tensor:
    """``num_tokens`` soft tokens ``[B, N, d]`` after ``prefix [B, S, W]``, one at a time.

    Each token is drawn from ``head``'s mixture with ``temperature`` on sigma. With
    ``guidance = w != 0``, ``uncond_prefix`` (same shape, e.g. the prompt dropped, every
    position visible) runs alongside and tokens come from :func:`jetblocks.sample_guided`
    (``sampler``: ``"exact"`` guided Gaussian or the reference's ``"rejection"`` sampler);
    both rows get the token. ``prefix_mask [B, S]`` marks padding of the prompts and
    ``use_cache`` says whether to use the decoder's KV cache (see :func:`generate`). With
    ``num_tokens = 0`` the result is the empty ``[B, 0, d]``.
    """
    guided = guidance != 0.0
    if guided:
        if uncond_prefix is None or uncond_prefix.shape != prefix.shape:
            raise ValueError(
                f"guidance {guidance} needs uncond_prefix of prefix's shape {list(prefix.shape)}"
            )
        prefix = torch.cat([prefix, uncond_prefix])
        if prefix_mask is not None:
            prefix_mask = torch.cat([prefix_mask, torch.ones_like(prefix_mask)])
    rows = len(prefix) // 2 if guided else len(prefix)

    def next_token(h: Tensor) -> tuple[Tensor, Tensor]:
        mixture = head(h)
        if guided:
            cond, uncond = _rows(mixture, slice(None, rows)), _rows(mixture, slice(rows, None))
            token = sample_guided(
                cond, uncond, guidance, temperature, sampler=sampler, generator=generator
            )
            return token, embed(torch.cat([token, token]).to(prefix.dtype))
        token = mixture.sample(temperature, generator=generator)
        return token, embed(token.to(prefix.dtype))

    tokens = generate(
        decoder, prefix, num_tokens, next_token, prefix_mask=prefix_mask, use_cache=use_cache
    )
    if not tokens:
        return prefix.new_zeros(rows, 0, head.dim, dtype=torch.float32)
    return torch.cat(tokens, dim=1)


def _rows(mixture: GaussianMixture, rows: slice) -> GaussianMixture:
    return GaussianMixture(mixture.logits[rows], mixture.means[rows], mixture.scales[rows])


@torch.no_grad()
def decode_soft_tokens(
    flow, kept: Tensor, context: Tensor | None = None, *, generator: rng.Generator = None
) -> Tensor:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` from the kept dims ``[B, N, d]`` of a flow's tokens.

    The factored-out dims are drawn from ``N(0, 1)`` (untempered, as JetFormer), merged
    after the kept ones, inverted by ``flow.decode`` and clipped to the pixel range.
    """
    num_tokens, token_dim = flow.latent_shape
    if kept.dim() != 3 or kept.shape[1] != num_tokens or kept.shape[2] > token_dim:
        raise ValueError(
            f"kept tokens must be [B, {num_tokens}, d <= {token_dim}], got {list(kept.shape)}"
        )
    shape = (*kept.shape[:2], token_dim - kept.shape[2])
    rest = rng.randn(shape, generator=generator, like=kept.float())
    return flow.decode(merge_tokens(kept.float(), rest), context).clamp(-1.0, 1.0)
