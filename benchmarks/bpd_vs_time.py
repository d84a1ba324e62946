"""Held-out bits/dim on mnist5k after 2.5, 5 and 10 minutes of CPU training; writes JSON.

The learning-rate schedule is the recipe's warm-up + cosine over *training time* rather
than steps: after ``t`` seconds of the largest budget ``T`` the factor is the step
schedule's at ``t / T``, so the run anneals exactly at the last budget whatever the speed
(the earlier budgets are read off the same run, before its annealing). Evaluation time is
not counted; with ``--compile`` the compilation in the first steps is. Run it on an idle
machine: the load average before and after is recorded.

    python benchmarks/bpd_vs_time.py --preset mnist --out benchmarks/results/bpd_vs_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from throughput import machine

from jetblocks import Jet, JetConfig
from jetblocks.checkpoint import atomic_file
from jetblocks.integrations.torchdata import image_loader, open_source
from jetblocks.train import JetTask, TrainConfig, Trainer, warmup_cosine

RESOLUTION = 1_000_000  # schedule steps per budget


def mnist_trainer(preset: str, config: TrainConfig, out_dir: str) -> Trainer:
    """A seeded trainer of ``preset`` on mnist5k's 4,500 digits, evaluated on the other 500."""
    torch.manual_seed(0)
    jet_config = JetConfig.preset(preset)
    train, test = open_source("mnist5k", "train"), open_source("mnist5k", "test")
    return Trainer(
        Jet(jet_config),
        JetTask(),
        config,
        model_config=jet_config.to_dict(),
        train_loader=image_loader(train, config.batch_size, seed=0),
        eval_batches=lambda: image_loader(
            test, 250, seed=0, shuffle=False, drop_last=False, epochs=1
        ),
        out_dir=out_dir,
    )


def write_report(path: str, report: dict) -> None:
    """``report`` with the machine's description, written atomically as JSON."""
    report = {**report, "machine": machine(), "load_average_after": os.getloadavg()}
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 10.0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (counted in time)")
    parser.add_argument("--out", default="benchmarks/results/bpd_vs_time.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    budgets = sorted(60 * m for m in args.minutes)
    config = TrainConfig(
        steps=RESOLUTION,
        batch_size=args.batch_size,
        lr=args.lr,
        bf16=args.bf16,
        compile=args.compile,
        progress=False,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = mnist_trainer(args.preset, config, out_dir)
        trained = 0.0
        by_time = warmup_cosine(RESOLUTION, config.warmup_fraction)
        trainer.scheduler.lr_lambdas[0] = lambda _: by_time(int(RESOLUTION * trained / budgets[-1]))
        batches, results = iter(trainer.train_loader), []
        initial = trainer.evaluate()["bits_per_dim"]
        for budget in budgets:
            while trained < budget:
                started = time.perf_counter()
                trainer.train_step(batches)
                trained += time.perf_counter() - started
            bpd = trainer.evaluate()["bits_per_dim"]
            results.append({"minutes": budget / 60, "steps": trainer.step, "bits_per_dim": bpd})
            print(json.dumps(results[-1]), flush=True)

    write_report(
        args.out,
        {
            "benchmark": "bpd_vs_time",
            "preset": args.preset,
            "config": JetConfig.preset(args.preset).to_dict(),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "bf16": args.bf16,
            "compile": args.compile,
            "load_average_before": load_before,
            "initial_bits_per_dim": initial,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
