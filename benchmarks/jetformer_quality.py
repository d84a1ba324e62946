"""The JetFormer example's results: train a CPU preset, then measure it; writes JSON.

One script makes every number of the example README's results table: it trains the preset
with the example's own command (``python -m examples.jetformer train``), then measures the
run in the same process with ``benchmarks/jetformer_measure.py`` (held-out bits/dim,
conditioning consistency without and with guidance judged by models that are not the
JetFormer's own code path, captioning accuracy, sampling speed) and writes the two, the
settings they need (threads, seed, steps) and the load averages.

The numbers depend on the seed and the number of intra-op threads (summation order) and on
nothing else; the wall time needs an otherwise idle machine.

    python benchmarks/jetformer_quality.py --preset cpu-tiny \
        --out examples/jetformer/results/cpu-tiny.json
    python benchmarks/jetformer_quality.py --preset cpu-tiny-text \
        --out examples/jetformer/results/cpu-tiny-text.json
    python benchmarks/jetformer_quality.py --smoke --out /tmp/q.json  # 2 steps of 8x8 digits
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from jetformer_measure import measure
from throughput import parse_args, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.jetformer.__main__ import build_parser  # noqa: E402


def run(argv: list[str]) -> dict:
    """One sub-command of the example (here ``train``), in this process; its result dict."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="as train --set")
    parser.add_argument("--per-prompt", type=int, default=50, help="samples per class")
    parser.add_argument("--scenes", type=int, default=200, help="prompts / captioned scenes")
    parser.add_argument("--run-dir", default=None, help="a new folder to keep the run in")
    smoke = dict(preset="cpu-tiny-digits", steps=2, per_prompt=2, scenes=4)
    args = parse_args(parser, "examples/jetformer/results/{preset}.json", smoke, argv)
    args.out = args.out.format(preset=args.preset)
    torch.set_num_threads(args.threads)

    if args.run_dir and Path(args.run_dir).exists():
        parser.error(f"--run-dir {args.run_dir} exists; give a new folder")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="jetformer-quality-"))
    common = ["--seed", str(args.seed)]
    train = ["train", "--preset", args.preset, "--out", str(run_dir), "--no-progress", *common]
    if args.steps is not None:
        train += ["--steps", str(args.steps)]
    for setting in args.set:
        train += ["--set", setting]
    load_before = os.getloadavg()
    start = time.perf_counter()
    trained = run(train)
    wall = time.perf_counter() - start
    measured = measure(run_dir, per_prompt=args.per_prompt, scenes=args.scenes, seed=args.seed)
    if not args.run_dir:
        shutil.rmtree(run_dir)
    write_report(
        args.out,
        {
            "benchmark": "jetformer_quality",
            "settings": {**vars(args), "torch_threads": torch.get_num_threads()},
            "train": trained,
            "train_wall_s_including_evaluation": round(wall, 1),
            "load_average_before": load_before,
            "measure": {k: v for k, v in measured.items() if k != "run"},
        },
    )


if __name__ == "__main__":
    main()
