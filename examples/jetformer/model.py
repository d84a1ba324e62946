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

from jetblocks import GMMHead, Jet, JetConfig, image_bits_per_dim, split_tokens

NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class JetFormerConfig:
    """Architecture of a :class:`JetFormer`; ``jet`` holds a ``JetConfig`` as a dict."""

    jet: dict[str, Any]
    keep: int  # dims per token modelled by the transformer; the rest get N(0, 1)
    width: int = 128
    depth: int = 2
    mlp_dim: int = 512
    num_heads: int = 4
    num_kv_heads: int = 1  # 1: multi-query attention
    head_dim: int = 32
    num_mixtures: int = 16
    vocab_size: int = 10  # classes or sentencepiece pieces; BOS, BOI and NOLABEL follow
    text_len: int = 1
    num_vocab_repeats: int = 1
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "jet", JetConfig.from_dict(dict(self.jet)).to_dict())
        if not 0 < self.keep <= self.jet_config.token_dim:
            raise ValueError(f"keep must be in [1, {self.jet_config.token_dim}], got {self.keep}")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads; head_dim even")

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
    def prefix_len(self) -> int:
        """Text tokens as the decoder sees them: ``text_len * num_vocab_repeats``."""
        return self.text_len * self.num_vocab_repeats

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JetFormerConfig:
        return cls(**values)


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
    """Rotary position embedding of ``x [B, H, T, d]`` at ``positions [T]`` (halves rotated)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freq  # [T, half]
    sin, cos = angles.sin().to(x.dtype), angles.cos().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for up to ``max_len`` tokens per sequence.

    Storage is allocated on the first update, with that update's dtype and device (so it
    follows autocast).
    """

    def __init__(self, depth: int, max_len: int) -> None:
        self.depth, self.max_len = depth, max_len
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0  # tokens stored (the same for every layer once a step is done)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, KV, T, d]`` after the cached ones; return all of them."""
        if self.keys is None:
            shape = (self.depth, k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} tokens is full")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


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

    def forward(self, x: Tensor, positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        q = self.query(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.key_value(x).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        new = x.shape[1]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if new == k.shape[2]:  # the whole sequence: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new tokens after cached ones: each sees the cache and the new ones before it
            offset = k.shape[2] - new
            mask = torch.ones(new, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
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
    """``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.width), Attention(config)
        self.mlp_norm, self.mlp = RMSNorm(config.width), GatedMLP(config.width, config.mlp_dim)

    def forward(self, x: Tensor, positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Embedded tokens ``[B, T, width]`` -> final-normed hidden states ``[B, T, width]``."""

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = RMSNorm(config.width)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_norm(x)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config.depth, max_len)


class JetFormer(nn.Module):
    """Jet + decoder + GMM head; :meth:`forward` returns the per-example losses."""

    def __init__(self, config: JetFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.jet = Jet(config.jet_config)
        self.text_embed = nn.Embedding(config.total_vocab * config.num_vocab_repeats, config.width)
        nn.init.normal_(self.text_embed.weight, std=1.0)
        self.image_embed = nn.Linear(config.keep, config.width)
        self.decoder = Decoder(config)
        self.head = GMMHead(config.width, config.num_mixtures, config.keep)

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

    def text_logits(self, h: Tensor) -> Tensor:
        """Logits over the ``total_vocab`` ids from the transposed embedding table."""
        return h @ self.text_embed.weight[: self.config.total_vocab].T.to(h.dtype)

    # -- training -----------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        text: Tensor,
        text_mask: Tensor,
        text_first: Tensor,
        drop: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses of dequantized ``images [B, C, H, W]`` and ``text [B, L]``.

        ``image_bits``: JetFormer's image NLL in bits per pixel-dim (text-first examples);
        ``text_nll``: mean cross-entropy (nats) over ``text_mask`` tokens (image-first).
        Image-first examples see Jet's tokens with the gradient stopped (the flow is not
        trained to caption).
        """
        cfg = self.config
        tokens, logdet = self.jet(images)
        kept, rest = split_tokens(tokens, cfg.keep)
        kept = torch.where(text_first[:, None, None], kept, kept.detach())
        h = self.decoder(self.embed_sequence(text, kept, text_first, drop))
        n, p = kept.shape[1], cfg.prefix_len
        h_image = torch.where(text_first[:, None, None], h[:, p + 1 : p + 1 + n], h[:, :n])
        gmm_nll = self.head.nll(h_image, kept)
        image_bits = image_bits_per_dim(gmm_nll, rest, logdet, cfg.jet_config.num_dims)
        h_text = torch.where(
            text_first[:, None, None], h[:, : cfg.text_len], h[:, n + 1 : n + 1 + cfg.text_len]
        )
        logits = self.text_logits(h_text).float()
        token_nll = F.cross_entropy(logits.transpose(1, 2), text, reduction="none")
        mask = text_mask.float()
        text_nll = (token_nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"image_bits": image_bits, "text_nll": text_nll}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: total, Jet, decoder blocks, GMM head and embeddings."""
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {
        "total": count(model),
        "jet": count(model.jet),
        "decoder": count(model.decoder),
        "gmm_head": count(model.head),
        "embeddings": count(model.text_embed) + count(model.image_embed),
    }


def meta_parameter_counts(config: JetFormerConfig) -> dict[str, int]:
    """:func:`count_parameters` of a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        return count_parameters(JetFormer(config))


__all__ = [
    "Decoder",
    "JetFormer",
    "JetFormerConfig",
    "KVCache",
    "RMSNorm",
    "count_parameters",
    "meta_parameter_counts",
    "rope",
]
