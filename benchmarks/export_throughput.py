"""Images per second of an exported flow on onnxruntime, against PyTorch eager and compiled.

For each configuration (see ``config_named`` in ``benchmarks/throughput.py``: ``A``, ``B``,
``smoke``, a ``JetConfig`` or ``MultiScaleConfig`` preset) and batch size it builds one
perturbed float32 model and times, side by side on this CPU,

- ``encode``: images -> tokens and log-dets, the raw bijection (no input checks);
- ``decode``: tokens -> images, the raw inverse;

with three runtimes:

- ``onnxruntime``: the graphs :func:`jetblocks.export.export_flow` writes (CPU execution
  provider, all graph optimizations, as many intra-op threads as torch uses);
- ``eager``: the model with ``jetblocks.accelerate(model, inference=True)``, under
  ``torch.no_grad()``;
- ``compiled``: ``model.compiled()`` (``torch.compile`` with Inductor's freezing; the first
  call compiles, and is reported on its own as ``first_call_s``).

The report also holds how far onnxruntime's outputs lie from eager's (``parity``: the largest
absolute differences of tokens and images, and of log-dets relative to ``max(|logdet|, 1)``), the
seconds the export took, the load average before and after, torch's thread count and the
machine (``benchmarks/throughput.py``'s description). Each row records the 1-minute load
average: on a shared machine, compare rows taken at low load. ``--smoke`` checks in seconds
that the script works: the ``smoke`` config at batch 4, compiled with ``aot_eager``.

    python benchmarks/export_throughput.py                      # config A, batch 32
    python benchmarks/export_throughput.py --configs A B --batch-sizes 1 32
    python benchmarks/export_throughput.py --smoke --out /tmp/export_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import config_named, measure, parse_args, write_report

from jetblocks import accelerate
from jetblocks.export import export_flow
from jetblocks.optional import require
from jetblocks.pretrained import model_class
from jetblocks.testing import perturb_parameters_

RUNTIMES = ("onnxruntime", "eager", "compiled")
OPS = ("encode", "decode")


def sessions(folder: Path, threads: int) -> dict[str, object]:
    """onnxruntime sessions of an export folder's encode and decode."""
    ort = require("onnxruntime", "benchmarks/export_throughput.py")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return {
        op: ort.InferenceSession(
            str(folder / f"{op}.onnx"), options, providers=["CPUExecutionProvider"]
        )
        for op in OPS
    }


def workloads(config, batch: int, compile_backend: str, folder: Path):
    """The timed calls of every runtime and op, the parity of onnxruntime against eager, and
    the seconds the ONNX export took."""
    torch.manual_seed(0)
    flow = perturb_parameters_(model_class(config.to_dict())(config), scale=0.02).eval()
    images = torch.rand(batch, config.channels, *config.image_size) * 2 - 1
    with torch.no_grad():
        tokens = flow(images)[0]
    started = time.perf_counter()
    export_flow(flow, folder, "onnx")
    export_s = time.perf_counter() - started
    onnx = sessions(folder, torch.get_num_threads())
    eager = accelerate(copy.deepcopy(flow), inference=True)
    compiled = copy.deepcopy(flow).compiled(backend=compile_backend)
    images_np, tokens_np = images.numpy(), tokens.numpy()

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    calls = {
        "onnxruntime": {
            "encode": lambda: onnx["encode"].run(None, {"images": images_np}),
            "decode": lambda: onnx["decode"].run(None, {"tokens": tokens_np}),
        },
        "eager": {
            "encode": no_grad(lambda: eager(images)),
            "decode": no_grad(lambda: eager.inverse(tokens)),
        },
        "compiled": {
            "encode": lambda: compiled.forward(images),
            "decode": lambda: compiled.inverse(tokens),
        },
    }
    with torch.no_grad():
        want_tokens, want_logdet = eager(images)
        want_images = eager.inverse(tokens)[0]
    got_tokens, got_logdet = calls["onnxruntime"]["encode"]()
    (got_images,) = calls["onnxruntime"]["decode"]()
    parity = {
        "tokens_max_abs": float(np.abs(got_tokens - want_tokens.numpy()).max()),
        "images_max_abs": float(np.abs(got_images - want_images.numpy()).max()),
        "logdet_max_rel": float(
            (
                np.abs(got_logdet - want_logdet.numpy())
                / np.maximum(np.abs(want_logdet.numpy()), 1.0)
            ).max()
        ),
    }
    return calls, parity, export_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["A"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    smoke = dict(configs=["smoke"], batch_sizes=[4], seconds=0.05, compile_backend="aot_eager")
    args = parse_args(parser, "benchmarks/results/export_throughput.json", smoke)
    ort = require("onnxruntime", "benchmarks/export_throughput.py")

    load_before = os.getloadavg()
    results, parities = [], []
    for name in args.configs:
        config = config_named(name)
        for batch in args.batch_sizes:
            with tempfile.TemporaryDirectory() as folder:
                calls, parity, export_s = workloads(
                    config, batch, args.compile_backend, Path(folder)
                )
                parities.append({"config": name, "batch": batch, **parity, "export_s": export_s})
                for runtime in args.runtimes:
                    for op in args.ops:
                        loadavg = os.getloadavg()[0]
                        row = {
                            "config": name,
                            "batch": batch,
                            "runtime": runtime,
                            "op": op,
                            **measure(calls[runtime][op], batch, args.seconds),
                            "load_1min": loadavg,
                        }
                        results.append(row)
                        print(
                            f"{name:>6} b{batch:<4} {runtime:>11} {op:>6}: "
                            f"{row['images_per_s']:9.1f} img/s (best "
                            f"{row['images_per_s_best']:9.1f})  load {loadavg:.1f}",
                            flush=True,
                        )
    report = {
        "benchmark": "export_throughput",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "timed": "encode: the raw bijection flow(images); decode: flow.inverse(tokens); "
        "float32, no input checks; onnxruntime runs jetblocks.export's graphs",
        "load_average_before": load_before,
        "parity": parities,
        "results": results,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
