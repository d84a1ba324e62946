r"""Training a model on a task: a short loop, handed its optimizer, schedule and run folder.

:class:`Trainer` runs any model through a :class:`Task` (its loss, evaluation and samples), in
one process or under ``torchrun`` (DDP or FSDP2). What it trains with is given to it:
``optimizer(model, config)`` and ``schedule(config)`` factories (default: the reference recipe
below) and a :class:`~jetblocks.run_folder.RunFolder`, which locks the folder for the run and
holds its checkpoints, metrics and sample grids (shown in TensorBoard or W&B too with
``config.log``, see :mod:`jetblocks.loggers`). On a CPU the model is first
:func:`~jetblocks.acceleration.accelerate`\ d (same weights; ``JETBLOCKS_ACCELERATE=0``
turns it off). The loop adds what every run needs: gradient
accumulation and clipping, an optional EMA of the weights, a guard against non-finite losses,
periodic evaluation, samples and checkpoints, exact resume, and a clean stop on SIGINT or
SIGTERM (a checkpoint is saved first, see :class:`TrainingInterrupted`).

The reference recipe (big_vision, ImageNet-64): Adam with b1 = 0.9, b2 = 0.95, eps = 1e-8;
global-norm clipping at 1.0; cosine decay to 0 after a linear warm-up over the first 10% of
steps; weight decay ``wd`` on every parameter, *not* multiplied by the learning rate:
``update = -sched(t) * (lr * adam + wd * theta)``, which is ``torch.optim.AdamW`` with
``weight_decay = wd / lr``. No EMA, float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from jetblocks.acceleration import accelerate_by_default
from jetblocks.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    check_config,
    checkpoints_in,
    load_state,
    read_tensors,
    save_state,
    write_model_files,
)
from jetblocks.config import Config, setting
from jetblocks.diagnostics import diagnose
from jetblocks.integrations.distributed import Distributed, wrap_model
from jetblocks.integrations.images import save_grid, tile
from jetblocks.likelihood import bits_per_dim, dequantize, to_uint8
from jetblocks.loggers import LOGGER_NAMES, Loggers, make_loggers
from jetblocks.model_card import check_card
from jetblocks.rng import ShardedGenerator
from jetblocks.run_folder import RunFolder, read_metrics
from jetblocks.validation import (
    FLAG,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Choice,
    Items,
    Number,
)

__all__ = [
    "BitsPerDimTask",
    "DivergenceError",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "checkpoints_in",
    "evaluate",
    "read_metrics",
    "reference_optimizer",
    "reference_schedule",
    "warmup_cosine",
]

_UNIT = Number(float, low=0, high=1)
_DECAY = Number(float, low=0, high=1, open_high=True, optional=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train; the defaults are the reference recipe. Fields marked ``resumable``
    may change when a run is resumed (its length, how it runs, logs, evaluates and
    saves); the others define the run and must match its checkpoint."""

    steps: int = setting(10_000, POSITIVE_INT, "optimizer steps in all", resumable=True)
    batch_size: int = setting(
        64, POSITIVE_INT, "global batch size (split over processes and accumulation steps)"
    )
    lr: float = setting(3e-4, POSITIVE, "peak learning rate")
    betas: tuple[float, float] = setting(
        (0.9, 0.95),
        Items(Number(float, low=0, high=1, open_high=True), length=2),
        "Adam's b1 and b2",
    )
    eps: float = setting(1e-8, POSITIVE, "Adam's epsilon")
    weight_decay: float = setting(1e-5, NON_NEGATIVE, "decoupled weight decay (not times lr)")
    grad_clip: float = setting(1.0, POSITIVE, "global gradient-norm clip")
    warmup_fraction: float = setting(0.1, _UNIT, "fraction of steps of linear warm-up")
    ema_decay: float | None = setting(
        None, _DECAY, "keep an EMA of the weights with this decay (evaluated and sampled)"
    )
    bf16: bool = setting(False, FLAG, "bfloat16 autocast (float32 islands)", resumable=True)
    grad_accum: int = setting(1, POSITIVE_INT, "micro-batches per optimizer step")
    compile: bool = setting(False, FLAG, "torch.compile the model", resumable=True)
    distributed: str = setting(
        "ddp", Choice(("ddp", "fsdp")), "data-parallel strategy under torchrun", resumable=True
    )
    eval_every: int = setting(1000, POSITIVE_INT, "steps between evaluations", resumable=True)
    checkpoint_every: int = setting(1000, POSITIVE_INT, "steps between checkpoints", resumable=True)
    keep_checkpoints: int = setting(3, POSITIVE_INT, "newest checkpoints kept", resumable=True)
    log_every: int = setting(50, POSITIVE_INT, "steps between metrics records", resumable=True)
    log: tuple[str, ...] = setting(
        (),
        Items(Choice(LOGGER_NAMES)),
        "also show the records and samples in TensorBoard (RUN/tensorboard) or W&B (RUN/wandb)",
        resumable=True,
    )
    diagnose_every: int = setting(
        1000,
        Number(int, low=0),
        "steps between flow diagnostics on a held-out batch (0: never; jetblocks diagnose)",
        resumable=True,
    )
    sample_temperatures: tuple[float, ...] = setting(
        (0.5, 0.75, 1.0), Items(NON_NEGATIVE), "one row of samples each", resumable=True
    )
    samples_per_temperature: int = setting(8, POSITIVE_INT, "samples per row", resumable=True)
    seed: int = setting(0, SEED, "seed of data order and noise")
    progress: bool = setting(True, FLAG, "show a progress bar", resumable=True)
    nonfinite: str = setting(
        "stop",
        Choice(("stop", "skip")),
        "a NaN/inf loss or gradient norm stops training or skips the step",
        resumable=True,
    )
    max_nonfinite_steps: int = setting(
        10, POSITIVE_INT, "with nonfinite='skip': stop after this many in a row", resumable=True
    )

    def local_batch_size(self, world_size: int) -> int:
        """Examples per rank and micro-step; the global batch must split evenly."""
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by world size x grad_accum "
                f"= {world_size} x {self.grad_accum}"
            )
        return self.batch_size // parts


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (the weights were not updated)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (SIGINT, SIGTERM): ``checkpoint`` holds the last step
    (None if a second signal stopped it at once); ``--resume`` continues exactly."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signal, self.step, self.checkpoint = signal.Signals(signum), step, checkpoint
        how = (
            f"stopped by {self.signal.name} at step {step}; saved {checkpoint}"
            if checkpoint is not None
            else f"stopped at once by a second {self.signal.name} during step {step + 1}; "
            "the last checkpoint is intact"
        )
        super().__init__(f"{how}; continue with resume=True (--resume)")

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 128 + its number."""
        return 128 + int(self.signal)


def reference_optimizer(model: nn.Module | Iterable[Any], config: TrainConfig) -> torch.optim.AdamW:
    """Adam with the reference's decoupled weight decay on every parameter of ``model``
    (or on the given parameter groups), as ``AdamW(weight_decay=wd / lr)``."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay / config.lr,
    )


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """big_vision's schedule factor: ``min(1, t / warmup) * (1 + cos(pi * progress)) / 2``."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
        ramp = min(1.0, step / warmup) if warmup else 1.0
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def reference_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The reference's learning-rate factor per step: :func:`warmup_cosine` over the run."""
    return warmup_cosine(config.steps, config.warmup_fraction)


class Task(Protocol):
    """What a :class:`Trainer` needs to know about a model.

    A task may also define ``set_step(step)``: the trainer calls it before each optimizer
    step with the number of steps done so far (restored on resume); and
    ``diagnose(model, batch, generator) -> dict`` (JSON-ready), logged every
    ``diagnose_every`` steps on the first held-out batch (see :mod:`jetblocks.diagnostics`).
    """

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], generator: ShardedGenerator
    ) -> Tensor:
        """The scalar training loss of a batch; every random draw from ``generator``
        (see :mod:`jetblocks.rng`: K processes draw what one process would)."""

    def evaluate(
        self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Per-example metrics ``{name: [B]}`` of a held-out batch (averaged by the trainer)."""

    def sample(
        self, model: nn.Module, n: int, temperature: float, generator: torch.Generator
    ) -> Tensor:
        """``n`` float images in ``[-1, 1]``."""


class BitsPerDimTask:
    """Any image flow (:class:`~jetblocks.imageflow.ImageFlow`): minimise the bits/dim of
    uniformly dequantized uint8 images; evaluate held-out bits/dim; sample; diagnose its
    couplings (:func:`jetblocks.diagnostics.diagnose`)."""

    def diagnose(
        self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Any]:
        return diagnose(model, batch["image"], generator=generator)

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], generator: ShardedGenerator
    ) -> Tensor:
        return bits_per_dim(*model(dequantize(batch["image"], generator=generator))).mean()

    def evaluate(
        self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        return {"bits_per_dim": model.bits_per_dim(batch["image"], generator=generator)}

    def sample(
        self, model: nn.Module, n: int, temperature: float, generator: torch.Generator
    ) -> Tensor:
        return model.sample(n, temperature, generator=generator)


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    generator: torch.Generator,
    *,
    env: Distributed | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[dict[str, float], int]:
    """``(means, count)``: the task's per-example metrics averaged over ``batches`` (on
    every rank of ``env``) and the number of examples. ``model`` runs in eval mode."""
    env = env or Distributed(device=generator.device)
    training, sums = model.training, {}
    model.eval()
    count = torch.zeros((), dtype=torch.float64, device=env.device)
    for batch in batches:
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            metrics = task.evaluate(model, batch, generator)
        for name, values in metrics.items():
            sums[name] = sums.get(name, 0) + values.double().sum()
        count += len(batch["image"])
    model.train(training)
    totals = env.all_sum(torch.stack([count, *sums.values()]))
    return {name: (totals[i + 1] / totals[0]).item() for i, name in enumerate(sums)}, int(
        totals[0].item()
    )


class Trainer:
    """The training loop (see the module docstring).

    ``out_dir`` is the run's folder (a path or a :class:`RunFolder`); ``optimizer`` and
    ``schedule`` are factories, called once the model is placed and wrapped. ``card``: what
    each checkpoint's model card says besides the model, steps, command and last evaluation
    (``{"data": "mnist5k"}``; see :mod:`jetblocks.model_card`).
    """

    EVAL_SEED: ClassVar[int] = 10_007

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        *,
        model_config: dict[str, Any],
        train_loader: Any,
        eval_batches: Callable[[], Iterable[dict[str, Tensor]]] | None,
        out_dir: str | Path | RunFolder,
        env: Distributed | None = None,
        optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] = reference_optimizer,
        schedule: Callable[[TrainConfig], Callable[[int], float]] = reference_schedule,
        card: Mapping[str, Any] | None = None,
    ) -> None:
        self.task, self.config, self.model_config = task, config, model_config
        self.env = env or Distributed()
        self.run = out_dir if isinstance(out_dir, RunFolder) else RunFolder(out_dir)
        self.run.main = self.env.is_main
        self.train_loader, self.eval_batches = train_loader, eval_batches
        self.local_batch = config.local_batch_size(self.env.world_size)
        self.card = {
            "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "command": list(sys.argv),
            **check_card(card),
        }
        self.last_evaluation: tuple[int, dict[str, float]] | None = None  # (step, means)
        model = accelerate_by_default(model.to(self.env.device), self.env.device)
        self.model = wrap_model(model, config.distributed, self.env)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.optimizer = optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(config))
        self.ema = None
        if config.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
            )
        self.generator = ShardedGenerator(
            config.seed, self.env.device, self.env.rank, self.env.world_size
        )
        self.step = 0
        self.nonfinite_in_a_row = 0
        self._norms: list[Tensor] = []  # gradient norms before clipping, since the last record
        self.loggers = Loggers()  # config.log's, on the main process during fit
        self._stop = _StopRequest()

    @property
    def out_dir(self) -> Path:
        return self.run.path

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.env.device.type, torch.bfloat16, enabled=self.config.bf16)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
        """Train to ``config.steps``; return the last evaluation.

        The run folder is locked for the whole run (:class:`RunFolder`): one holding another
        run is refused unless ``resume`` (continue from its newest intact checkpoint) or
        ``overwrite`` (delete the run's checkpoints, metrics, samples and logs first). SIGINT
        and SIGTERM finish the current step, save a checkpoint and raise
        :class:`TrainingInterrupted`; a second signal stops at once.
        """
        if self.env.is_main:
            self.run.open(resume=resume, overwrite=overwrite)
        try:
            self.env.barrier()
            if resume and self.run.checkpoints():
                self.restore_latest()
            if self.env.is_main:
                config = {"train": self.config.to_dict(), "model": self.model_config}
                self.loggers = make_loggers(
                    self.config.log, self.run.path, config=config, start_step=self.step
                )
            with _stop_on_signals(self._stop):
                return self._loop()
        finally:
            self.loggers.close()
            self.run.close()

    def _loop(self) -> dict[str, float]:
        batches = iter(self.train_loader)
        progress = self._progress_bar()
        last_eval: dict[str, float] = {}
        saved_at = -1
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < self.config.steps:
            loss = self.train_step(batches)
            interval_steps += 1
            progress.update(1)
            last = self.step == self.config.steps
            if self.step % self.config.log_every == 0 or last:
                seconds = time.perf_counter() - interval_start
                record = {
                    "step": self.step,
                    "loss": self._global_mean(loss),
                    "lr": self.scheduler.get_last_lr()[0],
                    "images_per_s": interval_steps * self.config.batch_size / seconds,
                    **self._gradient_record(),
                }
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}"
                )
                self._log(record)
                interval_start, interval_steps = time.perf_counter(), 0
            every = self.config.diagnose_every
            if every and (self.step % every == 0 or last):
                self._log_diagnostics()
            if self.step % self.config.eval_every == 0 or last:
                last_eval = self.evaluate()
                self._log({"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}})
                self.write_samples()
            if self.step % self.config.checkpoint_every == 0 or last:
                self.save_checkpoint()
                saved_at = self.step
            if self._stop.agreed:
                if saved_at != self.step:
                    self.save_checkpoint()
                raise TrainingInterrupted(self._stop.signal, self.step, self._checkpoint_path())
            if interval_steps == 0:  # evaluation and checkpoints do not count as training time
                interval_start = time.perf_counter()
        progress.close()
        return last_eval

    def train_step(self, batches: Iterator[dict[str, Tensor]]) -> Tensor:
        """One optimizer step on the next ``grad_accum`` batches; returns the mean loss."""
        total = torch.zeros((), device=self.env.device)
        if (set_step := getattr(self.task, "set_step", None)) is not None:
            set_step(self.step)  # for step-dependent losses, e.g. a noise curriculum
        for micro in range(self.config.grad_accum):
            batch = self._to_device(next(batches))
            last = micro == self.config.grad_accum - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with self.autocast():
                    loss = self.task.loss(self.forward_model, batch, self.generator)
                (loss / self.config.grad_accum).backward()
            total = total + loss.detach() / self.config.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP's DTensor
        self._norms.append(norm.detach())
        if self._finite_and_agree_on_stopping(total, norm):
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        else:
            self._on_nonfinite(total, norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self._stop.step = self.step
        return total

    def _finite_and_agree_on_stopping(self, loss: Tensor, norm: Tensor) -> bool:
        """Whether every rank's loss and the gradient norm are finite; every rank also learns
        whether any of them was asked to stop (one host sync for both)."""
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).double().reshape(1)
        asked = torch.tensor([float(self._stop.signal is not None)], device=bad.device)
        bad_count, stopping = self.env.all_sum(torch.cat([bad, asked.double()])).tolist()
        if stopping and self._stop.signal is None:
            self._stop.signal = signal.SIGTERM  # another rank was signalled
        self._stop.agreed = bool(stopping)
        return bad_count == 0

    def _on_nonfinite(self, loss: Tensor, norm: Tensor) -> None:
        self.nonfinite_in_a_row += 1
        what = f"loss {loss.item():.4g}, gradient norm {norm.item():.4g}"
        last = self.run.checkpoints()
        kept = f"the last checkpoint ({last[-1].name}) is intact" if last else "nothing was saved"
        if self.config.nonfinite == "stop":
            raise DivergenceError(
                f"training diverged at step {self.step + 1} ({what}); stopped before updating "
                f"the weights, {kept}; lower the learning rate or use nonfinite='skip'"
            )
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise DivergenceError(
                f"training diverged: {self.nonfinite_in_a_row} non-finite steps in a row up to "
                f"step {self.step + 1} ({what}); {kept}"
            )
        self._warn(f"skipped step {self.step + 1}: {what}")

    def evaluate(self) -> dict[str, float]:
        """Held-out means of the task's metrics over every rank's shard (same noise each time)."""
        if self.eval_batches is None:
            return {}
        generator = torch.Generator(self.env.device).manual_seed(self.EVAL_SEED + self.env.rank)
        means, _ = evaluate(
            self.task,
            self._eval_model(),
            self.eval_batches(),
            generator,
            env=self.env,
            autocast=self.autocast(),
        )
        self.last_evaluation = (self.step, means)
        return means

    def _gradient_record(self) -> dict[str, float]:
        """The last gradient norm before clipping (global: every rank clips the same norm),
        and the share of steps since the last record whose norm the clip scaled down."""
        norms, self._norms = torch.stack(self._norms).double(), []
        clipped = (norms > self.config.grad_clip).double().mean()
        return {"grad_norm": norms[-1].item(), "clipped": clipped.item()}

    def _log_diagnostics(self) -> None:
        """The task's diagnostics on each rank's first held-out batch; the main process's
        are logged (every rank runs the model: FSDP gathers its parameters collectively)."""
        diagnose_batch = getattr(self.task, "diagnose", None)
        if diagnose_batch is None or self.eval_batches is None:
            return
        batch = self._to_device(next(iter(self.eval_batches())))
        generator = torch.Generator(self.env.device).manual_seed(self.EVAL_SEED)
        self._log({"step": self.step, "diagnostics": diagnose_batch(
            self._eval_model(), batch, generator)})  # fmt: skip

    def _log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and show it in the loggers (main process)."""
        self.run.log(record)
        self.loggers.log(record["step"], {k: v for k, v in record.items() if k != "step"})

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """A PNG grid: one row of samples per temperature, from a fixed seed (also shown in
        the loggers as ``samples``)."""
        model, rows = self._eval_model(), []
        model.eval()
        for temperature in self.config.sample_temperatures:
            generator = torch.Generator(self.env.device).manual_seed(self.config.seed)
            with self.autocast():
                images = self.task.sample(
                    model, self.config.samples_per_temperature, temperature, generator
                )
            rows.append(to_uint8(images.float()))
        model.train()
        if not self.env.is_main or not rows:
            return None
        ncols = self.config.samples_per_temperature
        self.loggers.log_image(self.step, "samples", tile(torch.cat(rows), ncols))
        return save_grid(torch.cat(rows), self.run.sample_file(self.step), ncols=ncols)

    # -- checkpoints ---------------------------------------------------------------------------
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _checkpoint_path(self) -> Path | None:
        found = self.run.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<8-digit step>`` atomically; keep the last ``keep_checkpoints``.

        Weights that are not finite are never saved (:class:`DivergenceError`); a failed
        write (a full disk) raises ``OSError`` saying so and leaves earlier checkpoints.
        """
        model_state, optimizer_state = get_state_dict(
            self.model, self.optimizer, options=self._options()
        )
        if not all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point()):
            raise DivergenceError(
                f"the weights at step {self.step} are not finite; not saving them"
            )
        loader_states = self.env.gather_objects(self.train_loader.state_dict())
        target = self.run.path / "checkpoints" / f"step_{self.step:08d}"
        if self.env.is_main:
            trainer_state = {
                "step": self.step,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "loaders": loader_states,
                "noise_rng": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "train_config": self.config.to_dict(),
            }

            card = {**self.card, "steps": self.step}
            if self.last_evaluation and self.last_evaluation[1]:
                of = " (of the EMA weights)" if self.ema is not None else ""
                card["metrics_step"] = self.last_evaluation[0]
                card["metrics"] = {f"{k}{of}": v for k, v in self.last_evaluation[1].items()}

            def write(staging: Path) -> None:
                write_model_files(staging, model_state, self.model_config, card)
                save_state(staging, "trainer", trainer_state)

            target = self.run.save_checkpoint(self.step, write, self.config.keep_checkpoints)
        self.env.barrier()
        return target

    def restore_latest(self) -> Path:
        """Restore the newest checkpoint that loads; skipped (corrupt) ones are reported."""
        return self.run.restore_latest(self.restore)[0]

    def restore(self, directory: Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (same model config, training
        settings and world size); nothing is changed unless every file of it reads."""
        state = _checked_trainer_state(load_state(directory, "trainer"), directory)
        check_config(self.model_config, directory)
        model_state = read_tensors(directory / "model.safetensors")
        self._check_train_config(state["train_config"], directory)
        if len(state["loaders"]) != self.env.world_size:
            raise CheckpointError(
                f"{directory} was written by {len(state['loaders'])} processes; resume it with "
                f"the same number (this job has {self.env.world_size})"
            )
        try:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
            _check_optimizer_state(self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            self.train_loader.load_state_dict(state["loaders"][self.env.rank])
            self.generator.set_state(state["noise_rng"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(
                f"{directory} does not fit this run (model, optimizer, loader or random "
                f"states): {type(error).__name__}: {error}"
            ) from None
        self.step = state["step"]
        self.run.forget_after(self.step)

    def _check_train_config(self, saved: dict[str, Any], directory: Path) -> None:
        saved = json.loads(json.dumps(saved))  # tuples and lists compare equal
        current = json.loads(json.dumps(self.config.to_dict()))
        fixed = set(saved) & set(current) - TrainConfig.fields_where("resumable")
        changed = [
            f"{name}: the run has {saved[name]!r}, now {current[name]!r}"
            for name in sorted(fixed)
            if saved[name] != current[name]
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume {directory}: training settings changed ({'; '.join(changed)}); "
                "resume with the run's settings or start a new run"
            )

    # -- helpers --------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        if self.env.is_main:
            print(f"jetblocks: {message}", file=sys.stderr, flush=True)

    def _eval_model(self) -> nn.Module:
        model = self.ema.module if self.ema is not None else self.model
        return getattr(model, "module", model)  # DDP's wrapped module for eval and sampling

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def _global_mean(self, value: Tensor) -> float:
        return (self.env.all_sum(value.detach().double().reshape(1)) / self.env.world_size).item()

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.config.progress and self.env.is_main),
            dynamic_ncols=True,
        )


_TRAINER_STATE = {
    "step": int,
    "optimizer": dict,
    "scheduler": dict,
    "loaders": list,
    "noise_rng": Tensor,
    "torch_rng": Tensor,
    "train_config": dict,
}


def _checked_trainer_state(state: Any, directory: Path) -> dict[str, Any]:
    """``state`` if it has every field a trainer state has, with the right types."""
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{directory}/trainer.json does not hold a trainer state")
    for name, kind in _TRAINER_STATE.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise CorruptCheckpointError(
                f"{directory}/trainer.json: '{name}' must be a {kind.__name__}, got "
                f"{type(state.get(name)).__name__}"
            )
    if not (state.get("ema") is None or isinstance(state["ema"], dict)):
        raise CorruptCheckpointError(f"{directory}/trainer.json: 'ema' must be a dict or null")
    return state


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless every parameter's loaded state holds the same entries, each
    a number or a tensor (of the parameter's shape unless a scalar): what a stranger's
    ``trainer.json`` could break only at the next step, or silently."""
    keys = None
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            if keys is None and state:
                keys = set(state)
            if state and set(state) != keys:
                raise ValueError(f"optimizer states hold different entries: {sorted(state)}")
            for name, value in state.items():
                if isinstance(value, bool) or not isinstance(value, Tensor | int | float):
                    raise ValueError(f"optimizer state {name!r} is a {type(value).__name__}")
                if isinstance(value, Tensor) and value.dim() and value.shape != parameter.shape:
                    raise ValueError(
                        f"optimizer state {name!r} has shape {list(value.shape)}, its "
                        f"parameter {list(parameter.shape)}"
                    )


@dataclasses.dataclass
class _StopRequest:
    """A signal received during :meth:`Trainer.fit` (``signal``), whether every rank has
    learned of it (``agreed``), and the steps done so far."""

    signal: int | None = None
    agreed: bool = False
    step: int = 0


@contextlib.contextmanager
def _stop_on_signals(request: _StopRequest) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set ``request.signal`` (the loop stops after the
    current step); a second SIGINT raises :class:`TrainingInterrupted` at once, while a
    repeated SIGTERM counts once (a launcher such as torchrun forwards the one its process
    group received). Handlers are installed only in the main thread, and the previous ones
    restored afterwards; a process forked meanwhile (a data-loading worker) ignores SIGINT
    and dies on SIGTERM instead of running them (see :func:`_signals_in_forked_child`)."""
    request.signal, request.agreed = None, False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is not None and signum == signal.SIGINT:
            raise TrainingInterrupted(signum, request.step, None)
        request.signal = request.signal or signum  # a repeated SIGTERM (torchrun's) is one

    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _signals_in_forked_child() -> None:
    """A child forked while jetblocks' signal handlers were installed (a data-loading
    worker) leaves SIGINT to its parent, which stops the run, and dies on SIGTERM, rather
    than raising the parent's exceptions in a process that cannot act on them."""
    for signum, action in ((signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)):
        handler = signal.getsignal(signum)
        if getattr(handler, "__module__", "").startswith("jetblocks."):
            signal.signal(signum, action)


os.register_at_fork(after_in_child=_signals_in_forked_child)


def __getattr__(name: str) -> Any:
    if name == "JetTask":
        import warnings

        warnings.warn(
            "jetblocks.train.JetTask is now BitsPerDimTask (it trains any image flow)",
            DeprecationWarning,
            stacklevel=2,
        )
        return BitsPerDimTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
