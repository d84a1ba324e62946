"""Jet as the image tokenizer of your own autoregressive transformer, trained end to end.

Jet turns a digit into 49 soft tokens of 16 dims; the first ``--keep`` dims of each token go
to a plain ``nn.TransformerEncoder`` with a causal mask and a ``GMMHead``, the rest get a
standard-normal prior. Both models train jointly on JetFormer's image NLL (bits per
pixel-dim, ``jetblocks.image_bits_per_dim``) of images under the noise curriculum
(``jetblocks.NoiseCurriculum``); sampling runs the transformer token by token, draws the
factored dims from N(0, 1) and decodes with Jet's exact inverse.

    python examples/jet_as_tokenizer.py --steps 300 --threads 2 --out runs/tokenizer

Its numbers depend on the seed and on the number of threads (summation order), not on
anything else: ``summary.json`` records both with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from jetblocks import (
    GMMHead,
    Jet,
    JetConfig,
    Linear,
    NoiseCurriculum,
    image_bits_per_dim,
    split_tokens,
)
from jetblocks.autoregressive import (
    causal_mask,
    decode_soft_tokens,
    sample_soft_tokens,
    soft_token_nll,
)
from jetblocks.checkpoint import atomic_file
from jetblocks.integrations.builtin import mnist5k
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import dequantize, to_uint8


class CausalTransformer(nn.Module):
    """A decoder as ``jetblocks.autoregressive`` wants it: ``[B, T, W] -> [B, T, W]``, causal."""

    def __init__(self, keep: int, num_tokens: int, width=64, depth=2, heads=4, mixtures=8):
        super().__init__()
        self.embed = Linear(keep, width)
        self.start = nn.Parameter(torch.zeros(1, width))  # the BOS prefix
        self.position = nn.Parameter(0.02 * torch.randn(1, num_tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, 0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = GMMHead(width, mixtures, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(x.shape[1], device=x.device).logical_not()  # True: masked out
        return self.body(x + self.position[:, : x.shape[1]], mask=mask, is_causal=True)

    def prefix(self, batch: int) -> torch.Tensor:
        return self.start.expand(batch, 1, -1)


def joint_bits_per_dim(jet, model, images, keep):
    """JetFormer's loss: GMM NLL of the kept dims + N(0, 1) on the rest - Jet's log-det."""
    tokens, logdet = jet(images)
    kept, rest = split_tokens(tokens, keep)
    gmm_nll = soft_token_nll(model, model.head, model.embed, kept, model.prefix(len(kept)))
    return image_bits_per_dim(gmm_nll, rest, logdet, num_dims=images[0].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=int, default=4, help="dims per token given to the AR model")
    parser.add_argument("--held-out", type=int, default=200, help="test images to evaluate")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default="runs/tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2, help="intra-op threads: the numbers depend on it"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)  # float sums split differently per thread count
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
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
    after, seconds = held_out(), time.perf_counter() - start
    print(f"held-out bits/dim after {args.steps} steps: {after:.4f} (before: {before:.4f})")

    with torch.no_grad():  # token by token (recomputing: nn.TransformerEncoder has no cache)
        kept = sample_soft_tokens(
            model, model.head, model.embed, model.prefix(args.samples), jet.config.num_tokens,
            temperature=0.8, use_cache=False, generator=generator,
        )  # fmt: skip
        images = decode_soft_tokens(jet, kept, generator=generator)
    print(f"samples: {save_grid(to_uint8(images), f'{args.out}/samples.png', ncols=8)}")
    summary = dict(vars(args), held_out_bits_per_dim_before=before,
                   held_out_bits_per_dim=after, train_seconds=round(seconds, 1),
                   load_average=[round(x, 2) for x in os.getloadavg()])  # fmt: skip
    with atomic_file(Path(args.out, "summary.json")) as staging:
        staging.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
