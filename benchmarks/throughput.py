"""Images per second of Jet's encode, decode and training step on this machine; writes JSON.

For each named configuration, batch size, precision (``fp32``, ``bf16`` autocast) and mode
(``eager``, ``compiled`` with ``torch.compile``, ``frozen``: inference compiled with
Inductor's freezing) it times

- ``encode``: the flow's forward ``jet(images)`` on float images, under ``torch.no_grad()``;
- ``decode``: ``jet.decode(tokens)`` (the inverse), under ``torch.no_grad()``;
- ``train``: one full training step: forward, bits/dim loss, backward, global-norm gradient
  clipping at 1.0 and the reference optimizer (``jetblocks.train.reference_optimizer``,
  AdamW), then ``zero_grad(set_to_none=True)``, as :class:`jetblocks.train.Trainer` does;
- ``optimizer``: that step's last part alone, the clipping and the AdamW update, on fixed
  gradients (not run by default; images/s here means steps/s times the batch).

Model FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager
float32 call of an identical model with the ``"math"`` attention backend (the counter does
not see SDPA's CPU kernels): matmuls and attention products, forward for encode/decode,
forward + backward for a training step (no recomputation, no optimizer). MFU is those
FLOPs over the median time, as a fraction of the machine's matmul peak, which this script
measures itself, fp32 and bf16 (the best of several large square products on ``torch.mm``
and, in fp32 on a CPU, on oneDNN, see :func:`matmul_peak`).

Named configurations: ``A`` and ``B`` (the reference measurements below, JAX 0.6.0 / Flax
0.10.6 on an idle 2-core machine of this kind, fp32), ``smoke`` (a tiny Jet for ``--smoke``)
and every ``JetConfig`` preset name.
Attention runs on the ``"auto"`` backend by default (on the CPU: SDPA for eager fp32, the
matmul path for bf16 and in a compiled training step); ``--attention-backends`` times each
backend it lists in turn (the row says which). ``--profile`` adds torch.profiler's top ops
of each timed call to the JSON;
``--optimizer foreach`` or ``fused`` runs the reference AdamW update with PyTorch's
multi-tensor loop or its fused kernel instead of the implementation ``reference_optimizer``
gets by default (a loop over the tensors on a CPU; the same maths, other rounding). Each row
records the 1-minute load average: on a shared machine, compare rows taken at low load.
OpenMP threads that spin while they wait (libgomp's default) make a 2-thread run 10x slower
or worse whenever another process holds one of the two cores; ``OMP_WAIT_POLICY=PASSIVE``
avoids that but made an idle machine's training step up to 1.5x slower, so the default is
kept (the value in effect is written to the JSON).
The first compiled run spends minutes compiling (Inductor caches the result on disk).
``--smoke`` checks in seconds that the script works: the ``smoke`` config at batch 4, bf16
(autocast), every op eager and compiled, with the ``aot_eager`` backend (Dynamo and
AOTAutograd trace the graphs Inductor would get, but run them eagerly; a cold Inductor
compile takes most of a minute even for the tiny model).

This module also holds what the other benchmarks share: the machine's description and
matmul peak, the timing loop, the model set-up and training step, the ``--smoke``/``--out``
arguments and the JSON report.

    python benchmarks/throughput.py                      # A and B, fp32 + bf16, eager + compiled
    python benchmarks/throughput.py --configs A --precisions bf16 --modes eager
    python benchmarks/throughput.py --smoke --out /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from jetblocks import Jet, JetConfig
from jetblocks.acceleration import accelerate_by_default
from jetblocks.checkpoint import atomic_file
from jetblocks.jet import PRESETS
from jetblocks.likelihood import bits_per_dim
from jetblocks.linear import onednn_linear
from jetblocks.multiscale import MULTISCALE_PRESETS, MultiScaleConfig
from jetblocks.pretrained import model_class
from jetblocks.testing import perturb_parameters_
from jetblocks.train import TrainConfig, reference_optimizer

_SIX = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv")
_FIVE_KINDS = ("channels", "channels", "channels", "channels", "spatial")
CONFIGS: dict[str, JetConfig] = {
    "A": JetConfig(image_size=(32, 32), channels=3, patch_size=4, depth=8, block_depth=1,
                   emb_dim=128, num_heads=4, kinds=_FIVE_KINDS, spatial_patterns=_SIX),
    "B": JetConfig(image_size=(32, 32), channels=3, patch_size=4, depth=16, block_depth=2,
                   emb_dim=256, num_heads=4, kinds=_FIVE_KINDS, spatial_patterns=_SIX),
    "smoke": JetConfig(image_size=(8, 8), channels=3, patch_size=2, depth=2, block_depth=1,
                       emb_dim=16, num_heads=2, kinds=("channels", "spatial")),
}  # fmt: skip
DEFAULT_BATCH = {"A": 32, "B": 32}
# Images/s of the authors' JAX reference at batch 32, fp32 (see the module docstring).
REFERENCE = {
    "A": {"encode": 1038.0, "decode": 1042.0, "train": 136.0},
    "B": {"encode": 98.0, "decode": 99.0, "train": 11.6},
}
TARGET_RATIO = {"encode": 1.0, "decode": 1.0, "train": 1.5}
OPS = ("encode", "decode", "train")  # timed by default; ALL_OPS adds "optimizer"
ALL_OPS = (*OPS, "optimizer")
OPTIMIZER_IMPLS = ("default", "foreach", "fused")
MODES = ("eager", "compiled", "frozen")


def config_named(name: str, **overrides) -> JetConfig | MultiScaleConfig:
    """Configuration ``A``, ``B``, a ``JetConfig`` preset or a ``MultiScaleConfig`` preset
    (whose ``depth`` is its couplings per scale), with overrides."""
    if name in CONFIGS:
        return dataclasses.replace(CONFIGS[name], **overrides)
    if name in PRESETS:
        return JetConfig.preset(name, **overrides)
    if name in MULTISCALE_PRESETS:
        if "depth" in overrides:
            overrides["couplings_per_scale"] = overrides.pop("depth")
        return MultiScaleConfig.preset(name, **overrides)
    known = [*CONFIGS, *PRESETS, *MULTISCALE_PRESETS]
    raise SystemExit(f"unknown config {name!r}; expected one of {known}")


# -- the command line and the report ------------------------------------------------------------
def parse_args(
    parser: argparse.ArgumentParser, out: str, smoke: dict[str, object], argv=None
) -> argparse.Namespace:
    """``parser``'s arguments plus ``--smoke`` and ``--out``.

    ``--smoke`` swaps in the defaults ``smoke`` (tiny settings that run in seconds, to check
    that the script works; flags given explicitly still win) and needs an ``--out`` of its
    own, so that it never overwrites a real result; ``out`` is the default otherwise.
    """
    parser.add_argument("--smoke", action="store_true", help="seconds-long check of the script")
    parser.add_argument("--out", help=f"the JSON report (default {out}; required with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        if args.out is None:
            parser.error("--smoke needs --out (smoke numbers do not belong in benchmarks/results)")
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    args.out = args.out or out
    return args


def write_report(path: str, report: dict) -> None:
    """``report`` with the machine's description and load average, written atomically as JSON."""
    report = {**report, "machine": machine(), "load_average_after": os.getloadavg()}
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


# -- the machine -------------------------------------------------------------------------------
def matmul_peak(
    dtype: torch.dtype, device: str, seconds: float = 1.0, sizes: list[int] | None = None
) -> dict[str, object]:
    """Best GFLOP/s of a matmul on ``device`` over square sizes (``2 n^3`` FLOPs each), by
    default 1024-3072 on a CPU and 4096-16384 on a GPU: the best of ``torch.mm`` and, for
    float32 on a CPU, of ``jetblocks.linear.onednn_linear`` (which MKL's ``torch.mm`` trails on
    AMD CPUs), so that MFU is measured against the fastest kernel either path could use."""
    sizes = sizes or ((1024, 2048, 3072) if device == "cpu" else (4096, 8192, 16384))
    kernels = {"torch.mm": torch.mm}
    if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        kernels["onednn"] = onednn_linear  # a @ b^T: the same FLOPs as a @ b
    best: dict[str, dict[str, float]] = {kernel: {} for kernel in kernels}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        for kernel, fn in kernels.items():
            times = time_calls(lambda fn=fn, a=a, b=b: fn(a, b), seconds, warmup=1)
            best[kernel][str(n)] = 2 * n**3 / min(times) / 1e9
        del a, b
    by_kernel = {kernel: max(rates.values()) for kernel, rates in best.items()}
    return {"gflops": max(by_kernel.values()), "by_kernel": by_kernel, "by_size": best}


def machine() -> dict[str, object]:
    """The CPU (with its family and model numbers, which tell CPU generations apart where the
    model name does not: AMD family 25 is Zen 3/4, 26 Zen 5), threads and library versions."""
    cpu, fields = platform.processor(), {}
    if os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cpu = fields.get("model name", cpu)
    return {
        "cpu": cpu,
        "cpu_family": fields.get("cpu family"),
        "cpu_model": fields.get("model"),
        "avx512f": "avx512f" in fields.get("flags", "").split(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# -- timing --------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], seconds: float, warmup: int = 2, min_runs: int = 3):
    """Seconds per call of ``fn``, called until ``seconds`` have passed (``min_runs`` at least)."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - begin)
    return times


def measure(fn: Callable[[], object], batch: int, seconds: float) -> dict[str, float]:
    """Images/s of ``fn`` on ``batch`` images: its first call (which compiles, when compiled)
    timed on its own, then :func:`time_calls` for ``seconds``."""
    started = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - started
    times = time_calls(fn, seconds, warmup=1)
    median = statistics.median(times)
    return {
        "images_per_s": batch / median,
        "images_per_s_best": batch / min(times),
        "ms_median": 1e3 * median,
        "runs": len(times),
        "first_call_s": first,
    }


def model_flops(config: JetConfig, batch: int, device: str) -> dict[str, int]:
    """FlopCounterMode's counts of encode, decode and a training step's forward + backward."""
    jet = Jet(dataclasses.replace(config, attention_backend="math", backprop="standard"))
    jet = perturb_parameters_(jet).to(device)
    x = torch.rand(batch, config.channels, *config.image_size, device=device) * 2 - 1
    counts = {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        z = jet(x)[0]
    counts["encode"] = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        jet.decode(z)
    counts["decode"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        bits_per_dim(*jet(x)).mean().backward()
    counts["train"] = counter.get_total_flops()
    return counts


def setup(
    config: JetConfig, batch: int, device: str, optimizer_impl: str = "default"
) -> tuple[Jet, torch.optim.Optimizer, torch.Tensor]:
    """A perturbed Jet (weights do not change the work), its reference optimizer and images.

    ``optimizer_impl`` ``"foreach"`` or ``"fused"`` runs the reference optimizer's update
    (same AdamW hyperparameters, same maths) with PyTorch's multi-tensor loop or its fused
    kernel instead of the default implementation.
    """
    torch.manual_seed(0)
    jet = perturb_parameters_(model_class(config.to_dict())(config), scale=0.02).to(device)
    accelerate_by_default(jet, device)  # as the Trainer does (JETBLOCKS_ACCELERATE=0: off)
    optimizer = reference_optimizer(jet, TrainConfig())
    if optimizer_impl != "default":
        hyper = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        optimizer = torch.optim.AdamW(jet.parameters(), **hyper, **{optimizer_impl: True})
    images = torch.rand(batch, config.channels, *config.image_size, device=device) * 2 - 1
    return jet, optimizer, images


def clip_and_update(jet: Jet, optimizer: torch.optim.Optimizer) -> None:
    """The end of a training step: global-norm gradient clipping at 1.0, then the update."""
    torch.nn.utils.clip_grad_norm_(jet.parameters(), 1.0)
    optimizer.step()


def optimizer_step(jet, optimizer):
    """:func:`clip_and_update` alone, on fixed small gradients (their global norm stays below
    the clipping threshold, so no call rescales them), made by the first call (untimed in
    :func:`measure`), so that workloads that never time it allocate nothing."""
    grads: list[torch.Tensor] = []

    def step():
        if not grads:
            grads.extend(torch.full_like(p, 1e-5) for p in jet.parameters())
        for param, grad in zip(jet.parameters(), grads, strict=True):
            param.grad = grad
        clip_and_update(jet, optimizer)

    return step


def training_step(jet, optimizer, images, forward=None, autocast=None):
    """One step as :class:`jetblocks.train.Trainer` takes it: bits/dim, backward, clipping at
    1.0, the optimizer, ``zero_grad(set_to_none=True)``; ``forward`` defaults to ``jet``."""
    forward = jet if forward is None else forward
    autocast = autocast or contextlib.nullcontext()

    def train():
        with autocast:
            loss = bits_per_dim(*forward(images)).mean()
        loss.backward()
        clip_and_update(jet, optimizer)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return train


def workloads(
    config: JetConfig,
    batch: int,
    bf16: bool,
    mode: str,
    device: str,
    optimizer_impl: str = "default",
    compile_backend: str = "inductor",
) -> dict[str, Callable[[], object]]:
    """The timed callables of :data:`ALL_OPS` (see :func:`setup`) in ``mode``: ``eager``,
    ``compiled`` (``torch.compile``) or ``frozen`` (encode and decode compiled with
    Inductor's freezing: the weights become constants and are folded; training as
    ``compiled``)."""
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; expected one of {MODES}")
    jet, optimizer, images = setup(config, batch, device, optimizer_impl)
    with torch.no_grad():
        tokens = jet(images)[0]
    inference = accelerate_by_default(copy.deepcopy(jet), device, inference=True)
    forward, infer, inverse = jet, inference, inference.decode
    if mode != "eager":
        torch._dynamo.reset()  # dynamo's cache limit is per function, across models
        forward = torch.compile(jet, backend=compile_backend)
        infer = torch.compile(inference, backend=compile_backend)
        inverse = torch.compile(inference.decode, backend=compile_backend)
    if mode == "frozen":  # the library's frozen inference (raw bijections, as eager times)
        frozen = copy.deepcopy(jet).compiled(backend=compile_backend)  # training moves `jet`
        infer = frozen.forward
        inverse = lambda z: frozen.inverse(z)[0]  # noqa: E731
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)

    def encode():
        with torch.no_grad(), autocast:
            return infer(images)

    def decode():
        with torch.no_grad(), autocast:
            return inverse(tokens)

    train = training_step(jet, optimizer, images, forward, autocast)
    step = optimizer_step(jet, optimizer)
    return {"encode": encode, "decode": decode, "train": train, "optimizer": step}


def profile_table(fn: Callable[[], object], rows: int = 20) -> str:
    """torch.profiler's table of the ops that took the most time over two calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn()
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["A", "B"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 32")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=ALL_OPS)
    parser.add_argument(
        "--attention-backends", nargs="+", default=["auto"], help="each timed in turn"
    )
    parser.add_argument("--backprop", default="standard")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument(
        "--profile", action="store_true", help="add torch.profiler's top ops of each timed call"
    )
    parser.add_argument(
        "--optimizer",
        default="default",
        choices=OPTIMIZER_IMPLS,
        help="the reference AdamW update's implementation (the same maths): reference_optimizer's "
        "default, PyTorch's multi-tensor foreach loop or its fused kernel",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--peak-sizes", type=int, nargs="+", help="matmul sizes for the peak")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="timing per peak size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    smoke = dict(configs=["smoke"], batch_sizes=[4], precisions=["bf16"], seconds=0.05,
                 compile_backend="aot_eager", peak_sizes=[256], peak_seconds=0.02,
                 ops=list(ALL_OPS))  # fmt: skip
    args = parse_args(parser, "benchmarks/results/throughput.json", smoke)

    load_before = os.getloadavg()
    peak = {
        name: matmul_peak(dtype, args.device, args.peak_seconds, args.peak_sizes)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(f"matmul peak: fp32 {peak['fp32']['gflops']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']['gflops']:.0f} GFLOP/s; load {load_before[0]:.2f}")  # fmt: skip
    results = []
    for name in args.configs:
        for batch in args.batch_sizes or [DEFAULT_BATCH.get(name, 32)]:
            flops = model_flops(config_named(name), batch, args.device)
            runs = itertools.product(args.modes, args.precisions, args.attention_backends)
            for mode, precision, backend in runs:
                config = config_named(name, attention_backend=backend, backprop=args.backprop)
                calls = workloads(
                    config,
                    batch,
                    precision == "bf16",
                    mode,
                    args.device,
                    args.optimizer,
                    args.compile_backend,
                )
                for op in args.ops:
                    loadavg = os.getloadavg()[0]
                    row = {
                        "config": name,
                        "batch": batch,
                        "precision": precision,
                        "mode": mode,
                        "attention_backend": backend,
                        "op": op,
                        **measure(calls[op], batch, args.seconds),
                        "model_gflop": flops.get(op, 0) / 1e9,
                        "load_1min": loadavg,
                        "optimizer": f"AdamW {args.optimizer}",
                    }
                    row["gflops"] = flops.get(op, 0) * row["images_per_s"] / batch / 1e9
                    row["mfu"] = row["gflops"] / peak[precision]["gflops"]
                    reference = REFERENCE.get(name, {}).get(op) if batch == 32 else None
                    if reference is not None:
                        row["reference_images_per_s"] = reference
                        # The model FLOP rate the reference's figure implies, and that
                        # rate against this machine's fp32 matmul peak measured above.
                        row["reference_gflops"] = flops[op] * reference / batch / 1e9
                        row["reference_fraction_of_fp32_peak"] = (
                            row["reference_gflops"] / peak["fp32"]["gflops"]
                        )
                        row["ratio_to_reference"] = row["images_per_s"] / reference
                        row["target_ratio"] = TARGET_RATIO[op]
                        row["target_met"] = row["ratio_to_reference"] >= TARGET_RATIO[op]
                    if args.profile:
                        row["profile"] = profile_table(calls[op])
                    results.append(row)
                    print(_format(row), flush=True)
                    if "profile" in row:
                        print(row["profile"], flush=True)
                del calls
    report = {
        "benchmark": "throughput",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "matmul_peak_gflops": peak,
        "flops": "FlopCounterMode, eager fp32, math attention: matmuls + attention products; "
        "train = forward + backward",
        "load_average_before": load_before,
        "results": results,
    }
    write_report(args.out, report)


def _format(row: dict) -> str:
    text = (
        f"{row['config']:>4} b{row['batch']:<4} {row['precision']:>4} {row['mode']:>8} "
        f"{row['op']:>6}: {row['images_per_s']:8.1f} img/s (best {row['images_per_s_best']:7.1f})"
        f"  {row['gflops']:6.1f} GFLOP/s  MFU {100 * row['mfu']:4.1f}%"
    )
    if row["attention_backend"] != "auto":
        text += f"  {row['attention_backend']} attention"
    if "ratio_to_reference" in row:
        mark = "ok" if row["target_met"] else "below"
        text += f"  x{row['ratio_to_reference']:.2f} ref (target x{row['target_ratio']}: {mark})"
    return text + f"  load {row['load_1min']:.1f}"


if __name__ == "__main__":
    main()
