"""Peak memory of a Jet training step versus depth, per backprop mode; writes JSON.

For each depth (8, 16, 32 couplings; the other settings from ``--config``, by default
configuration A of ``benchmarks/throughput.py``: 32x32x3 images, patch 4, width 128, 4
heads, batch 32) and each ``JetConfig.backprop`` (``standard``, ``checkpoint``,
``invertible``) it runs one training step (forward, bits/dim, backward, gradient clipping,
the reference AdamW step, ``zero_grad(set_to_none=True)``) after a warm-up step, and reports

- ``step_peak_mb``: the most memory the step had allocated at any moment *above* what was
  allocated when it began (parameters and optimizer state). On the CPU this is read from
  the allocator itself: ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free of PyTorch's CPU allocator with its size, and the peak is the largest
  running sum of those sizes over the step (buffers that oneDNN or MKL allocate internally
  are not PyTorch allocations and are not seen). On a GPU it is
  ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` before.
- ``gradients_mb``: the parameters' gradients, which every mode must hold at the end of
  the backward pass (they grow with depth), and ``step_peak_minus_gradients_mb``: the rest
  of the step peak, mostly activations;
- ``resident_mb``: parameters + optimizer state, and ``peak_mb`` = resident + step peak;
- ``step_ms``: the median time of the step (timed separately, without the profiler).

The ratios printed at the end are depth 32 over depth 8 for each mode (target for
``invertible``: at most 1.3 on the step peak), and each mode's step time over standard's.

    python benchmarks/memory.py
    python benchmarks/memory.py --config B --batch-size 16 --depths 8 16
    python benchmarks/memory.py --smoke --out /tmp/memory.json   # seconds: a tiny Jet, depths 2, 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import config_named, parse_args, setup, time_calls, training_step, write_report

MODES = ("standard", "checkpoint", "invertible")
MB = 2**20


def cpu_step_peak(step) -> int:
    """Peak bytes the CPU allocator held during ``step()`` above what it held before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # a stable sort keeps ties in order
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure(config, batch: int, device: str, seconds: float) -> dict[str, float]:
    jet, optimizer, images = setup(config, batch, device)
    step = training_step(jet, optimizer, images)
    step()  # creates the optimizer state
    tensors = [*jet.parameters(), *jet.buffers()]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = sum(t.numel() * t.element_size() for t in tensors)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - before
    else:
        step_peak = cpu_step_peak(step)
    times = time_calls(step, seconds, warmup=0)
    params = sum(p.numel() for p in jet.parameters())
    gradients = sum(p.numel() * p.element_size() for p in jet.parameters() if p.requires_grad)
    return {
        "parameters": params,
        "resident_mb": resident / MB,
        "step_peak_mb": step_peak / MB,
        "gradients_mb": gradients / MB,
        "step_peak_minus_gradients_mb": (step_peak - gradients) / MB,
        "peak_mb": (resident + step_peak) / MB,
        "step_ms": 1e3 * statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="A")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    smoke = dict(config="smoke", batch_size=4, depths=[2, 4], seconds=0.05)
    args = parse_args(parser, "benchmarks/results/memory.json", smoke)

    load_before = os.getloadavg()
    results = []
    for depth in args.depths:
        for mode in args.modes:
            config = config_named(args.config, depth=depth, backprop=mode)
            row = {"depth": depth, "backprop": mode, "load_1min": os.getloadavg()[0]}
            row |= measure(config, args.batch_size, args.device, args.seconds)
            results.append(row)
            print(
                f"depth {depth:3d} {mode:>10}: step peak {row['step_peak_mb']:8.1f} MB, "
                f"resident {row['resident_mb']:7.1f} MB, step {row['step_ms']:7.1f} ms, "
                f"load {row['load_1min']:.1f}",
                flush=True,
            )
    by = {(r["depth"], r["backprop"]): r for r in results}
    low, high = min(args.depths), max(args.depths)
    summary = {}
    for mode in args.modes:
        entry = {}
        if (low, mode) in by and (high, mode) in by:
            for key in ("step_peak_mb", "step_peak_minus_gradients_mb", "peak_mb"):
                entry[f"{key}_ratio_{high}_over_{low}"] = by[high, mode][key] / by[low, mode][key]
        if mode != "standard":
            entry["step_time_over_standard"] = {
                depth: by[depth, mode]["step_ms"] / by[depth, "standard"]["step_ms"]
                for depth in args.depths
                if (depth, "standard") in by and (depth, mode) in by
            }
        summary[mode] = entry
        print(f"{mode:>10}: {entry}")
    report = {
        "benchmark": "memory",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "config": dataclasses.asdict(config_named(args.config)),
        "method": "CPU: torch.profiler(profile_memory=True) allocator events, peak of the "
        "running sum of allocation sizes over one training step, above the memory held "
        "before it; GPU: torch.cuda.max_memory_allocated() - memory_allocated() before",
        "load_average_before": load_before,
        "results": results,
        "summary": summary,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
