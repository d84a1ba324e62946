"""Sampling images (text/class -> image) and captions (image -> text) from a JetFormer.

Both run on the library's loop (:mod:`jetblocks.autoregressive`): images are
``sample_soft_tokens`` after the prefix ``[BOS, text, BOI]`` (with guidance ``w != 0`` the
unconditional rows see the NOLABEL prefix) then ``decode_soft_tokens`` (factored dims from
``N(0, 1)``, Jet's inverse, clipped); captions are ``generate`` after ``[BOI, image, BOS]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jetblocks import rng
from jetblocks.autoregressive import decode_soft_tokens, generate, sample_soft_tokens
from jetblocks.likelihood import dequantize

from .model import JetFormer


def _prefix(model: JetFormer, text: Tensor, drop: bool) -> Tensor:
    rows, cfg = len(text), model.config
    mask = torch.full((rows,), drop, dtype=torch.bool, device=text.device)
    parts = [model.special(cfg.bos_id, rows), model.embed_text(text, mask)]
    return torch.cat([*parts, model.special(cfg.boi_id, rows)], dim=1)


def _prefix_mask(model: JetFormer, text_mask: Tensor | None) -> Tensor | None:
    """``[BOS, text, BOI]``'s mask: pads of the prompts hidden (see ``Decoder.forward``)."""
    if text_mask is None or bool(text_mask.all()):
        return None
    one = text_mask.new_ones(len(text_mask), 1)
    return torch.cat([one, text_mask.repeat(1, model.config.num_vocab_repeats), one], dim=1)


@torch.no_grad()
def sample_image_tokens(
    model: JetFormer,
    text: Tensor,
    *,
    text_mask: Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    sampler: str = "exact",
    generator: rng.Generator = None,
    use_cache: bool = True,
) -> Tensor:
    """Kept soft tokens ``[B, N, keep]`` for prompts ``text [B, L]`` (class labels: L = 1);
    ``text_mask`` (False: a pad) hides padding from attention and positions."""
    return sample_soft_tokens(
        model.decoder,
        model.head,
        model.image_embed,
        _prefix(model, text, drop=False),
        model.config.jet_config.num_tokens,
        uncond_prefix=_prefix(model, text, drop=True) if guidance != 0.0 else None,
        prefix_mask=_prefix_mask(model, text_mask),
        guidance=guidance,
        temperature=temperature,
        sampler=sampler,
        use_cache=use_cache,
        generator=generator,
    )


@torch.no_grad()
def sample_images(
    model: JetFormer,
    text: Tensor,
    *,
    text_mask: Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    sampler: str = "exact",
    generator: rng.Generator = None,
    use_cache: bool = True,
) -> Tensor:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` for prompts ``text [B, L]``."""
    kept = sample_image_tokens(
        model,
        text,
        text_mask=text_mask,
        guidance=guidance,
        temperature=temperature,
        sampler=sampler,
        generator=generator,
        use_cache=use_cache,
    )
    return decode_soft_tokens(model.jet, kept, generator=generator)


@torch.no_grad()
def caption_images(
    model: JetFormer,
    pixels: Tensor,
    *,
    temperature: float = 0.0,
    generator: rng.Generator = None,
) -> Tensor:
    """Text tokens ``[B, text_len]`` for uint8 images, image first: ``[BOI, img, BOS] -> text``.

    ``temperature = 0`` decodes greedily.
    """
    cfg = model.config
    images = dequantize(pixels, generator=torch.Generator(pixels.device).manual_seed(0))
    tokens, _ = model.jet(images.to(next(model.parameters()).dtype))
    rows = len(pixels)
    prefix = torch.cat(
        [
            model.special(cfg.boi_id, rows),
            model.image_embed(tokens[..., : cfg.keep]),
            model.special(cfg.bos_id, rows),
        ],
        dim=1,
    )

    def next_token(h: Tensor) -> tuple[Tensor, Tensor]:
        logits = model.text_logits(h[:, -1]).float()[:, : cfg.vocab_size]  # content ids only
        if temperature > 0:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        return token, model.embed_text(token)

    return torch.cat(generate(model.decoder, prefix, cfg.text_len, next_token), dim=1)


__all__ = ["caption_images", "sample_image_tokens", "sample_images"]
