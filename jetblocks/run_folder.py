"""A training run's folder: what it holds, who may write to it, and its checkpoints.

    RUN/
      .lock                        held by the process training into RUN (see RunLock)
      metrics.jsonl                one JSON record per line, in step order
      checkpoints/step_XXXXXXXX/   whatever the trainer saves (written as one atomic folder)
      samples/step_XXXXXXXX.png
      tensorboard/, wandb/         the logs of --log tensorboard, wandb (see jetblocks.loggers)

:class:`RunFolder` opens a folder for a run (creating it, removing what a killed save left
behind, refusing a folder that holds another run unless it is resumed or overwritten, and
deleting only the files a run writes when overwriting), then saves checkpoints (atomically,
keeping the newest few), finds the newest one that loads, and appends to the metrics log.

Only one process may train into a folder at a time: :class:`RunLock` holds an exclusive
``flock`` on ``RUN/.lock`` for the life of the run. The kernel releases it when the process
exits or is killed, so a lock file left by a dead process is simply taken over; a second
process finds the lock held and stops before touching anything, naming the holder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jetblocks.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_directory,
    checkpoints_in,
    parse_json,
    remove_orphans,
)

__all__ = ["RunFolder", "RunInUseError", "RunLock", "read_metrics"]

T = TypeVar("T")
LOCK_FILE = ".lock"
LOG_FOLDERS = ("tensorboard", "wandb")  # what jetblocks.loggers writes


class RunInUseError(CheckpointError):
    """Another process is training into the run folder."""


_HELD_LOCKS: set[int] = set()  # this process's lock descriptors


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loading worker, say): close the inherited lock descriptors.
    A ``flock`` belongs to the open file, which the child shares: without this, a worker
    outliving its run would keep the folder locked."""
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the process ends.

    The lock file records who holds it (process id, host, command, start time) so that a
    process refused the lock can say who has it. Not re-entrant across processes; within
    one process, acquiring a lock it holds already is a no-op.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunInUseError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end or "
                "train into another folder"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:200],
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        if self._fd in _HELD_LOCKS:  # not in a forked child, where it is closed already
            _HELD_LOCKS.discard(self._fd)
            os.ftruncate(self._fd, 0)  # the file stays: removing it would race a new holder
            os.close(self._fd)
        self._fd = None


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return (
            f"process {int(holder['pid'])} on {holder['host']} ({holder['command']}, since "
            f"{holder['since']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunFolder:
    """The folder of one training run (see the module docstring).

    ``main``: whether this process writes (rank 0 of a distributed job); the others only
    read (checkpoints to restore) and never lock, create or delete anything.
    """

    def __init__(self, path: str | os.PathLike, *, main: bool = True) -> None:
        self.path, self.main = Path(path), main
        self.lock = RunLock(self.path)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint folders, oldest first."""
        return checkpoints_in(self.path)

    def sample_file(self, step: int) -> Path:
        return self.path / "samples" / f"step_{step:08d}.png"

    # -- opening and closing -------------------------------------------------------------------
    def open(self, *, resume: bool = False, overwrite: bool = False) -> bool:
        """Lock the folder (creating it) for this run; return whether there is a checkpoint
        to resume from.

        A folder holding another run is refused unless ``resume`` (continue it) or
        ``overwrite`` (delete its checkpoints, metrics, samples and logs, and nothing else). A
        run killed before its first checkpoint is resumed by starting again.
        """
        if not self.main:
            return resume and bool(self.checkpoints())
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"the run directory {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._remove_orphans()
            if resume and self.checkpoints():
                return True
            if self._holds_a_run():
                if not (overwrite or resume):
                    raise CheckpointError(
                        f"{self.path} already holds a training run; resume it "
                        "(resume=True, --resume) or replace it (overwrite=True, --overwrite)"
                    )
                self._delete_run()
            self.metrics_file.write_text("")
        except BaseException:
            self.lock.release()
            raise
        return False

    def close(self) -> None:
        """Release the folder's lock (also released if the process dies)."""
        self.lock.release()

    def _remove_orphans(self) -> None:
        orphans = remove_orphans(self.path / "checkpoints", "step_*")
        orphans += remove_orphans(self.path / "samples", "step_*.png")
        orphans += remove_orphans(self.path, "metrics.jsonl")
        if orphans:
            _warn(f"removed {len(orphans)} unfinished temporary file(s) of a killed save")

    def _holds_a_run(self) -> bool:
        metrics = self.metrics_file
        return bool(self.checkpoints()) or (metrics.is_file() and metrics.stat().st_size > 0)

    def _delete_run(self) -> None:
        """Delete what a run writes (and nothing else): checkpoints, metrics, samples and
        the loggers' folders."""
        for checkpoint in self.checkpoints():
            shutil.rmtree(checkpoint)
        for logs in (self.path / name for name in LOG_FOLDERS):
            if logs.is_dir():
                shutil.rmtree(logs)
        for sample in (self.path / "samples").glob("step_*.png"):
            sample.unlink()
        self.metrics_file.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep: int) -> Path:
        """``checkpoints/step_<8 digits>``, filled by ``write(folder)`` in a temporary folder
        and renamed into place; the newest ``keep`` checkpoints are kept.

        A failed write (a full disk) raises ``OSError`` saying so and leaves the earlier
        checkpoints intact.
        """
        target = self.path / "checkpoints" / f"step_{step:08d}"
        try:
            with atomic_directory(target) as staging:
                write(staging)
        except OSError as error:
            earlier = ", ".join(p.name for p in self.checkpoints()) or "none"
            message = (
                f"could not write checkpoint {target.name}: {error.strerror or error}; "
                f"earlier checkpoints are intact ({earlier})"
            )
            raise OSError(*(error.errno, message) if error.errno else (message,)) from error
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old)
        return target

    def restore_latest(self, load: Callable[[Path], T]) -> tuple[Path, T]:
        """``load`` the newest checkpoint that loads; corrupt ones are skipped and reported."""
        skipped: list[str] = []
        for directory in reversed(self.checkpoints()):
            try:
                loaded = load(directory)
            except CorruptCheckpointError as error:
                skipped.append(f"{directory.name} ({error})")
                if self.main:
                    _warn(f"skipping checkpoint {directory.name}: {error}")
                continue
            if skipped and self.main:
                _warn(f"resumed from {directory.name}, skipped {len(skipped)} newer one(s)")
            return directory, loaded
        raise CorruptCheckpointError(
            f"no intact checkpoint to resume in {self.path}: " + "; ".join(skipped)
        )

    # -- metrics -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it must have a ``step``) to ``metrics.jsonl``."""
        if self.main:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def forget_after(self, step: int) -> None:
        """Drop the logged records of steps after ``step`` (resuming from ``step``)."""
        if self.main:
            kept = [r for r in read_metrics(self.path) if r["step"] <= step]
            self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run/metrics.jsonl`` in order; a last line torn by a kill mid-write
    is dropped, any other bad line raises :class:`CorruptCheckpointError` naming it."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = parse_json(line, f"{path} line {number}")
        except CorruptCheckpointError:
            if number == len(lines):
                break
            raise
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CorruptCheckpointError(
                f"{path} line {number} is not a metrics record (a JSON object with an int "
                f"'step'): {line[:80]!r}"
            )
        records.append(record)
    return records


def _warn(message: str) -> None:
    print(f"jetblocks: {message}", file=sys.stderr, flush=True)
