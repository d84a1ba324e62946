"""One GPU's check of jetblocks in under 8 minutes: speed, MFU, attention, memory, JetFormer.

Written for one H200; it measures, and writes as JSON after every part:

- ``train``: the ``imagenet64`` preset's training step, timed as ``benchmarks/throughput.py``
  times it (bits/dim, backward, clipping at 1.0, the reference AdamW) in bf16 autocast, eager
  and ``torch.compile``d: images/s and MFU. MFU is the model FLOPs per second over the
  device's bf16 matmul peak, which the script measures first (the best of large square
  ``torch.mm`` products); the FLOPs are ``torch.utils.flop_counter``'s count of one image's
  forward + backward (matmuls and attention), times the batch.
- ``attention``: xformers against SDPA on the same weights and images: the largest absolute
  difference of the tokens and of the log-dets of an encode (fp32 and bf16), and encode and
  training images/s in bf16. Without xformers (or off CUDA) only SDPA runs, with a note.
- ``max_batch``: the largest bf16 training batch that fits with ``standard`` and with
  ``invertible`` backprop (``JetConfig.backprop``): the batch doubles from ``--start-batch``
  until a step runs out of memory (``torch.cuda.OutOfMemoryError``), then bisection narrows
  it to 1/32; memory is freed between tries, and each search stops after
  ``--search-seconds`` (the bracket found so far is recorded).
- ``jetformer``: ``--jetformer-steps`` bf16 steps of the JetFormer example's ``cifar10-42m``
  preset (``examples/jetformer``) on its ``synthetic`` data, through
  ``jetblocks.train.Trainer.train_step``: images/s after 10 warm-up steps, peak memory, and
  the mean loss of the first and of the last 10 steps (it should go down).
- ``encode_decode``: encode and decode images/s of ``imagenet64``, fp32 and bf16, eager.

Each part records its settings, numbers and wall time. ``--budget`` seconds bound the whole
run: a part that would start with less than its minimum left is recorded as skipped, with
the reason, and the searches and the JetFormer steps stop at the budget's end. A part that
fails is recorded with its error; the script then exits 1 once the others have run.
``--smoke`` runs every part in seconds on tiny models (with ``--device cpu`` on a CPU).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples.jetformer
from throughput import (
    CONFIGS,
    config_named,
    matmul_peak,
    measure,
    model_flops,
    parse_args,
    setup,
    sync,
    training_step,
    workloads,
    write_report,
)

from examples.jetformer.model import JetFormer
from examples.jetformer.presets import preset
from examples.jetformer.run import RunData
from examples.jetformer.task import JetFormerTask, TaskConfig, jetformer_optimizer
from jetblocks.integrations.distributed import Distributed
from jetblocks.train import TrainConfig, Trainer
from jetblocks.vit import xformers_available

# The JetFormer of --smoke: the smoke Jet and a one-block decoder.
SMOKE_JETFORMER = dict(jet=CONFIGS["smoke"].to_dict(), keep=4, width=32, depth=1, mlp_dim=64,
                       num_heads=2, head_dim=16, num_mixtures=4)  # fmt: skip


class Budget:
    """The seconds left of the run's ``--budget``."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


# -- the parts: each takes the arguments, the bf16 matmul peak (GFLOP/s) and the budget -------
def train(args: argparse.Namespace, peak: float, budget: Budget) -> dict:
    config = config_named(args.config)
    per_image = model_flops(config, 1, args.device)["train"]
    result = {
        "settings": {"config": args.config, "batch": args.batch, "precision": "bf16",
                     "compile_backend": args.compile_backend, "seconds": args.seconds},
        "model_gflop_per_image": per_image / 1e9,
    }  # fmt: skip
    for mode in args.modes:
        calls = workloads(config, args.batch, True, mode, args.device,
                          compile_backend=args.compile_backend)  # fmt: skip
        row = measure(calls["train"], args.batch, args.seconds)
        row["mfu"] = per_image * row["images_per_s"] / 1e9 / peak
        result[mode] = row
        del calls
        free_memory()
    return result


def attention(args: argparse.Namespace, peak: float, budget: Budget) -> dict:
    config = config_named(args.config)
    backends = ["sdpa"]
    result = {"settings": {"config": args.config, "batch": args.batch, "seconds": args.seconds}}
    if args.device.startswith("cuda") and xformers_available():
        backends.append("xformers")
    else:
        result["note"] = "xformers skipped: not installed (jetblocks[gpu]) or not on CUDA"
    for precision in ("fp32", "bf16"):
        outputs = {}
        for backend in backends:
            variant = dataclasses.replace(config, attention_backend=backend)
            calls = workloads(variant, args.batch, precision == "bf16", "eager", args.device)
            outputs[backend] = calls["encode"]()
            if precision == "bf16":
                ops = ("encode", "train")
                result[backend] = {op: measure(calls[op], args.batch, args.seconds) for op in ops}
            del calls
            free_memory()
        if len(outputs) == 2:
            pairs = zip(outputs["sdpa"], outputs["xformers"], strict=True)
            tokens, logdet = ((a.float() - b.float()).abs().max().item() for a, b in pairs)
            result[f"max_abs_diff_{precision}"] = {"tokens": tokens, "logdet": logdet}
    return result


def fits(jet, optimizer, batch: int, device: str) -> bool:
    """Whether a bf16 training step on ``batch`` images runs without running out of memory."""
    config = jet.config
    try:
        images = torch.rand(batch, config.channels, *config.image_size, device=device) * 2 - 1
        autocast = torch.autocast(torch.device(device).type, torch.bfloat16)
        training_step(jet, optimizer, images, autocast=autocast)()
        sync()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        images = None  # before free_memory, which cannot free what a local still holds
        optimizer.zero_grad(set_to_none=True)
        free_memory()


def largest_batch(config, args: argparse.Namespace, budget: Budget) -> dict:
    """Double the batch until a step runs out of memory, then bisect down to 1/32."""
    jet, optimizer, _ = setup(config, 1, args.device)
    end = time.perf_counter() + min(args.search_seconds, budget.left())
    fitting, failing, tries = 0, None, []

    def attempt(batch: int) -> None:
        nonlocal fitting, failing
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        ok = fits(jet, optimizer, batch, args.device)
        tries.append({"batch": batch, "fits": ok, "seconds": time.perf_counter() - started,
                      "peak_memory_mb": peak_memory_mb(args.device)})  # fmt: skip
        fitting, failing = (batch, failing) if ok else (fitting, batch)

    def narrowed() -> bool:
        return failing is not None and failing - fitting <= max(1, fitting // 32)

    batch = args.start_batch
    while failing is None and batch <= args.max_batch and time.perf_counter() < end:
        attempt(batch)
        batch *= 2
    while failing is not None and not narrowed() and time.perf_counter() < end:
        attempt((fitting + failing) // 2)
    if narrowed():
        stopped = "narrowed to 1/32"
    else:
        stopped = "max_batch" if failing is None and batch > args.max_batch else "time"
    return {"largest_fitting": fitting, "smallest_failing": failing, "stopped_by": stopped,
            "tries": tries}  # fmt: skip


def max_batch(args: argparse.Namespace, peak: float, budget: Budget) -> dict:
    settings = {"config": args.config, "precision": "bf16", "start_batch": args.start_batch,
                "max_batch": args.max_batch, "search_seconds": args.search_seconds}  # fmt: skip
    result = {"settings": settings}
    for backprop in ("standard", "invertible"):
        result[backprop] = largest_batch(config_named(args.config, backprop=backprop), args, budget)
        free_memory()  # the model and optimizer of the search
    return result


def jetformer(args: argparse.Namespace, peak: float, budget: Budget) -> dict:
    spec = preset(args.jetformer_preset)
    spec["data"] = "synthetic"
    if args.smoke:
        spec["model"].update(SMOKE_JETFORMER)
    settings = {**spec["train"], "steps": args.jetformer_steps, "progress": False,
                "batch_size": args.jetformer_batch or spec["train"]["batch_size"],
                "sample_temperatures": ()}  # fmt: skip
    config = TrainConfig(**settings)
    env = Distributed(device=torch.device(args.device))
    with tempfile.TemporaryDirectory() as out_dir:
        data = RunData(spec, Path(out_dir), create_tokenizer=False)
        task = TaskConfig(conditioning=spec["conditioning"], curriculum_steps=config.steps,
                          **spec["task"])  # fmt: skip
        torch.manual_seed(0)
        model_config = data.model_config()
        trainer = Trainer(
            JetFormer(model_config),
            JetFormerTask(task, data.prompts),
            config,
            model_config=model_config.to_dict(),
            train_loader=data.loader("train", config.batch_size, env, 0, training=True),
            eval_batches=None,
            out_dir=out_dir,
            env=env,
            optimizer=jetformer_optimizer,
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        batches, losses, ends = iter(trainer.train_loader), [], []
        while len(losses) < config.steps and budget.left() > 0:
            losses.append(float(trainer.train_step(batches)))  # float() waits for the step
            ends.append(time.perf_counter())
    window = min(10, len(ends) // 2)  # warm-up steps, and the steps whose loss is averaged
    timed = ends[window:]
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    return {
        "settings": {"preset": args.jetformer_preset, "data": "synthetic", "bf16": config.bf16,
                     "batch": config.batch_size, "steps": config.steps, "lr": config.lr},
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "steps_done": len(losses),
        "images_per_s": config.batch_size * (len(timed) - 1) / (timed[-1] - timed[0]),
        "peak_memory_mb": peak_memory_mb(args.device),
        "loss_first_steps": first,
        "loss_last_steps": last,
        "loss_steps_averaged": window,
        "loss_went_down": last < first,
        "losses": losses,
    }  # fmt: skip


def encode_decode(args: argparse.Namespace, peak: float, budget: Budget) -> dict:
    config = config_named(args.config)
    result = {"settings": {"config": args.config, "batch": args.infer_batch,
                           "seconds": args.seconds, "mode": "eager"}}  # fmt: skip
    for precision in ("fp32", "bf16"):
        calls = workloads(config, args.infer_batch, precision == "bf16", "eager", args.device)
        ops = ("encode", "decode")
        result[precision] = {op: measure(calls[op], args.infer_batch, args.seconds) for op in ops}
        del calls
        free_memory()
    return result


# Each part and the seconds it needs at least (a part with less left is skipped).
PARTS = {"train": (train, 120), "attention": (attention, 45), "max_batch": (max_batch, 45),
         "jetformer": (jetformer, 45), "encode_decode": (encode_decode, 30)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--config", default="imagenet64")
    parser.add_argument("--batch", type=int, default=64, help="training batch (train, attention)")
    parser.add_argument("--infer-batch", type=int, default=256, help="encode/decode batch")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--start-batch", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=65536)
    parser.add_argument("--search-seconds", type=float, default=60.0, help="per backprop mode")
    parser.add_argument("--jetformer-preset", default="cifar10-42m")
    parser.add_argument("--jetformer-steps", type=int, default=300)
    parser.add_argument("--jetformer-batch", type=int, help="default: the preset's")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--peak-sizes", type=int, nargs="+", help="matmul sizes for the peak")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="timing per peak size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    smoke = dict(config="smoke", batch=4, infer_batch=4, compile_backend="eager", seconds=0.05,
                 start_batch=2, max_batch=8, search_seconds=10.0, jetformer_steps=6,
                 jetformer_batch=8, peak_sizes=[256], peak_seconds=0.02)  # fmt: skip
    args = parse_args(parser, "benchmarks/results/gpu_check.json", smoke)

    budget, started = Budget(args.budget), time.perf_counter()
    peak = matmul_peak(torch.bfloat16, args.device, args.peak_seconds, args.peak_sizes)
    print(f"bf16 matmul peak on {args.device}: {peak['gflops']:.0f} GFLOP/s", flush=True)
    report = {
        "benchmark": "gpu_check",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "xformers_installed": xformers_available(),
        "bf16_matmul_peak_gflops": peak,
        "parts": {},
    }
    for name in args.parts:
        run, minimum = PARTS[name]
        part_started = time.perf_counter()
        if budget.left() < minimum:
            left = max(0.0, budget.left())
            result = {"skipped": f"{left:.0f} s of the budget left; the part needs {minimum} s"}
        else:
            try:
                result = run(args, peak["gflops"], budget)
            except Exception as error:  # recorded, and the exit status says so
                result = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
                free_memory()
        result["wall_s"] = time.perf_counter() - part_started
        report["parts"][name] = result
        report["wall_s"] = time.perf_counter() - started
        print(f"{name}: {result.get('skipped') or result.get('error') or 'done'} "
              f"({result['wall_s']:.1f} s)", flush=True)  # fmt: skip
        write_report(args.out, report)
    if any("error" in part for part in report["parts"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
