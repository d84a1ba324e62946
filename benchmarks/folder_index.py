"""Seconds to open an image folder of a million files, with the folder index; writes JSON.

It writes ``--files`` tiny valid PNGs (a few fixed byte strings, 4x4 RGB) into ``--classes``
subfolders of a new folder (``--root``, which must not exist yet, or a temporary folder
under /tmp), with jetblocks' cache in a temporary folder of its own, waits until the files
are older than :data:`~jetblocks.integrations.folder_index.SETTLE_NS` (newer ones are never
trusted), and times ``ImageFolder(root, ...)``:

- ``first_open``: no index yet, every file checked in ``--workers`` processes;
- ``second_open``: nothing changed, every verdict read from the index (the number that
  must be seconds for ImageNet's 1.28 million images);
- ``scan``: :func:`~jetblocks.integrations.folder_index.scan` alone (``os.scandir`` and
  one ``stat`` per file), the part of a re-open that no index can save;
- ``changed_open``: after rewriting ``--modify`` files and adding ``--add`` new ones,
  which are checked again while the rest is trusted.

Each row records the seconds, the images found and the 1-minute load average; the report
adds the index file's size and the size and time of pickling the opened folder (what a
loader's worker processes receive). The folders are removed afterwards unless ``--keep``.
Before writing anything the disk space needed is estimated (one file-system block and one
inode per file) and printed; too little free space stops the script.

    python benchmarks/folder_index.py                          # a million files, ~4 GiB
    python benchmarks/folder_index.py --files 100000 --out /tmp/folder_index.json
    python benchmarks/folder_index.py --smoke --out /tmp/folder_index.json   # seconds
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import parse_args, write_report

from jetblocks.integrations import folder_index
from jetblocks.integrations.datasets import IMAGE_SUFFIXES, ImageFolder

GIB = 2**30


def tiny_pngs(count: int = 4) -> list[bytes]:
    """``count`` different 4x4 RGB PNG files, as bytes."""
    from PIL import Image

    files = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


def check_disk(where: Path, files: int, classes: int, file_bytes: int) -> dict[str, float]:
    """The space and inodes ``files`` files of ``file_bytes`` need at ``where`` (a block and
    an inode each, a block per folder, the index beside them), printed; exits if the file
    system has less free."""
    disk = os.statvfs(where)
    block = disk.f_frsize or 4096
    blocks = files * -(-file_bytes // block) + classes + 1
    index_bytes = files * 64  # about 20 bytes of name, 33 of numbers per file
    need = {
        "bytes": blocks * block + index_bytes,
        "inodes": files + classes + 1,
        "free_bytes": disk.f_bavail * disk.f_frsize,
        "free_inodes": disk.f_favail,
    }
    print(
        f"needs about {need['bytes'] / GIB:.2f} GiB and {need['inodes']:,} inodes under {where} "
        f"({files:,} files of {file_bytes} B, one {block} B block each); free: "
        f"{need['free_bytes'] / GIB:.2f} GiB, {need['free_inodes']:,} inodes",
        flush=True,
    )
    if need["bytes"] > need["free_bytes"] or (disk.f_files and need["inodes"] > disk.f_favail):
        raise SystemExit(f"not enough free space or inodes under {where}")
    return need


def name(i: int, classes: int) -> str:
    return f"c{i % classes:04d}/{i:08d}.png"


def write_files(root: Path, names: list[str], pngs: list[bytes]) -> None:
    """Write ``pngs[i % len(pngs)]`` as each ``names[i]`` (folders made as needed)."""
    for folder in sorted({item.partition("/")[0] for item in names}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i, item in enumerate(names):
        handle = os.open(root / item, flags, 0o644)
        try:
            os.write(handle, pngs[i % len(pngs)])
        finally:
            os.close(handle)


def timed_open(phase: str, root: Path, workers: int) -> tuple[dict, ImageFolder]:
    """One ``ImageFolder`` open: its row of the report, and the folder."""
    started = time.perf_counter()
    folder = ImageFolder(root, image_size=8, check_workers=workers)
    row = {"phase": phase, "seconds": time.perf_counter() - started, "images": len(folder),
           "load_1min": os.getloadavg()[0]}  # fmt: skip
    print(f"{phase:>13}: {row['seconds']:8.2f} s, {len(folder):,} images", flush=True)
    return row, folder


def measure(root: Path, args: argparse.Namespace) -> dict:
    """Write the folder, then time the opens and the scan (see the module docstring)."""
    pngs = tiny_pngs()
    root.mkdir(parents=True)
    disk = check_disk(root, args.files + args.add, args.classes, max(map(len, pngs)))
    started = time.perf_counter()
    write_files(root, [name(i, args.classes) for i in range(args.files)], pngs)
    written_s = time.perf_counter() - started
    print(f"wrote {args.files:,} files in {written_s:.1f} s", flush=True)
    time.sleep(folder_index.SETTLE_NS / 1e9 + 0.1)  # newer files are never trusted
    rows = []
    for phase in ("first_open", "second_open"):
        row, folder = timed_open(phase, root, args.workers)
        rows.append(row)
    started = time.perf_counter()
    found = len(folder_index.scan(root, IMAGE_SUFFIXES).names)
    rows.append({"phase": "scan", "seconds": time.perf_counter() - started, "images": found,
                 "load_1min": os.getloadavg()[0]})  # fmt: skip
    print(f"{'scan':>13}: {rows[-1]['seconds']:8.2f} s, {found:,} files", flush=True)
    changed = [name(i, args.classes) for i in range(0, args.files, args.files // args.modify)]
    write_files(root, changed[: args.modify], pngs)  # rewritten in place: a new ctime
    added = [f"c{i % args.classes:04d}/new_{i:08d}.png" for i in range(args.add)]
    write_files(root, added, pngs)
    row, folder = timed_open("changed_open", root, args.workers)
    rows.append(row)
    started = time.perf_counter()
    pickled = pickle.dumps(folder, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "results": rows,
        "write_files_s": written_s,
        "disk_estimate": disk,
        "index_bytes": folder_index.index_file(root).stat().st_size,
        "pickle": {"bytes": len(pickled), "seconds": time.perf_counter() - started},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="processes of the first check")
    parser.add_argument("--modify", type=int, default=1000, help="files rewritten, then opened")
    parser.add_argument("--add", type=int, default=1000, help="files added, then opened")
    parser.add_argument("--root", type=Path, help="the image folder to create (default: in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the image folder and cache")
    smoke = dict(files=600, classes=6, modify=20, add=20)
    args = parse_args(parser, "benchmarks/results/folder_index.json", smoke)
    if not 0 < args.modify <= args.files or args.add < 0 or args.classes < 1:
        parser.error("need 0 < --modify <= --files, --add >= 0 and --classes >= 1")
    if args.root is not None and args.root.exists():
        parser.error(f"--root {args.root} exists; name a folder for the script to create")

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="folder-index-", dir="/tmp"))
    root = args.root or scratch / "images"
    os.environ["JETBLOCKS_CACHE"] = str(scratch / "cache")
    try:
        measured = measure(root, args)
    finally:
        if args.keep:
            print(f"kept {root} and the cache {scratch / 'cache'}")
        else:
            shutil.rmtree(scratch)
            if args.root is not None:
                shutil.rmtree(args.root, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {
        "benchmark": "folder_index",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "method": "ImageFolder(root, image_size=8, check_workers=workers) timed with "
        "time.perf_counter; files written with os.open/os.write, then left to settle for "
        "SETTLE_NS before the first open",
        "settle_s": folder_index.SETTLE_NS / 1e9,
        "load_average_before": load_before,
        **measured,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
