"""The image folder index (jetblocks.integrations.folder_index): re-opening a folder reuses
the verdicts of unchanged files and checks every other file; no index can pass a bad file."""

from __future__ import annotations

import io
import os
import pickle
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jetblocks.integrations import datasets, folder_index
from jetblocks.integrations.datasets import IMAGE_SUFFIXES, DataError, ImageFolder, read_npz
from jetblocks.integrations.folder_index import checked_files, index_file, scan


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own, whose index trusts files written a moment ago (the real
    rule waits ``SETTLE_NS``; :func:`test_files_changed_just_before_a_scan_are_checked_again`)."""
    monkeypatch.setenv("JETBLOCKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder_index, "SETTLE_NS", 0)
    return tmp_path / "cache"


@pytest.fixture
def checks(monkeypatch) -> list[Path]:
    """The files that ImageFolder decodes to check them (in this process), in order."""
    checked, check = [], datasets._check_decodes

    def counting(path: Path) -> None:
        checked.append(path)
        check(path)

    monkeypatch.setattr(datasets, "_check_decodes", counting)
    return checked


def png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def corrupt(data: bytes) -> bytes:
    """``data`` with one byte of its pixels flipped: the same size, a failing chunk CRC."""
    at = data.index(b"IDAT") + 6
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image_folder(root: Path) -> Path:
    """Classes ``a`` and ``b`` of three PNGs each."""
    for i, name in enumerate(["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"]):
        write(root / name, png(i))
    return root


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def rewrite_index(root: Path, change) -> None:
    """Apply ``change`` to the arrays of ``root``'s index and write them back."""
    path = index_file(root)
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    change(arrays)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_reopening_reads_the_index_and_decodes_nothing(tmp_path, cache, checks):
    root = image_folder(tmp_path / "data")
    before = contents(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no index yet is no problem
        first = ImageFolder(root, image_size=4)
    assert len(checks) == 6
    checks.clear()
    again = ImageFolder(root, image_size=4)
    assert checks == []
    assert (again.names, again.labels, again.classes) == (first.names, first.labels, ["a", "b"])
    assert contents(root) == before  # nothing is written in the data folder
    assert sorted(cache.rglob("*.npz")) == [index_file(root)]
    assert index_file(root).parent == cache / "folder-index"
    assert pickle.loads(pickle.dumps(again))[4][0].equal(again[4][0])


def test_a_file_rewritten_with_size_and_mtime_restored_is_checked_again(tmp_path, checks):
    root = image_folder(tmp_path / "data")
    ImageFolder(root, image_size=4)
    checks.clear()
    target = root / "a" / "1.png"
    old, bad = target.stat(), corrupt(target.read_bytes())
    while target.stat().st_ctime_ns == old.st_ctime_ns:  # until the clock ticks
        target.write_bytes(bad)
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
        time.sleep(0.001)
    new = target.stat()
    assert (new.st_size, new.st_mtime_ns, new.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    with pytest.raises(DataError, match="1 of 6 images cannot be read") as refused:
        ImageFolder(root, image_size=4)
    assert str(target) in str(refused.value) and checks == [target]
    assert ImageFolder(root, image_size=4, skip_corrupt=True).skipped == [Path("a/1.png")]
    assert checks == [target]  # the refusal is in the index now


def test_new_files_are_checked_and_deleted_ones_dropped(tmp_path, checks):
    root = image_folder(tmp_path / "data")
    ImageFolder(root, image_size=4)
    checks.clear()
    new = write(root / "c" / "new.png", png(9))
    (root / "a" / "0.png").unlink()
    folder = ImageFolder(root, image_size=4)
    assert checks == [new]
    assert folder.names == ["a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png", "c/new.png"]
    assert folder.labels == [0, 0, 1, 1, 1, 2] and folder.classes == ["a", "b", "c"]
    checks.clear()
    assert ImageFolder(root, image_size=4).names == folder.names and checks == []


def test_files_changed_just_before_a_scan_are_checked_again(tmp_path, checks, monkeypatch):
    """A file written in the clock tick of a scan could change again unseen: such files are
    not trusted until they have been still for ``SETTLE_NS`` before a scan."""
    monkeypatch.setattr(folder_index, "SETTLE_NS", 3600 * 10**9)
    root = image_folder(tmp_path / "data")
    ImageFolder(root, image_size=4)
    ImageFolder(root, image_size=4)
    assert len(checks) == 12


def test_index_false_reads_and_writes_no_index(tmp_path, cache, checks):
    root = image_folder(tmp_path / "data")
    ImageFolder(root, image_size=4)
    rewrite_index(root, refuse_all)
    with pytest.raises(DataError, match="6 of 6 images cannot be read"):
        ImageFolder(root, image_size=4)
    checks.clear()
    assert len(ImageFolder(root, image_size=4, index=False)) == 6 and len(checks) == 6
    other = image_folder(tmp_path / "other")
    ImageFolder(other, image_size=4, index=False)
    assert not index_file(other).exists()


def refuse_all(arrays) -> None:
    """A well-formed index that refuses every file."""
    arrays["readable"].fill(False)
    arrays["errors"] = np.frombuffer("\0".join(["forged"] * len(arrays["size"])).encode(), np.uint8)


def blob(text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERING = {
    "garbage": lambda root: index_file(root).write_bytes(b"garbage, not a zip"),
    "truncated": lambda root: _cut(index_file(root)),
    "names": lambda root: rewrite_index(root, lambda a: a.update(names=blob(b"a/0.png"))),
    "errors": lambda root: rewrite_index(root, lambda a: a.update(errors=blob(b"one\0two"))),
    "folder": lambda root: rewrite_index(root, lambda a: a.update(folder=blob(b"/elsewhere"))),
    "dtype": lambda root: rewrite_index(root, lambda a: a.update(size=a["size"] * 1.0)),
    "missing": lambda root: rewrite_index(root, lambda a: a.pop("ino")),
    "version": lambda root: rewrite_index(root, lambda a: a.update(version=np.array(99))),
}


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
def test_a_malformed_index_is_ignored_with_a_warning_and_rebuilt(tmp_path, checks, tamper):
    root = image_folder(tmp_path / "data")
    write(root / "a" / "bad.png", corrupt(png(7)))
    first = ImageFolder(root, image_size=4, skip_corrupt=True)
    tamper(root)
    checks.clear()
    with pytest.warns(
        UserWarning, match=f"ignoring the folder index {re.escape(str(index_file(root)))}"
    ):
        again = ImageFolder(root, image_size=4, skip_corrupt=True)
    assert (again.names, again.skipped, again.labels) == (first.names, first.skipped, first.labels)
    assert len(checks) == 7
    checks.clear()
    ImageFolder(root, image_size=4, skip_corrupt=True)
    assert checks == []


@pytest.mark.parametrize("column", ["ctime_ns", "ino"])
def test_a_forged_index_cannot_pass_a_corrupt_file(tmp_path, column):
    root = image_folder(tmp_path / "data")
    bad = write(root / "a" / "1.png", corrupt(png(1)))
    with pytest.raises(DataError, match="1 of 6"):
        ImageFolder(root, image_size=4)
    row = scan(root, IMAGE_SUFFIXES).names.index("a/1.png")

    def all_readable(arrays, stale: bool):
        arrays["readable"].fill(True)
        arrays["errors"] = np.zeros(0, np.uint8)
        if stale:  # the entry of an earlier file (another inode, or an older change)
            arrays[column][row] += 1

    rewrite_index(root, lambda arrays: all_readable(arrays, stale=True))
    with pytest.raises(DataError, match="1 of 6"):
        ImageFolder(root, image_size=4)
    rewrite_index(root, lambda arrays: all_readable(arrays, stale=False))
    folder = ImageFolder(root, image_size=4)  # a perfect forgery passes the open...
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(bad))}"):
        folder[row]  # ...but not the read


def test_an_unwritable_cache_is_a_warning(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    blocker = write(tmp_path / "a-file", b"")  # refuses folders below it, even to root
    monkeypatch.setenv("JETBLOCKS_CACHE", str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageFolder(root, image_size=4)
    assert [str(warning.message) for warning in caught] == [
        f"cannot write the folder index to {blocker / 'folder-index'} (Not a directory); "
        "the folder's files are checked again at every open"
    ]
    assert folder.names == ImageFolder(root, image_size=4, index=False).names


def test_the_scan_keeps_the_order_and_rules_of_rglob(tmp_path):
    root = tmp_path / "data"
    names = ["a/x.png", "a-b/x.png", "a.b/y.PNG", "a b/z.jpeg", "A/z.jpg", "a/b/c.png",
             "a0/q.png", "é/e.png", "\udcff/odd.png", "top.png", "Z/y.Jpg", "a/.hidden.png",
             ".hidden/h.png", "a/.cache/x.png", "a/notes.txt", "z/x.png.bak"]  # fmt: skip
    for i, name in enumerate(names):
        write(root / name, png(i))
    (root / "linked-folder").symlink_to(root / "a", target_is_directory=True)
    (root / "linked-file.png").symlink_to(root / "a" / "x.png")
    (root / "broken-link.png").symlink_to(root / "nowhere.png")
    old_rule = sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )
    expected = [str(path) for path in old_rule]
    assert "linked-file.png" in expected and len(expected) == 12
    assert scan(root, IMAGE_SUFFIXES).names == expected
    indexed, plain = ImageFolder(root, image_size=4), ImageFolder(root, image_size=4, index=False)
    reopened = ImageFolder(root, image_size=4)
    for folder in (indexed, plain, reopened):
        assert folder.names == expected and folder.files == old_rule
        assert (folder.labels, folder.classes) == (plain.labels, plain.classes)


def _refuse_naming_the_process(path: Path) -> None:
    raise ValueError(f"{path.name} checked in process {os.getpid()}")


def test_the_parallel_check_gives_the_serial_verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_index, "IN_PROCESS_BELOW", 0)
    root = image_folder(tmp_path / "data")
    write(root / "b" / "bad.png", corrupt(png(7)))
    write(root / "b" / "text.png", b"not an image")
    common = dict(suffixes=IMAGE_SUFFIXES, read_npz=read_npz, use_index=False)
    serial = checked_files(root, check=datasets._check_decodes, workers=1, **common)
    parallel = checked_files(root, check=datasets._check_decodes, workers=2, **common)
    assert parallel == serial and list(serial[1]) == ["b/bad.png", "b/text.png"]
    _, refusals = checked_files(root, check=_refuse_naming_the_process, workers=2, **common)
    processes = {why.rpartition(" ")[2] for why in refusals.values()}
    assert len(refusals) == 8 and str(os.getpid()) not in processes
    folder = ImageFolder(root, image_size=4, skip_corrupt=True, check_workers=2)
    assert [str(path) for path in folder.skipped] == list(serial[1])
    with pytest.raises(ValueError, match="at least 1 worker"):
        ImageFolder(root, image_size=4, check_workers=0)


def test_a_folder_that_cannot_be_listed_is_a_data_error_naming_it(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    scandir = os.scandir

    def refusing(path):
        if Path(path) == root / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match=f"cannot list {re.escape(str(root / 'b'))}: Permission"):
        ImageFolder(root, image_size=4)
