"""Held-out bits/dim after 2.5, 5 and 10 minutes (or any budgets) of CPU training; writes JSON.

The protocol: mnist5k's seeded 4,500 / 500 split (or ``--data photo-patches``), one process,
bits/dim over the real pixels of the held-out images, the model a Jet or a multi-scale
flow preset (``--preset mnist``, ``--preset mnist-multiscale``, ...).

The learning-rate schedule is the recipe's warm-up + cosine over *training time* rather
than steps: after ``t`` seconds of the largest budget ``T`` the factor is the step
schedule's at ``t / T``, so the run anneals exactly at the last budget whatever the speed
(the earlier budgets are read off the same run, before its annealing). Evaluation time is
not counted; with ``--compile`` the compilation in the first steps is. Run it on an idle
machine: the load average before and after is recorded.

    python benchmarks/bpd_vs_time.py --preset mnist --out benchmarks/results/bpd_vs_time.json
    python benchmarks/bpd_vs_time.py --preset mnist-multiscale --lr 1e-3 --minutes 30 \
        --samples benchmarks/results/samples_multiscale_30min.png --out ...
    python benchmarks/bpd_vs_time.py --smoke --out /tmp/bpd.json  # 2 couplings, 0.6 + 1.2 s
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from throughput import parse_args, write_report

from jetblocks import JetConfig, to_uint8
from jetblocks.integrations.images import save_grid
from jetblocks.integrations.torchdata import image_loader, open_source
from jetblocks.multiscale import MULTISCALE_PRESETS, MultiScaleConfig
from jetblocks.pretrained import model_class
from jetblocks.train import BitsPerDimTask, TrainConfig, Trainer, reference_schedule, warmup_cosine

RESOLUTION = 1_000_000  # schedule steps per budget


def preset_config(args: argparse.Namespace) -> JetConfig | MultiScaleConfig:
    """``args.preset``, with ``args.depth`` couplings (per scale, for a multi-scale flow)."""
    if args.preset in MULTISCALE_PRESETS:
        depth = {"couplings_per_scale": args.depth} if args.depth else {}
        return MultiScaleConfig.preset(args.preset, **depth)
    depth = {"depth": args.depth} if args.depth else {}
    return JetConfig.preset(args.preset, **depth)


def mnist_trainer(
    model_config: JetConfig | MultiScaleConfig,
    config: TrainConfig,
    out_dir: str,
    data="mnist5k",
    schedule=reference_schedule,
) -> Trainer:
    """A seeded trainer on ``data`` (mnist5k: 4,500 digits, evaluated on the other 500)."""
    torch.manual_seed(0)
    train, test = open_source(data, "train"), open_source(data, "test")
    return Trainer(
        model_class(model_config.to_dict())(model_config),
        BitsPerDimTask(),
        config,
        model_config=model_config.to_dict(),
        train_loader=image_loader(train, config.batch_size, seed=0),
        eval_batches=lambda: image_loader(
            test, 250, seed=0, shuffle=False, drop_last=False, epochs=1
        ),
        out_dir=out_dir,
        schedule=schedule,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--data", default="mnist5k", help="mnist5k or photo-patches")
    parser.add_argument("--samples", help="write a PNG grid of 4 x 8 samples (T = 0.8) here")
    parser.add_argument("--depth", type=int, help="couplings (default: the preset's)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 10.0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (counted in time)")
    smoke = dict(depth=2, minutes=[0.01, 0.02], batch_size=16)
    args = parse_args(parser, "benchmarks/results/bpd_vs_time.json", smoke)

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
    trained = 0.0  # seconds of training so far: the schedule runs on time, not steps

    def by_time(config: TrainConfig):
        factor = warmup_cosine(RESOLUTION, config.warmup_fraction)
        return lambda _: factor(int(RESOLUTION * trained / budgets[-1]))

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = mnist_trainer(preset_config(args), config, out_dir, args.data, by_time)
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
        if args.samples:
            write_samples(trainer.model, args.samples)

    write_report(
        args.out,
        {
            "benchmark": "bpd_vs_time",
            "preset": args.preset,
            "data": args.data,
            "samples": args.samples,
            "config": preset_config(args).to_dict(),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "bf16": args.bf16,
            "compile": args.compile,
            "load_average_before": load_before,
            "initial_bits_per_dim": initial,
            "results": results,
        },
    )


@torch.no_grad()
def write_samples(model: torch.nn.Module, path: str) -> None:
    """32 samples at temperature 0.8 from a fixed seed, 8 per row."""
    model.eval()
    images = model.sample(32, 0.8, generator=torch.Generator().manual_seed(0))
    print(f"wrote {save_grid(to_uint8(images), path, ncols=8)}")


if __name__ == "__main__":
    main()
