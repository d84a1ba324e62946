"""jetblocks against the authors' JAX Jet, on the same CPU in the same window; writes JSON.

For each configuration (by default ``A`` and ``B`` of ``benchmarks/throughput.py``, batch 32)
it runs ``benchmarks/throughput.py`` (jetblocks in fp32 and bf16, eager by default) and right
after it ``benchmarks/reference/jax_jet.py`` (the reference in Flax, fp32) with the Python of
a separate environment, ``--jax-python``, so that both see the same load; then it reports
each op's (``encode``, ``decode``, ``train``) ratio of images/s, jetblocks over JAX, per
jetblocks precision and mode. Each side times its ops as its script's docstring says.

With each configuration comes a check that both compute the same function: a perturbed
jetblocks model is exported with big_vision's parameter names (``jet_to_arrays``), with four
images and their encodings; the JAX script loads it and reports the largest differences of
its encode, decode and log-dets (float32 rounding: 1e-6 to 1e-5, more on log-dets, which
sum thousands of terms).

    python -m venv /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install -r benchmarks/reference/requirements.txt
    python benchmarks/side_by_side.py --jax-python /tmp/jaxvenv/bin/python --modes eager frozen
    python benchmarks/side_by_side.py --jax-python /tmp/jaxvenv/bin/python --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from throughput import config_named, parse_args, setup, write_report

from jetblocks import JetConfig
from jetblocks.integrations.big_vision import jet_to_arrays
from jetblocks.latents import unpatchify

HERE = Path(__file__).resolve().parent


def write_check(config: JetConfig, path: Path) -> None:
    """A perturbed Jet's weights (big_vision's names), config, images, encodings and log-dets,
    images and encodings in the reference's NHWC layout, as an ``.npz`` for ``jax_jet.py``."""
    jet, _, images = setup(config, 4, "cpu")
    with torch.no_grad():
        tokens, logdet = jet(images)
    z = unpatchify(tokens, config.patch_size, config.grid)
    check = {"config": np.array(config.to_json()), "images": images.permute(0, 2, 3, 1).numpy(),
             "z": z.permute(0, 2, 3, 1).numpy(), "logdet": logdet.numpy()}  # fmt: skip
    np.savez(path, **jet_to_arrays(jet), **{f"check/{k}": v for k, v in check.items()})


def run(command: list[str], out: Path) -> dict:
    """Run a benchmark script and read its JSON report."""
    print("$", " ".join(command), flush=True)
    subprocess.run([*command, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jax-python", required=True, help="python of the JAX environment")
    parser.add_argument("--configs", nargs="+", default=["A", "B"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="jetblocks'")
    parser.add_argument(
        "--modes", nargs="+", default=["eager"], help="jetblocks': eager, compiled, frozen"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    smoke = dict(configs=["smoke"], batch=4, seconds=0.05)
    args = parse_args(parser, "benchmarks/results/side_by_side.json", smoke)

    report = {"benchmark": "side_by_side", "settings": vars(args), "ratios": [], "check": {},
              "jetblocks": {}, "jax": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            check = Path(tmp) / f"check_{name}.npz"
            write_check(config_named(name), check)
            ours = run(
                [sys.executable, str(HERE / "throughput.py"), "--configs", name, "--device",
                 "cpu", "--batch-sizes", str(args.batch), "--seconds", str(args.seconds),
                 "--precisions", *args.precisions, "--modes", *args.modes,
                 *(["--smoke"] if args.smoke else [])],
                Path(tmp) / f"jetblocks_{name}.json",
            )  # fmt: skip
            fields = json.dumps({name: config_named(name).to_dict()})
            theirs = run(
                [args.jax_python, str(HERE / "reference" / "jax_jet.py"), "--configs", fields,
                 "--batch", str(args.batch), "--seconds", str(args.seconds), "--check",
                 str(check)],
                Path(tmp) / f"jax_{name}.json",
            )  # fmt: skip
            report["jetblocks"][name], report["jax"][name] = ours, theirs
            report["check"][name] = theirs["check"]
            jax_rows = {row["op"]: row for row in theirs["results"]}
            for row in ours["results"]:
                reference = jax_rows[row["op"]]
                report["ratios"].append({
                    "config": name, "op": row["op"], "precision": row["precision"],
                    "mode": row["mode"], "jetblocks_images_per_s": row["images_per_s"],
                    "jax_images_per_s": reference["images_per_s"],
                    "ratio": row["images_per_s"] / reference["images_per_s"],
                    "load_1min": [row["load_1min"], reference["load_1min"]],
                })  # fmt: skip
    for r in report["ratios"]:
        print(f"{r['config']:>6} {r['op']:>6} {r['precision']} {r['mode']:>8}: jetblocks "
              f"{r['jetblocks_images_per_s']:8.1f}, JAX {r['jax_images_per_s']:8.1f} img/s, "
              f"x{r['ratio']:.2f}")  # fmt: skip
    write_report(args.out, report)


if __name__ == "__main__":
    main()
