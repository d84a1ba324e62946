"""Held-out bits/dim on mnist5k after the same training steps in fp32 and in bf16; writes JSON.

Both runs start from the same initial weights, see the same batches and the same
dequantization noise, and follow the recipe's step schedule; only the precision differs
(``TrainConfig.bf16``: autocast, with the couplings' affine update, scale and log-det in
float32). Evaluation is in float32 for both, so the difference is what training in bf16
did to the model. Wall time per run is recorded; run it on an idle machine.

    python benchmarks/bf16_vs_fp32.py --steps 600 --out benchmarks/results/bf16_vs_fp32.json
    python benchmarks/bf16_vs_fp32.py --smoke --out /tmp/bf16.json  # seconds: 2 couplings, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bpd_vs_time import mnist_trainer, preset_config
from throughput import parse_args, write_report

from jetblocks.train import TrainConfig


def train_and_evaluate(bf16: bool, args: argparse.Namespace) -> dict:
    """Train ``args.preset`` for ``args.steps`` from seed 0; held-out bits/dim and wall time."""
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, bf16=bf16, progress=False
    )
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = mnist_trainer(preset_config(args), config, out_dir)
        batches, started = iter(trainer.train_loader), time.perf_counter()
        losses = [float(trainer.train_step(batches)) for _ in range(args.steps)]
        seconds = time.perf_counter() - started
        trainer.config = trainer.config.replace(bf16=False)  # evaluate both in float32
        bpd = trainer.evaluate()["bits_per_dim"]
    return {
        "precision": "bf16" if bf16 else "fp32",
        "held_out_bits_per_dim": bpd,
        "train_loss_last_20_steps": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": seconds,
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--depth", type=int, help="couplings (default: the preset's)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    smoke = dict(depth=2, steps=3, batch_size=16)
    args = parse_args(parser, "benchmarks/results/bf16_vs_fp32.json", smoke)

    load_before = os.getloadavg()
    runs = []
    for bf16 in (False, True):
        runs.append(train_and_evaluate(bf16, args))
        print(json.dumps(runs[-1]), flush=True)
    gap = runs[1]["held_out_bits_per_dim"] - runs[0]["held_out_bits_per_dim"]
    print(f"bf16 - fp32 held-out bits/dim: {gap:+.4f}")
    write_report(
        args.out,
        {
            "benchmark": "bf16_vs_fp32",
            "preset": args.preset,
            "config": preset_config(args).to_dict(),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "load_average_before": load_before,
            "runs": runs,
            "bf16_minus_fp32_bits_per_dim": gap,
        },
    )


if __name__ == "__main__":
    main()
