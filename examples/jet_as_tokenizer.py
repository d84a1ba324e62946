"""Jet as the image tokenizer of your own autoregressive transformer, trained end to end.

Jet turns a digit into 49 soft tokens of 16 dims; the first ``--keep`` dims of each token go
to a plain ``nn.TransformerEncoder`` with a causal mask and a ``GMMHead``, the rest get a
standard-normal prior. Both models train jointly on JetFormer's image NLL (bits per
pixel-dim, ``jetblocks.image_bits_per_dim``) of images under the noise curriculum
(``jetblocks.NoiseCurriculum``); sampling runs the transformer token by token, draws the
factored dims from N(0, 1) and decodes with Jet's exact inverse.

    python examples/jet_as_tokenizer.py --steps 300 --out runs/tokenizer
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from jetblocks import (
    GMMHead,
    Jet,
    JetConfig,
    NoiseCurriculum,
    image_bits_per_dim,
    merge_tokens,
    rng,
    split_tokens,
)
from jetblocks.integrations.builtin import mnist5k
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import dequantize, to_uint8


class CausalTransformer(nn.Module):
    """Predicts token ``i`` from tokens ``< i``: a learned start token, then a causal encoder."""

    def __init__(self, keep: int, num_tokens: int, width=64, depth=2, heads=4, mixtures=8):
        super().__init__()
        self.embed = nn.Linear(keep, width)
        self.start = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, num_tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, 0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = GMMHead(width, mixtures, keep)

    def hidden(self, kept: torch.Tensor) -> torch.Tensor:
        """``[B, n, keep] -> [B, n, width]``; position ``i`` sees ``kept[:, :i]`` only."""
        start = self.start.expand(len(kept), 1, -1)
        x = torch.cat([start, self.embed(kept[:, :-1])], dim=1) + self.position[:, : kept.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.body(x, mask=mask, is_causal=True)

    @torch.no_grad()
    def sample(self, n: int, num_tokens: int, temperature: float, *, generator) -> torch.Tensor:
        kept = torch.zeros(n, 0, self.head.dim)
        for _ in range(num_tokens):  # no KV cache: recompute the prefix every step
            h = self.hidden(torch.cat([kept, kept.new_zeros(n, 1, self.head.dim)], dim=1))
            token = self.head.sample(h[:, -1:], temperature, generator=generator)
            kept = torch.cat([kept, token], dim=1)
        return kept


def joint_bits_per_dim(jet, model, images, keep):
    """JetFormer's loss: GMM NLL of the kept dims + N(0, 1) on the rest - Jet's log-det."""
    tokens, logdet = jet(images)
    kept, rest = split_tokens(tokens, keep)
    gmm_nll = model.head.nll(model.hidden(kept), kept)  # [B, N]
    return image_bits_per_dim(gmm_nll, rest, logdet, num_dims=images[0].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=int, default=4, help="dims per token given to the AR model")
    parser.add_argument("--held-out", type=int, default=200, help="test images to evaluate")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default="runs/tokenizer")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train, test = mnist5k("train")[0], mnist5k("test")[0][: args.held_out]
    jet = Jet(JetConfig.preset("mnist"))  # 32 couplings: each can expand a dim at most 2x
    model = CausalTransformer(args.keep, jet.config.num_tokens)
    params = [*jet.parameters(), *model.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.95))

    def held_out() -> float:
        with torch.no_grad():
            images = dequantize(test, generator=torch.Generator().manual_seed(1))
            return joint_bits_per_dim(jet, model, images, args.keep).mean().item()

    before = held_out()
    curriculum = NoiseCurriculum(sigma_start=64, sigma_end=0, total_steps=args.steps)
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        # rounded curriculum noise (bins' left edges, may leave [-1, 1]), then dequantized
        images = dequantize(curriculum(batch, step, generator=generator), generator=generator)
        loss = joint_bits_per_dim(jet, model, images, args.keep).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  train bits/dim {loss.item():.4f}")
    print(f"held-out bits/dim after {args.steps} steps: {held_out():.4f} (before: {before:.4f})")

    kept = model.sample(args.samples, jet.config.num_tokens, 0.8, generator=generator)
    shape = (args.samples, kept.shape[1], jet.config.token_dim - args.keep)
    rest = rng.randn(shape, generator=generator, like=kept)
    with torch.no_grad():
        images = jet.decode(merge_tokens(kept, rest))
    print(f"samples: {save_grid(to_uint8(images), f'{args.out}/samples.png', ncols=8)}")


if __name__ == "__main__":
    main()
