"""An index of a folder's files and their check verdicts, so that re-opening a large image
folder costs a directory scan instead of decoding every file again.

Opening an :class:`~jetblocks.integrations.datasets.ImageFolder` lists its files and checks
that each one decodes (ImageNet: about 14 minutes in one process). :func:`checked_files` does
both: :func:`scan` lists the files with ``os.scandir`` (one ``stat`` per file), the files are
checked in worker processes, and the verdicts are kept in an index, one file per folder, in
the cache (:func:`cache_folder`), never in the data folder, which is the user's and may be
read-only.

The trust rule: a file's recorded verdict is reused only when its name, size, ``st_mtime_ns``,
``st_ctime_ns`` and ``st_ino`` all equal the recorded ones and the file had not changed in the
:data:`SETTLE_NS` before the recorded scan began (a write in the same clock tick as the scan
would leave the same times behind); any other file is checked again, vanished files are
dropped. Every write, rename or ``chmod`` sets ``ctime`` to the present, and nobody can set it
back, so a changed file never matches a stale or forged entry. A perfect forgery (the index
is the user's own file) can at most defer a corrupt file's refusal to the moment it is read,
which raises :class:`~jetblocks.integrations.datasets.DataError` naming it. An index that
does not parse is ignored with a warning and rebuilt; a cache that cannot be written costs
a warning and the index, never the open.

The index is an ``.npz`` of plain arrays, read back with the bounded reader ``read_npz``:
names as one UTF-8 blob (separated by NUL, which no file name holds), ``int64`` size and
times, ``uint64`` inodes, a ``bool`` verdict and the failures' messages as a second blob.

This module imports nothing of the image code: the caller passes the suffixes, the check
and the ``.npz`` reader (:mod:`jetblocks.integrations.datasets` imports this module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from jetblocks.checkpoint import atomic_file

__all__ = [
    "FORMAT_VERSION",
    "SETTLE_NS",
    "Listing",
    "cache_folder",
    "checked_files",
    "index_file",
    "scan",
]

FORMAT_VERSION = 1
SETTLE_NS = 2_000_000_000  # files changed this close to a scan are checked again next time
IN_PROCESS_BELOW = 256  # fewer files than this are checked without starting processes
CHUNK = 512  # files per task sent to a worker process
_SEP = "\0"
_COLUMNS = {"size": np.int64, "mtime_ns": np.int64, "ctime_ns": np.int64, "ino": np.uint64}
_ARRAYS = {"version", "folder", "scanned_ns", "names", "readable", "errors", *_COLUMNS}

Check = Callable[[Path], None]  # raises ValueError, naming the file, if the file is bad
ReadNpz = Callable[[Path], dict[str, np.ndarray]]


@dataclasses.dataclass
class Listing:
    """What a scan found: relative ``/``-separated ``names`` and, for each, the ``stat``
    fields ``size``, ``mtime_ns``, ``ctime_ns`` and ``ino`` (arrays of the same length)."""

    names: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    ctime_ns: np.ndarray
    ino: np.ndarray


def scan(root: str | os.PathLike, suffixes: Sequence[str]) -> Listing:
    """Every file under ``root`` whose name ends with one of ``suffixes`` (in any case),
    ordered as the sorted relative ``Path`` objects are (part by part).

    Names starting with ``.`` are skipped at every level, files and folders. Symlinked
    folders are not entered; a symlink to a file counts as that file (the target's ``stat``
    is recorded) and a broken one is skipped: the rules of ``Path.rglob("*")`` followed by
    ``Path.is_file()``. A folder that cannot be listed raises ``OSError``.
    """
    endings = tuple(suffix.lower() for suffix in suffixes)
    names: list[str] = []
    stats: list[os.stat_result] = []
    stack = [("", iter(_entries(os.fspath(root))))]  # depth first, each folder's entries sorted
    while stack:
        prefix, entries = stack[-1]
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((f"{prefix}{entry.name}/", iter(_entries(entry.path))))
                break
            if entry.name.lower().endswith(endings) and entry.is_file():
                try:
                    stats.append(entry.stat())
                except FileNotFoundError:  # deleted since its folder was listed
                    continue
                names.append(prefix + entry.name)
        else:
            stack.pop()
    columns = {
        column: np.fromiter((getattr(stat, f"st_{column}") for stat in stats), dtype, len(stats))
        for column, dtype in _COLUMNS.items()
    }
    return Listing(names, **columns)


def _entries(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder`` whose names do not start with ``.``, sorted by name."""
    with os.scandir(folder) as found:
        kept = [entry for entry in found if not entry.name.startswith(".")]
    return sorted(kept, key=lambda entry: entry.name)


def cache_folder() -> Path:
    """jetblocks' cache: ``$JETBLOCKS_CACHE`` if set, else ``$XDG_CACHE_HOME/jetblocks``,
    else ``~/.cache/jetblocks``."""
    if os.environ.get("JETBLOCKS_CACHE"):
        return Path(os.environ["JETBLOCKS_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "jetblocks"
    return Path.home() / ".cache" / "jetblocks"


def index_file(root: str | os.PathLike) -> Path:
    """The index of the folder ``root``: ``folder-index/<sha256>.npz`` in the cache, the
    digest taken over the format version and the folder's resolved absolute path."""
    key = f"{FORMAT_VERSION}{_SEP}{Path(root).resolve()}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return cache_folder() / "folder-index" / f"{digest}.npz"


def checked_files(
    root: str | os.PathLike,
    *,
    suffixes: Sequence[str],
    check: Check,
    read_npz: ReadNpz,
    workers: int | None = None,
    use_index: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """``(names, problems)``: the :func:`scan` of ``root`` and ``{name: why}`` for each file
    that ``check(root / name)`` refuses (raising ``ValueError``), in name order.

    With ``use_index`` the verdicts recorded in :func:`index_file` that the trust rule (see
    the module) allows are reused and the index is rewritten if anything changed; without
    it no index is read or written. Files are checked in ``workers`` processes (default
    ``os.cpu_count()``), or in this one when there are few of them.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"need at least 1 worker to check files, got {workers}")
    root = Path(root)
    started = time.time_ns()
    listing = scan(root, suffixes)
    path = index_file(root) if use_index else None
    old = _load(path, root, read_npz) if path else None
    rows = _trusted_rows(old, listing) if old else np.full(len(listing.names), -1)
    verdicts: list[str | None] = [old.failures.get(row) if old else None for row in rows.tolist()]
    unchecked = np.flatnonzero(rows < 0).tolist()
    fresh = _check_all(root, [listing.names[i] for i in unchecked], check, workers)
    for i, why in zip(unchecked, fresh, strict=True):
        verdicts[i] = why
    if path and (unchecked or old is None or len(old.listing.names) != len(listing.names)):
        _save(path, root, listing, verdicts, started)
    names = listing.names
    return names, {names[i]: why for i, why in enumerate(verdicts) if why is not None}


# -- checking ----------------------------------------------------------------------------------
def _check_all(root: Path, names: list[str], check: Check, workers: int) -> list[str | None]:
    """The verdict on each of ``names``, checked in ``workers`` processes if there are many.

    Workers are forked on Linux: they start in milliseconds (a spawned one would import
    torch again) and never re-run the caller's script; elsewhere the platform's default.
    """
    if workers == 1 or len(names) < IN_PROCESS_BELOW:
        return _check_chunk(check, root, names)
    size = min(CHUNK, -(-len(names) // workers))
    chunks = [names[start : start + size] for start in range(0, len(names), size)]
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        done = pool.map(partial(_check_chunk, check, root), chunks)
        return [why for chunk in done for why in chunk]


def _check_chunk(check: Check, root: Path, names: list[str]) -> list[str | None]:
    """For each name: None if ``check(root / name)`` passes, else its message (NULs escaped)."""
    verdicts: list[str | None] = []
    for name in names:
        try:
            check(root / name)
            verdicts.append(None)
        except ValueError as error:
            why = str(error) or f"{root / name}: {type(error).__name__}"
            verdicts.append(why.replace(_SEP, "\\0"))
    return verdicts


# -- the index file ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Index:
    """A loaded index: its listing, ``{row: why}`` for the refused files, and when the scan
    that made it began."""

    listing: Listing
    failures: dict[int, str]
    scanned_ns: int


def _trusted_rows(old: _Index, new: Listing) -> np.ndarray:
    """For each file of ``new``, its row in ``old`` if the trust rule allows reusing that
    row's verdict, else -1."""
    if old.listing.names == new.names:
        rows = np.arange(len(new.names))
    else:
        position = {name: row for row, name in enumerate(old.listing.names)}
        rows = np.array([position.get(name, -1) for name in new.names], dtype=np.int64)
    found = np.flatnonzero(rows >= 0)
    matched = rows[found]
    same = old.listing.ctime_ns[matched] < old.scanned_ns - SETTLE_NS
    for column in _COLUMNS:
        same &= getattr(old.listing, column)[matched] == getattr(new, column)[found]
    trusted = np.full(len(new.names), -1)
    trusted[found[same]] = matched[same]
    return trusted


def _blob(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8)


def _text(blob: np.ndarray) -> str:
    return blob.tobytes().decode("utf-8", "surrogateescape")


def _save(
    path: Path, root: Path, listing: Listing, verdicts: list[str | None], scanned_ns: int
) -> None:
    """Write the index atomically; a cache that cannot be written is a warning."""
    failed = [why for why in verdicts if why is not None]
    arrays = {
        "version": np.array(FORMAT_VERSION, np.int64),
        "folder": _blob(str(root.resolve())),
        "scanned_ns": np.array(scanned_ns, np.int64),
        "names": _blob(_SEP.join(listing.names)),
        **{column: getattr(listing, column) for column in _COLUMNS},
        "readable": np.array([why is None for why in verdicts], dtype=bool),
        "errors": _blob(_SEP.join(failed)),
    }
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as XDG asks
        with atomic_file(path) as staging, open(staging, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as error:
        warnings.warn(
            f"cannot write the folder index to {path.parent} ({error.strerror or error}); "
            "the folder's files are checked again at every open",
            stacklevel=4,
        )


def _load(path: Path, root: Path, read_npz: ReadNpz) -> _Index | None:
    """The index at ``path``, or None if there is none; one that cannot be read, does not
    parse or was made for another folder is ignored with a warning."""
    if not os.path.lexists(path):
        return None
    try:
        return _parse(read_npz(path), str(root.resolve()))
    except (OSError, ValueError) as error:
        warnings.warn(
            f"ignoring the folder index {path}: {error}; checking the files again",
            stacklevel=4,
        )
        return None


def _parse(arrays: dict[str, np.ndarray], folder: str) -> _Index:
    """An :class:`_Index` from the arrays of an index file; ``ValueError`` saying what is
    wrong unless every array has the expected kind, shape and contents."""
    if arrays.keys() != _ARRAYS:
        raise ValueError(f"expected the arrays {sorted(_ARRAYS)}, found {sorted(arrays)}")
    version = int(_array(arrays, "version", np.int64, ()))
    if version != FORMAT_VERSION:
        raise ValueError(f"expected format version {FORMAT_VERSION}, found {version}")
    recorded = _text(_array(arrays, "folder", np.uint8, None))
    if recorded != folder:
        raise ValueError(f"made for the folder {recorded!r}, not {folder!r}")
    readable = _array(arrays, "readable", np.bool_, None)
    count = len(readable)
    columns = {key: _array(arrays, key, dtype, (count,)) for key, dtype in _COLUMNS.items()}
    names = _split(_array(arrays, "names", np.uint8, None), count, "names")
    failed = np.flatnonzero(~readable).tolist()
    errors = _split(_array(arrays, "errors", np.uint8, None), len(failed), "errors")
    scanned_ns = int(_array(arrays, "scanned_ns", np.int64, ()))
    return _Index(Listing(names, **columns), dict(zip(failed, errors, strict=True)), scanned_ns)


def _array(arrays: dict[str, np.ndarray], name: str, dtype, shape: tuple | None) -> np.ndarray:
    """``arrays[name]`` if it has ``dtype`` and ``shape`` (None: any 1-D shape)."""
    array = arrays[name]
    fits = array.ndim == 1 if shape is None else array.shape == shape
    if array.dtype != np.dtype(dtype) or not fits:
        want = "[n]" if shape is None else list(shape)
        raise ValueError(
            f"expected {name!r} to be {np.dtype(dtype)} {want}, found {array.dtype} "
            f"{list(array.shape)}"
        )
    return array


def _split(blob: np.ndarray, count: int, name: str) -> list[str]:
    """The ``count`` NUL-separated texts of ``blob`` (none is empty)."""
    texts = _text(blob).split(_SEP) if len(blob) else []
    if len(texts) != count:
        raise ValueError(f"expected {count} {name}, found {len(texts)}")
    return texts
