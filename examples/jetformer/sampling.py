"""Sampling images (text/class -> image) and captions (image -> text) from a JetFormer.

Images: the prefix ``[BOS, text, BOI]`` is run once, then ``N`` raster-order steps each draw
one soft token from the GMM head and feed it back; with a KV cache each step runs the
decoder on one token, without it the whole sequence is recomputed (the same function).
With guidance ``w > 0`` the batch is ``[cond, uncond]`` interleaved (uncond = the NOLABEL
prefix) and tokens come from :func:`jetblocks.sample_guided`. The factored-out dims are
drawn from ``N(0, 1)`` untempered, then Jet's inverse, clipped to ``[-1, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jetblocks import GaussianMixture, merge_tokens, rng, sample_guided
from jetblocks.likelihood import dequantize

from .model import JetFormer


@torch.no_grad()
def sample_image_tokens(
    model: JetFormer,
    text: Tensor,
    *,
    guidance: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Kept soft tokens ``[B, N, keep]`` for prompts ``text [B, L]`` (class labels: L = 1)."""
    cfg = model.config
    num_tokens = cfg.jet_config.num_tokens
    guided = guidance != 0.0
    if guided:  # rows [c0, u0, c1, u1, ...]
        text = text.repeat_interleave(2, dim=0)
        drop = torch.arange(len(text), device=text.device) % 2 == 1
    else:
        drop = torch.zeros(len(text), dtype=torch.bool, device=text.device)
    rows = len(text)
    bos = model.special(cfg.bos_id, rows)
    boi = model.special(cfg.boi_id, rows)
    prefix = torch.cat([bos, model.embed_text(text, drop), boi], dim=1)
    cache = None
    if use_cache:
        cache = model.decoder.new_cache(prefix.shape[1] + num_tokens)
    sequence = prefix
    h = model.decoder(prefix, cache)[:, -1:]
    tokens = []
    for step in range(num_tokens):
        mixture = model.head(h)
        if guided:
            cond, uncond = (_rows(mixture, start) for start in (0, 1))
            token = sample_guided(cond, uncond, guidance, temperature, generator=generator)
            feed = token.repeat_interleave(2, dim=0)
        else:
            token = mixture.sample(temperature, generator=generator)
            feed = token
        tokens.append(token)
        if step == num_tokens - 1:
            break
        x = model.image_embed(feed.to(prefix.dtype))
        if cache is not None:
            h = model.decoder(x, cache)
        else:
            sequence = torch.cat([sequence, x], dim=1)
            h = model.decoder(sequence)[:, -1:]
    return torch.cat(tokens, dim=1)


def _rows(mixture: GaussianMixture, start: int) -> GaussianMixture:
    """Every other row of a mixture (the conditional or the unconditional half)."""
    rows = slice(start, None, 2)
    return GaussianMixture(mixture.logits[rows], mixture.means[rows], mixture.scales[rows])


@torch.no_grad()
def decode_images(model: JetFormer, kept: Tensor, *, generator: torch.Generator | None = None):
    """Kept tokens + ``N(0, 1)`` factored dims -> images in ``[-1, 1]`` through Jet's inverse."""
    cfg = model.config.jet_config
    shape = (*kept.shape[:2], cfg.token_dim - kept.shape[-1])
    rest = rng.randn(shape, generator=generator, like=kept)
    return model.jet.decode(merge_tokens(kept, rest)).clamp(-1.0, 1.0)


@torch.no_grad()
def sample_images(
    model: JetFormer,
    text: Tensor,
    *,
    guidance: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` for prompts ``text [B, L]``."""
    kept = sample_image_tokens(
        model,
        text,
        guidance=guidance,
        temperature=temperature,
        generator=generator,
        use_cache=use_cache,
    )
    return decode_images(model, kept.float(), generator=generator)


@torch.no_grad()
def caption_images(
    model: JetFormer,
    pixels: Tensor,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text tokens ``[B, text_len]`` for uint8 images, image first: ``[BOI, img, BOS] -> text``.

    ``temperature = 0`` decodes greedily. Uses the KV cache.
    """
    cfg = model.config
    images = dequantize(pixels, generator=torch.Generator(pixels.device).manual_seed(0))
    tokens, _ = model.jet(images.to(next(model.parameters()).dtype))
    kept = tokens[..., : cfg.keep]
    rows = len(pixels)
    prefix = torch.cat(
        [model.special(cfg.boi_id, rows), model.image_embed(kept), model.special(cfg.bos_id, rows)],
        dim=1,
    )
    cache = model.decoder.new_cache(prefix.shape[1] + cfg.text_len)
    h = model.decoder(prefix, cache)[:, -1:]
    out = []
    for step in range(cfg.text_len):
        logits = model.text_logits(h[:, -1]).float()[:, : cfg.vocab_size]  # content ids only
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        out.append(token)
        if step < cfg.text_len - 1:
            h = model.decoder(model.embed_text(token), cache)
    return torch.cat(out, dim=1)


__all__ = ["caption_images", "decode_images", "sample_image_tokens", "sample_images"]
