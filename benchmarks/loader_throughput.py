"""Images/s that the data loaders deliver per worker process, beside what training consumes;
writes JSON.

It generates ``--images`` ImageNet-like JPEGs (sides drawn from 300-500 pixels, quality 90,
cut at random from the photos bundled with scikit-image, so that decoding costs what a real
photo costs) and measures, for each ``--workers`` count, the batches of ``--batch-size``
images of 64x64 RGB that come out of

- ``jpeg-folder``: an :class:`~jetblocks.integrations.datasets.ImageFolder` of the JPEGs
  (decoded, center-cropped and resized to 64x64 in the workers);
- ``jpeg-shards``: the same JPEGs stored as they are in tar shards (the same work, read
  as a stream through a shuffle buffer);
- ``png64-shards``: shards of the images already resized to 64x64 and stored as PNG (what
  ``jetblocks shards --image-size 64`` writes): only a small decode is left.

Each row gives images/s (``--batches`` batches over their total time, after two that start
the workers) and images/s per worker. ``training`` gives the images/s one training step of
``--preset`` consumes on this machine (forward, backward and the optimizer on the CPU, as in
``benchmarks/throughput.py``): a loader keeps up when its images/s exceeds that. On this
machine's 2 cores the workers compete with the training threads; the per-worker figure is
what to divide a device's training rate by.

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --smoke --out /tmp/loader.json   # seconds
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import config_named, parse_args, setup, time_calls, training_step, write_report

from jetblocks.integrations.builtin import PHOTO_PATCHES_TEST, PHOTO_PATCHES_TRAIN
from jetblocks.integrations.datasets import ImageFolder
from jetblocks.integrations.shards import ShardSet, write_shards
from jetblocks.integrations.torchdata import image_loader, shard_loader


def photos() -> list[np.ndarray]:
    import skimage.data

    names = PHOTO_PATCHES_TRAIN + PHOTO_PATCHES_TEST  # the photos inside scikit-image's wheel
    return [getattr(skimage.data, name)()[..., :3] for name in names]


def imagenet_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of 300-500 pixels a side cut from the bundled photos, as bytes."""
    from PIL import Image

    rng, sources, files = np.random.default_rng(seed), photos(), []
    for _ in range(count):
        photo = Image.fromarray(sources[rng.integers(len(sources))])
        width, height = (int(side) for side in rng.integers(300, 501, size=2))
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.5)
        photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1))
        left = rng.integers(photo.width - width + 1)
        top = rng.integers(photo.height - height + 1)
        buffer = io.BytesIO()
        photo.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def rate(loader, batches: int, batch_size: int) -> dict[str, float]:
    """Images/s over ``batches`` batches (their total time: what a training loop waits for),
    after two batches that start the workers. Batches read ahead while the clock was not
    running make this at most ``prefetch / batches`` too high."""
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return {"images_per_s": batches * batch_size / (time.perf_counter() - started),
            "batches": batches}  # fmt: skip


def write_data(root: Path, jpegs: list[bytes]) -> dict[str, object]:
    """The JPEG folder and the two kinds of shards; returns what each loader reads."""
    for index, data in enumerate(jpegs):
        folder = root / "folder" / f"class_{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:07d}.jpg").write_bytes(data)
    per_shard = max(1, len(jpegs) // 4)
    stored = [(data, "jpg", index % 10) for index, data in enumerate(jpegs)]
    jpeg_shards = write_shards(stored, root / "jpeg", per_shard)
    folder = ImageFolder(root / "folder", 64, 3)
    png_shards = write_shards(folder, root / "png64", per_shard)
    return {
        "jpeg-folder": folder,
        "jpeg-shards": ShardSet(tuple(map(str, jpeg_shards)), 64, 3, "jpeg"),
        "png64-shards": ShardSet(tuple(map(str, png_shards)), 64, 3, "png64"),
    }


def loader_for(source, workers: int, batch_size: int):
    if isinstance(source, ShardSet):
        return shard_loader(source, batch_size, seed=0, buffer=256, num_workers=workers)
    return image_loader(source, batch_size, seed=0, num_workers=workers)


def training_rate(preset: str, batch_size: int, seconds: float) -> dict[str, float]:
    config = config_named(preset)
    jet, optimizer, images = setup(config, batch_size, "cpu")
    times = time_calls(training_step(jet, optimizer, images), seconds, warmup=1)
    return {"preset": preset, "images_per_s": batch_size / statistics.median(times),
            "batch_size": batch_size, "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="imagenet64")
    parser.add_argument("--train-seconds", type=float, default=10.0)
    parser.add_argument(
        "--train-batch-size", type=int, default=8, help="imagenet64 at 64 needs ~24 GiB on a CPU"
    )
    smoke = {"images": 64, "batch_size": 8, "batches": 3, "workers": [0, 1],
             "preset": "tiny", "train_seconds": 0.5, "train_batch_size": 4}  # fmt: skip
    args = parse_args(parser, "benchmarks/results/loader_throughput.json", smoke)
    load_before = os.getloadavg()
    jpegs = imagenet_like_jpegs(args.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jetblocks-loader-") as root:
        sources = write_data(Path(root), jpegs)
        for name, source in sources.items():
            for workers in args.workers:
                row = {"source": name, "workers": workers,
                       **rate(loader_for(source, workers, args.batch_size), args.batches,
                              args.batch_size), "load_1min": os.getloadavg()[0]}  # fmt: skip
                row["images_per_s_per_worker"] = row["images_per_s"] / max(workers, 1)
                rows.append(row)
                print(f"{name:13s} workers={workers}: {row['images_per_s']:8.1f} images/s")
    training = training_rate(args.preset, args.train_batch_size, args.train_seconds)
    print(f"training {args.preset}: {training['images_per_s']:.1f} images/s")
    sizes = [len(data) for data in jpegs]
    write_report(args.out, {
        "benchmark": "loader_throughput",
        "settings": {**vars(args), "jpeg_bytes_mean": statistics.mean(sizes),
                     "image_size": 64, "shuffle_buffer": 256},
        "load_average_before": load_before,
        "loaders": rows,
        "training": training,
    })  # fmt: skip


if __name__ == "__main__":
    main()
