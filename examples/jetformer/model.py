"""JetFormer: a Jet flow and a decoder-only transformer with a GMM head, trained jointly.

Sequences (the reference's, with BOS/BOI tokens), next-token shifted (last token dropped):

    text first  (generation):    [BOS, text (L*R), BOI, img_1 .. img_N]
    image first (understanding): [BOI, img_1 .. img_N, BOS, text (L*R)]

Text enters through an embedding table (``R = num_vocab_repeats`` copies of the vocabulary:
a class label is one "text" token embedded with ``R = 16`` distinct rows), image soft tokens
(the first ``keep`` dims of Jet's tokens) through ``Linear(keep -> width)``. The decoder is
Gemma-style: pre-RMSNorm blocks with RoPE, multi-query attention and a gated-GELU MLP,
causal over the whole sequence, then a final RMSNorm. Image positions are read out by a
:class:`jetblocks.GMMHead`, text positions by the transposed embedding table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks import GMMHead, Jet, JetConfig, image_bits_per_dim, rng, split_tokens
from jetblocks.autoregressive import KVCache, add_input_noise, causal_mask
from jetblocks.config import Config, setting
from jetblocks.pretrained import Pretrained
from jetblocks.validation import FLAG, NON_NEGATIVE, POSITIVE_INT, Choice, Number

NORM_EPS = 1e-6
TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]


@dataclasses.dataclass(frozen=True)
class JetFormerConfig(Config):
    """Architecture of a :class:`JetFormer`; ``jet`` holds a ``JetConfig`` as a dict."""

    jet: Any = setting(None, None, "the Jet's JetConfig, as a dict")  # noqa: RUF009
    keep: int = setting(None, POSITIVE_INT, "dims per token modelled by the transformer")
    width: int = setting(128, POSITIVE_INT, "decoder width")
    depth: int = setting(2, POSITIVE_INT, "decoder blocks")
    mlp_dim: int = setting(512, POSITIVE_INT, "gated MLP hidden size")
    num_heads: int = setting(4, POSITIVE_INT, "query heads")
    num_kv_heads: int = setting(1, POSITIVE_INT, "key/value heads (1: multi-query attention)")
    head_dim: int = setting(32, POSITIVE_INT, "dims per head (even: RoPE)")
    num_mixtures: int = setting(16, POSITIVE_INT, "GMM components per token")
    vocab_size: int = setting(10, POSITIVE_INT, "classes or pieces; BOS, BOI, NOLABEL follow")
    text_len: int = setting(1, POSITIVE_INT, "text tokens per example")
    num_vocab_repeats: int = setting(1, POSITIVE_INT, "copies of each text token")
    rope_base: float = setting(10_000.0, Number(float, low=0, open_low=True), "RoPE base")
    dropout: float = setting(
        0.0, Number(float, low=0, high=1, open_high=True), "on attention and MLP outputs"
    )
    input_noise_std: float = setting(0.0, NON_NEGATIVE, "max std of noise on soft tokens")
    untie_output_vocab: bool = setting(False, FLAG, "text logits from their own Linear")
    head_mean_init_std: float = setting(0.5, NON_NEGATIVE, "GMM mean biases ~ N(0, std^2)")
    learned_positions: bool = setting(False, FLAG, "+ a learned absolute position embedding")
    model: str = setting("jetformer", Choice(("jetformer",)), "the model a saved config builds")

    def validate(self) -> None:
        if not isinstance(self.jet, dict) or self.keep is None:
            raise ValueError("JetFormerConfig needs jet (a JetConfig dict) and keep")
        object.__setattr__(self, "jet", JetConfig.from_dict(dict(self.jet)).to_dict())
        if not 0 < self.keep <= self.jet_config.token_dim:
            raise ValueError(f"keep must be in [1, {self.jet_config.token_dim}], got {self.keep}")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads; head_dim even")
        if self.untie_output_vocab and self.num_vocab_repeats != 1:
            raise ValueError("untie_output_vocab needs num_vocab_repeats == 1 (as the reference)")

    @functools.cached_property
    def jet_config(self) -> JetConfig:
        """``jet`` as a :class:`JetConfig` (parsed once)."""
        return JetConfig.from_dict(self.jet)

    @property
    def bos_id(self) -> int:
        return self.vocab_size

    @property
    def boi_id(self) -> int:
        return self.vocab_size + 1

    @property
    def nolabel_id(self) -> int:
        return self.vocab_size + 2

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + 3

    @property
    def sequence_len(self) -> int:
        """Tokens of a whole sequence: BOS or BOI, text, BOI or BOS, image. The decoder's
        inputs are all but the last, at positions ``0 .. sequence_len - 2``."""
        return 2 + self.prefix_len + self.jet_config.num_tokens

    @property
    def prefix_len(self) -> int:
        """Text tokens as the decoder sees them: ``text_len * num_vocab_repeats``."""
        return self.text_len * self.num_vocab_repeats


def lecun_truncated_normal_(layer: nn.Linear) -> None:
    """The reference's kernel init: ``N(0, 1/fan_in)`` truncated at 2 sigma (and rescaled so
    the variance stays ``1/fan_in``, as flax's ``variance_scaling``); biases zero."""
    std = (1.0 / layer.in_features) ** 0.5 / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class RMSNorm(nn.Module):
    """Gemma's ``x / sqrt(mean(x^2) + eps) * (1 + scale)``, in float32, ``scale`` zero-init."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + NORM_EPS)
        return (y * (1.0 + self.scale.float())).to(x.dtype)


def rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary position embedding of ``x [B, H, T, d]`` at ``positions [T]`` or ``[B, T]``
    (halves rotated)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freq  # [(B,) T, half]
    if angles.dim() == 3:
        angles = angles[:, None]  # one set of positions per row, shared by its heads
    sin, cos = angles.sin().to(x.dtype), angles.cos().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Multi-query (or grouped-query) causal self-attention with RoPE; no biases."""

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.rope_base = config.rope_base
        self.query = nn.Linear(config.width, self.heads * self.head_dim, bias=False)
        self.key_value = nn.Linear(config.width, 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(self.heads * self.head_dim, config.width, bias=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        layer: int,
        key_mask: Tensor | None,
    ) -> Tensor:
        q = self.query(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.key_value(x).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        new = x.shape[1]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if new == k.shape[2] and key_mask is None:  # the whole sequence, nothing masked
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new positions after cached ones, or pads that no position attends to
            mask = causal_mask(new, k.shape[2], device=x.device)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).flatten(2))


class GatedMLP(nn.Module):
    """``down(gelu(gate(x)) * up(x))`` (GeGLU, tanh GELU), no biases."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Block(nn.Module):
    """``x += drop(attn(norm(x))); x += drop(mlp(norm(x)))`` (Gemma's block, as the reference)."""

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.width), Attention(config)
        self.mlp_norm, self.mlp = RMSNorm(config.width), GatedMLP(config.width, config.mlp_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        layer: int,
        key_mask: Tensor | None,
    ) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), positions, cache, layer, key_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Decoder(nn.Module):
    """Embedded tokens ``[B, T, width]`` -> final-normed hidden states ``[B, T, width]``.

    With ``config.learned_positions`` a learned embedding of each position id (zero at
    init) is added to the input, beside RoPE in every attention layer. The reference has
    RoPE only; its fastest frequency turns one radian per position, too slow for a small
    decoder to tell an image token's column in a 4-wide grid (which object is left).
    """

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.position_embedding = None
        if config.learned_positions:
            self.position_embedding = nn.Embedding(config.sequence_len, config.width)
            nn.init.zeros_(self.position_embedding.weight)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = RMSNorm(config.width)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``mask [B, T]`` (False: a pad) hides positions from attention and from the
        position ids (``positions = cumsum(mask) - 1``, as the reference)."""
        start = cache.length if cache is not None else 0
        key_mask = mask
        if cache is not None and (mask is not None or cache.mask is not None):
            new = mask if mask is not None else x.new_ones(x.shape[:2], dtype=torch.bool)
            key_mask = cache.extend_mask(new)
        if key_mask is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        else:
            positions = (key_mask.long().cumsum(1) - 1)[:, -x.shape[1] :]
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions).to(x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, cache, layer, key_mask)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.final_norm(x)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config.depth, max_len)


class JetFormer(nn.Module, Pretrained):
    """Jet + decoder + GMM head; :meth:`forward` returns the per-example losses."""

    config_class = JetFormerConfig

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.jet = Jet(config.jet_config)
        self.text_embed = nn.Embedding(config.total_vocab * config.num_vocab_repeats, config.width)
        nn.init.normal_(self.text_embed.weight, std=1.0)
        self.image_embed = nn.Linear(config.keep, config.width)
        self.decoder = Decoder(config)
        for layer in (self.image_embed, *self.decoder.modules()):
            if isinstance(layer, nn.Linear):
                lecun_truncated_normal_(layer)
        self.text_out = None
        if config.untie_output_vocab:
            self.text_out = nn.Linear(config.width, config.total_vocab)
            nn.init.normal_(self.text_out.weight, std=1.0)
            nn.init.zeros_(self.text_out.bias)
        self.head = GMMHead(
            config.width,
            config.num_mixtures,
            config.keep,
            mean_init_std=config.head_mean_init_std,
        )

    # -- embedding ----------------------------------------------------------------------------
    def special(self, token_id: int, batch: int) -> Tensor:
        """The embedding of BOS, BOI or NOLABEL, ``[batch, 1, width]``."""
        index = torch.full((batch, 1), token_id, device=self.text_embed.weight.device)
        return self.text_embed(index)

    def embed_text(self, text: Tensor, drop: Tensor | None = None) -> Tensor:
        """``text [B, L]`` -> ``[B, L*R, width]``; rows in ``drop`` become NOLABEL tokens."""
        cfg = self.config
        if drop is not None:
            text = torch.where(drop[:, None], torch.full_like(text, cfg.nolabel_id), text)
        if cfg.num_vocab_repeats > 1:
            offsets = torch.arange(cfg.num_vocab_repeats, device=text.device) * cfg.total_vocab
            text = (text[:, None, :] + offsets[None, :, None]).flatten(1)  # repeat-major
        return self.text_embed(text)

    def embed_sequence(
        self, text: Tensor, kept: Tensor, text_first: Tensor, drop: Tensor | None
    ) -> Tensor:
        """The decoder input (last token dropped), text-first or image-first per example."""
        batch = len(text)
        bos, boi = self.special(self.config.bos_id, batch), self.special(self.config.boi_id, batch)
        x_text, x_image = self.embed_text(text, drop), self.image_embed(kept)
        text_image = torch.cat([bos, x_text, boi, x_image], dim=1)[:, :-1]
        image_text = torch.cat([boi, x_image, bos, x_text], dim=1)[:, :-1]
        return torch.where(text_first[:, None, None], text_image, image_text)

    def sequence_mask(
        self, text_mask: Tensor, num_image: int, text_first: Tensor, drop: Tensor | None
    ) -> Tensor:
        """Which inputs of :meth:`embed_sequence` may be attended: text positions as
        ``text_mask [B, L]`` (dropped prompts: all), the special and image tokens always."""
        if drop is not None:
            text_mask = text_mask | drop[:, None]
        text_mask = text_mask.repeat(1, self.config.num_vocab_repeats)
        one = text_mask.new_ones(len(text_mask), 1)
        image = text_mask.new_ones(len(text_mask), num_image)
        text_image = torch.cat([one, text_mask, one, image], dim=1)[:, :-1]
        image_text = torch.cat([one, image, one, text_mask], dim=1)[:, :-1]
        return torch.where(text_first[:, None], text_image, image_text)

    def text_logits(self, h: Tensor) -> Tensor:
        """Logits over the ``total_vocab`` ids: the transposed embedding table, or untied."""
        if self.text_out is not None:
            return self.text_out(h)
        return h @ self.text_embed.weight[: self.config.total_vocab].T.to(h.dtype)

    # -- training -----------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        text: Tensor,
        text_loss: Tensor,
        text_first: Tensor,
        drop: Tensor | None = None,
        *,
        text_mask: Tensor | None = None,
        generator: rng.Generator = None,
    ) -> dict[str, Tensor]:
        """Per-example losses of dequantized ``images [B, C, H, W]`` and ``text [B, L]``.

        ``image_bits``: JetFormer's image NLL in bits per pixel-dim (text-first examples);
        ``text_nll``: mean cross-entropy (nats) over the ``text_loss`` tokens (image-first).
        ``text_mask [B, L]`` hides pads from attention and positions (None: every text
        position is visible, the plain causal path).
        Image-first examples see Jet's tokens with the gradient stopped (the flow is not
        trained to caption). In training mode text-first soft tokens get ``input_noise_std``
        noise from ``generator`` (the decoder sees and scores the noisy tokens, as the
        reference).
        """
        cfg = self.config
        tokens, logdet = self.jet(images)
        kept, rest = split_tokens(tokens, cfg.keep)
        if self.training and cfg.input_noise_std > 0:
            noisy = add_input_noise(kept, cfg.input_noise_std, generator=generator)
            kept = torch.where(text_first[:, None, None], noisy, kept)
        kept = torch.where(text_first[:, None, None], kept, kept.detach())
        mask = None
        if text_mask is not None:
            mask = self.sequence_mask(text_mask, kept.shape[1], text_first, drop)
        h = self.decoder(self.embed_sequence(text, kept, text_first, drop), mask=mask)
        n, p = kept.shape[1], cfg.prefix_len
        h_image = torch.where(text_first[:, None, None], h[:, p + 1 : p + 1 + n], h[:, :n])
        gmm_nll = self.head.nll(h_image, kept)
        image_bits = image_bits_per_dim(gmm_nll, rest, logdet, cfg.jet_config.num_dims)
        h_text = torch.where(
            text_first[:, None, None], h[:, : cfg.text_len], h[:, n + 1 : n + 1 + cfg.text_len]
        )
        logits = self.text_logits(h_text).float()
        token_nll = F.cross_entropy(logits.transpose(1, 2), text, reduction="none")
        weights = text_loss.float()
        text_nll = (token_nll * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return {"image_bits": image_bits, "text_nll": text_nll}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: total, Jet, decoder blocks, GMM head and embeddings."""
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {
        "total": count(model),
        "jet": count(model.jet),
        "decoder": count(model.decoder),
        "gmm_head": count(model.head),
        "embeddings": sum(count(m) for m in (model.text_embed, model.image_embed))
        + (count(model.text_out) if model.text_out is not None else 0),
    }


def meta_parameter_counts(config: JetFormerConfig) -> dict[str, int]:
    """:func:`count_parameters` of a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        return count_parameters(JetFormer(config))


__all__ = [
    "Decoder",
    "JetFormer",
    "JetFormerConfig",
    "RMSNorm",
    "count_parameters",
    "meta_parameter_counts",
    "rope",
]
