"""Logs people read: a training run's records and sample grids in TensorBoard or W&B.

``metrics.jsonl`` stays the run's record (:class:`~jetblocks.run_folder.RunFolder`); a
:class:`Logger` shows the same records where people look at runs. Each writes inside the run
folder, and nowhere else::

    RUN/tensorboard/   event files (tensorboard --logdir RUN/tensorboard)
    RUN/wandb/         W&B's run folders and its cache; run_id names the W&B run

A record is flattened to scalar tags: nested mappings are joined by ``/``
(``diagnostics/couplings/NAME/at_cap``), booleans become 0 or 1, and values that are not
numbers are left out. Both need the ``logging`` extra (``pip install 'jetblocks[logging]'``).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from jetblocks.optional import require

__all__ = [
    "LOGGER_NAMES",
    "Logger",
    "Loggers",
    "TensorBoardLogger",
    "WandbLogger",
    "flatten",
    "make_loggers",
]

LOGGER_NAMES = ("tensorboard", "wandb")


class Logger(Protocol):
    """Where a run's records and images are shown."""

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Show ``values`` (a record, maybe nested; see :func:`flatten`) at ``step``."""

    def log_image(self, step: int, name: str, pixels: Tensor) -> None:
        """Show uint8 ``pixels`` ``[H, W, C]`` (C = 1 or 3) as image ``name`` at ``step``."""

    def close(self) -> None:
        """Write out everything logged and release the files."""


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``values`` as ``{tag: number}``: nested mappings joined by ``/``, booleans as 0 or 1,
    anything that is not a real number (text, lists, None) left out."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class TensorBoardLogger:
    """Scalars and images in ``RUN/tensorboard``.

    ``start_step``: the step a resumed run restarts from; TensorBoard hides the points the
    interrupted run logged after it (``purge_step``), as ``metrics.jsonl`` forgets them.
    """

    def __init__(self, run_dir: str | os.PathLike, *, start_step: int = 0) -> None:
        tensorboard = require("torch.utils.tensorboard", "--log tensorboard")
        self.writer = tensorboard.SummaryWriter(
            Path(run_dir) / "tensorboard", purge_step=start_step + 1 if start_step else None
        )

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        for tag, value in flatten(values).items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, step: int, name: str, pixels: Tensor) -> None:
        self.writer.add_image(name, pixels.cpu().numpy(), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run whose files are in ``RUN/wandb``; ``config`` is shown as its settings.

    The run's id is kept in ``RUN/wandb/run_id``: training into the folder again (resuming)
    continues the same W&B run. W&B histories only grow, so the steps an interrupted run
    logged after its last checkpoint keep their first values (resumed training repeats the
    same losses). The project is ``WANDB_PROJECT``, or ``jetblocks``; ``WANDB_MODE=offline``
    logs without a network, for ``wandb sync RUN/wandb/offline-run-*``. W&B's service keeps
    its logs in ``RUN/wandb/cache`` unless ``WANDB_CACHE_DIR`` names another folder.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, config: Mapping[str, Any] | None = None
    ) -> None:
        wandb = require("wandb", "--log wandb")
        run_dir = Path(run_dir)
        folder = run_dir / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / "run_id"
        # W&B's service writes its logs to WANDB_CACHE_DIR (~/.cache/wandb), read when the
        # process's first run starts it; W&B's data folder is only for artifacts (not used).
        own_cache = "WANDB_CACHE_DIR" not in os.environ
        if own_cache:
            os.environ["WANDB_CACHE_DIR"] = str(folder / "cache")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "jetblocks"),
                name=run_dir.name,
                id=id_file.read_text().strip() if id_file.is_file() else None,
                resume="allow",
                dir=run_dir,
                config=dict(config or {}),
                settings=wandb.Settings(console="off"),
            )
        finally:
            if own_cache:
                del os.environ["WANDB_CACHE_DIR"]
        id_file.write_text(self.run.id)
        self.wandb = wandb

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if step >= self.run.starting_step:  # W&B drops (and warns of) the steps it has
            self.run.log(flatten(values), step=step)

    def log_image(self, step: int, name: str, pixels: Tensor) -> None:
        if step >= self.run.starting_step:
            self.run.log({name: self.wandb.Image(pixels.cpu().numpy())}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Several loggers used as one (none: nothing is shown); closing empties it."""

    def __init__(self, loggers: Iterable[Logger] = ()) -> None:
        self.loggers = list(loggers)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, values)

    def log_image(self, step: int, name: str, pixels: Tensor) -> None:
        for logger in self.loggers:
            logger.log_image(step, name, pixels)

    def close(self) -> None:
        while self.loggers:
            self.loggers.pop().close()


def make_loggers(
    names: Iterable[str],
    run_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    start_step: int = 0,
) -> Loggers:
    """The loggers ``names`` (of :data:`LOGGER_NAMES`) of the run in ``run_dir``, which
    starts at ``start_step`` (resumed) with settings ``config``."""
    made: list[Logger] = []
    try:
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                made.append(TensorBoardLogger(run_dir, start_step=start_step))
            elif name == "wandb":
                made.append(WandbLogger(run_dir, config=config))
            else:
                raise ValueError(f"unknown logger {name!r}; expected one of {LOGGER_NAMES}")
    except BaseException:
        Loggers(made).close()
        raise
    return Loggers(made)
