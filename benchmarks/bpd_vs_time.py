"""Held-out bits/dim on mnist5k after 2.5, 5 and 10 minutes of CPU training; writes JSON.

The number of steps that fit the largest budget is estimated from the first steps' speed,
so the cosine schedule ends near the last budget. Evaluation time is not counted. Run it
on an idle machine:

    python benchmarks/bpd_vs_time.py --preset mnist --out benchmarks/results/bpd_vs_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from jetblocks import Jet, JetConfig
from jetblocks.checkpoint import atomic_file
from jetblocks.integrations.torchdata import image_loader, open_source
from jetblocks.train import JetTask, TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 10.0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr", type=float, default=None, help="default: TrainConfig for the preset"
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/bpd_vs_time.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    jet_config = JetConfig.preset(args.preset)
    budgets = sorted(60 * m for m in args.minutes)
    train, test = open_source("mnist5k", "train"), open_source("mnist5k", "test")

    def trainer_for(steps: int, out: str) -> Trainer:
        config = TrainConfig(
            steps=steps,
            batch_size=args.batch_size,
            bf16=args.bf16,
            progress=False,
            **({"lr": args.lr} if args.lr else {}),
        )
        return Trainer(
            Jet(jet_config),
            JetTask(),
            config,
            model_config=jet_config.to_dict(),
            train_loader=image_loader(train, args.batch_size, seed=0),
            eval_batches=lambda: image_loader(
                test, 250, seed=0, shuffle=False, drop_last=False, epochs=1
            ),
            out_dir=out,
        )

    probe = trainer_for(10**6, "/tmp/jetblocks-probe")
    batches = iter(probe.train_loader)
    probe.train_step(batches)  # warm-up
    start = time.perf_counter()
    for _ in range(args.probe_steps):
        probe.train_step(batches)
    seconds_per_step = (time.perf_counter() - start) / args.probe_steps
    total_steps = int(budgets[-1] / seconds_per_step)

    trainer = trainer_for(total_steps, "/tmp/jetblocks-bpd-vs-time")
    batches, trained, results = iter(trainer.train_loader), 0.0, []
    initial = trainer.evaluate()["bits_per_dim"]
    for budget in budgets:
        while trained < budget and trainer.step < total_steps:
            started = time.perf_counter()
            trainer.train_step(batches)
            trained += time.perf_counter() - started
        bpd = trainer.evaluate()["bits_per_dim"]
        results.append({"minutes": budget / 60, "steps": trainer.step, "bits_per_dim": bpd})
        print(json.dumps(results[-1]), flush=True)

    report = {
        "benchmark": "bpd_vs_time",
        "preset": args.preset,
        "config": jet_config.to_dict(),
        "batch_size": args.batch_size,
        "lr": trainer.config.lr,
        "bf16": args.bf16,
        "planned_steps": total_steps,
        "seconds_per_step": seconds_per_step,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "initial_bits_per_dim": initial,
        "results": results,
    }
    with atomic_file(args.out) as staging:
        staging.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
