"""Training Jet (and models built on it): the reference recipe, checkpoints, exact resume.

The reference recipe (big_vision, ImageNet-64): Adam with b1 = 0.9, b2 = 0.95, eps = 1e-8;
global-norm clipping at 1.0; cosine decay to 0 after a linear warm-up over the first 10% of
steps; weight decay ``wd`` on every parameter, *not* multiplied by the learning rate:
``update = -sched(t) * (lr * adam + wd * theta)``, which is ``torch.optim.AdamW`` with
``weight_decay = wd / lr``. No EMA, float32.

:class:`Trainer` runs any model through a :class:`Task` (its loss, evaluation and samples),
in one process or under ``torchrun`` (DDP or FSDP2), and writes into ``out_dir``:
``checkpoints/step_XXXXXXXX/`` (``config.json``, ``model.safetensors``, ``trainer.json`` +
``trainer.safetensors``: optimizer, scheduler, EMA, data-loader and RNG states, step),
``metrics.jsonl`` and ``samples/step_XXXXXXXX.png``.

Guard rails: a run directory that already holds a run is refused unless resumed or
explicitly overwritten (then only the files a run writes are deleted); resuming falls back
to the newest intact checkpoint and refuses changed training settings; a non-finite loss or
gradient norm stops the run (or skips the step, ``nonfinite="skip"``) before the optimizer
touches the weights, so no checkpoint ever holds NaNs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from jetblocks.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_directory,
    check_config,
    checkpoints_in,
    load_state,
    read_tensors,
    remove_orphans,
    save_state,
    write_model_files,
)
from jetblocks.integrations.distributed import Distributed, wrap_model
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import bits_per_dim, dequantize, to_uint8
from jetblocks.rng import ShardedGenerator


@dataclasses.dataclass
class TrainConfig:
    """How to train; the defaults are the reference recipe."""

    steps: int = 10_000
    batch_size: int = 64  # global: split over ranks and accumulation steps
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-5  # the reference's decoupled decay (not multiplied by lr)
    decay_kernels_only: bool = False  # True: decay nn.Linear weights only (JetFormer's recipe)
    grad_clip: float = 1.0
    warmup_fraction: float = 0.1
    ema_decay: float | None = None
    bf16: bool = False
    grad_accum: int = 1
    compile: bool = False
    distributed: str = "ddp"  # "ddp" or "fsdp" under torchrun
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_temperatures: tuple[float, ...] = (0.5, 0.75, 1.0)
    samples_per_temperature: int = 8
    seed: int = 0
    progress: bool = True
    nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: "stop", or "skip" the step
    max_nonfinite_steps: int = 10  # with "skip": stop after this many bad steps in a row

    def __post_init__(self) -> None:
        self.betas, self.sample_temperatures = tuple(self.betas), tuple(self.sample_temperatures)
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_nonfinite_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 (an int), got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be finite and positive, got {self.lr}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(
                f"TrainConfig.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}"
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


# What may change when a run is resumed: its length (the schedule follows the new total),
# how it is executed, logged, evaluated and saved. Everything else (batch size, lr, seed,
# ...) defines the run and must match its checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "bf16",
        "distributed",
        "compile",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "sample_temperatures",
        "samples_per_temperature",
        "progress",
        "nonfinite",
        "max_nonfinite_steps",
    }
)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (the weights were not updated)."""


def parameter_groups(model: nn.Module, kernels_only: bool) -> Iterable[Any]:
    """All parameters, or ``[kernels, rest with weight_decay 0]`` where kernels are the weights
    of ``nn.Linear`` layers (not embeddings, biases, norms or position embeddings)."""
    if not kernels_only:
        return model.parameters()
    kernels = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    rest = [p for p in model.parameters() if id(p) not in kernels]
    return [{"params": list(kernels.values())}, {"params": rest, "weight_decay": 0.0}]


def reference_optimizer(params: Iterable[Any], config: TrainConfig) -> torch.optim.AdamW:
    """Adam with the reference's decoupled weight decay, as ``AdamW(weight_decay=wd / lr)``."""
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


class Task(Protocol):
    """What a :class:`Trainer` needs to know about a model.

    A task may also define ``set_step(step)``: the trainer calls it before each optimizer
    step with the number of steps done so far (restored on resume).
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


class JetTask:
    """Unconditional Jet: minimise bits/dim of uniformly dequantized uint8 images."""

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


class Trainer:
    """Runs the training loop; see the module docstring for what it writes."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        *,
        model_config: dict[str, Any],
        train_loader: Any,
        eval_batches: Callable[[], Iterable[dict[str, Tensor]]] | None,
        out_dir: str | Path,
        env: Distributed | None = None,
    ) -> None:
        self.task, self.config, self.model_config = task, config, model_config
        self.env = env or Distributed()
        self.out_dir = Path(out_dir)
        self.train_loader, self.eval_batches = train_loader, eval_batches
        self.local_batch = config.local_batch_size(self.env.world_size)
        self.model = model.to(self.env.device)
        self.model = wrap_model(self.model, config.distributed, self.env)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.optimizer = reference_optimizer(
            parameter_groups(self.model, config.decay_kernels_only), config
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.steps, config.warmup_fraction)
        )
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

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.env.device.type, torch.bfloat16, enabled=self.config.bf16)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
        """Train to ``config.steps``.

        ``out_dir`` must not hold another run: with ``resume`` training continues from its
        newest intact checkpoint, with ``overwrite`` the run's own files (checkpoints,
        ``metrics.jsonl``, samples) are deleted first; anything else there is left alone.
        """
        self._prepare_out_dir()
        if resume and checkpoints_in(self.out_dir):
            self.restore_latest()
        else:  # a run killed before its first checkpoint is resumed by starting it again
            if self._holds_a_run():
                if not (overwrite or resume):
                    raise CheckpointError(
                        f"{self.out_dir} already holds a training run; resume it "
                        "(resume=True, --resume) or replace it (overwrite=True, --overwrite)"
                    )
                self._delete_run()
            self.env.barrier()
            if self.env.is_main:
                (self.out_dir / "metrics.jsonl").write_text("")
        batches = iter(self.train_loader)
        progress = self._progress_bar()
        last_eval: dict[str, float] = {}
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < self.config.steps:
            loss = self.train_step(batches)
            interval_steps += 1
            progress.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                seconds = time.perf_counter() - interval_start
                record = {
                    "step": self.step,
                    "loss": self._global_mean(loss),
                    "lr": self.scheduler.get_last_lr()[0],
                    "images_per_s": interval_steps * self.config.batch_size / seconds,
                }
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}"
                )
                self._log(record)
                interval_start, interval_steps = time.perf_counter(), 0
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                last_eval = self.evaluate()
                self._log({"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}})
                self.write_samples()
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
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
        if self._finite(total, norm):
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        else:
            self._on_nonfinite(total, norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return total

    def _finite(self, loss: Tensor, norm: Tensor) -> bool:
        """Whether every rank's loss and the gradient norm are finite (one host sync)."""
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP's DTensor
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).double().reshape(1)
        return self.env.all_sum(bad).item() == 0

    def _on_nonfinite(self, loss: Tensor, norm: Tensor) -> None:
        self.nonfinite_in_a_row += 1
        what = f"loss {loss.item():.4g}, gradient norm {norm.item():.4g}"
        last = checkpoints_in(self.out_dir)
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out means of the task's metrics over every rank's shard (same noise each time)."""
        if self.eval_batches is None:
            return {}
        model = self._eval_model()
        model.eval()
        generator = torch.Generator(self.env.device).manual_seed(10_007 + self.env.rank)
        sums: dict[str, Tensor] = {}
        count = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for batch in self.eval_batches():
            with self.autocast():
                metrics = self.task.evaluate(model, self._to_device(batch), generator)
            for name, values in metrics.items():
                sums[name] = sums.get(name, 0) + values.double().sum()
            count += len(batch["image"])
        model.train()
        totals = self.env.all_sum(torch.stack([count, *sums.values()]))
        return {name: (totals[i + 1] / totals[0]).item() for i, name in enumerate(sums)}

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """A PNG grid: one row of samples per temperature, from a fixed seed."""
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
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        return save_grid(torch.cat(rows), path, ncols=self.config.samples_per_temperature)

    # -- checkpoints ---------------------------------------------------------------------------
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

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
        target = self.out_dir / "checkpoints" / f"step_{self.step:08d}"
        if self.env.is_main:
            trainer_state = {
                "step": self.step,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "loaders": loader_states,
                "noise_rng": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "train_config": dataclasses.asdict(self.config),
            }
            try:
                with atomic_directory(target) as staging:
                    write_model_files(staging, model_state, self.model_config)
                    save_state(staging, "trainer", trainer_state)
            except OSError as error:
                earlier = ", ".join(p.name for p in checkpoints_in(self.out_dir)) or "none"
                message = (
                    f"could not write checkpoint {target.name}: {error.strerror or error}; "
                    f"earlier checkpoints are intact ({earlier})"
                )
                raise OSError(*(error.errno, message) if error.errno else (message,)) from error
            for old in checkpoints_in(self.out_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.env.barrier()
        return target

    def restore_latest(self) -> Path:
        """Restore the newest checkpoint that loads; skipped (corrupt) ones are reported."""
        skipped: list[str] = []
        for directory in reversed(checkpoints_in(self.out_dir)):
            try:
                self.restore(directory)
            except CorruptCheckpointError as error:
                skipped.append(f"{directory.name} ({error})")
                self._warn(f"skipping checkpoint {directory.name}: {error}")
                continue
            if skipped:
                self._warn(f"resumed from {directory.name}, skipped {len(skipped)} newer one(s)")
            return directory
        raise CorruptCheckpointError(
            f"no intact checkpoint to resume in {self.out_dir}: " + "; ".join(skipped)
        )

    def restore(self, directory: Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (same model config, training
        settings and world size); nothing is changed unless every file of it reads."""
        state = load_state(directory, "trainer")
        check_config(self.model_config, directory)
        model_state = read_tensors(directory / "model.safetensors")
        self._check_train_config(state.get("train_config", {}), directory)
        if len(state["loaders"]) != self.env.world_size:
            raise CheckpointError(
                f"{directory} was written by {len(state['loaders'])} processes; resume it with "
                f"the same number (this job has {self.env.world_size})"
            )
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.train_loader.load_state_dict(state["loaders"][self.env.rank])
        self.generator.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        if self.env.is_main:  # forget what was logged after this checkpoint
            log = self.out_dir / "metrics.jsonl"
            kept = [r for r in _read_jsonl(log) if r["step"] <= self.step]
            log.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def _check_train_config(self, saved: dict[str, Any], directory: Path) -> None:
        saved = json.loads(json.dumps(saved))  # tuples and lists compare equal
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        changed = [
            f"{name}: the run has {saved[name]!r}, now {current[name]!r}"
            for name in sorted(set(saved) & set(current) - RESUMABLE_CHANGES)
            if saved[name] != current[name]
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume {directory}: training settings changed ({'; '.join(changed)}); "
                "resume with the run's settings or start a new run"
            )

    # -- run directories ------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        """Create ``out_dir``; remove temporary files a killed save left behind."""
        if not self.env.is_main:
            return
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CheckpointError(f"the run directory {self.out_dir} is a file, not a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        orphans = remove_orphans(self.out_dir / "checkpoints", "step_*")
        orphans += remove_orphans(self.out_dir / "samples", "step_*.png")
        orphans += remove_orphans(self.out_dir, "metrics.jsonl")
        if orphans:
            self._warn(f"removed {len(orphans)} unfinished temporary file(s) of a killed save")

    def _holds_a_run(self) -> bool:
        metrics = self.out_dir / "metrics.jsonl"
        return bool(checkpoints_in(self.out_dir)) or (
            metrics.is_file() and metrics.stat().st_size > 0
        )

    def _delete_run(self) -> None:
        """Delete what a run writes (and nothing else): checkpoints, metrics and samples."""
        if not self.env.is_main:
            return
        for checkpoint in checkpoints_in(self.out_dir):
            shutil.rmtree(checkpoint)
        for sample in (self.out_dir / "samples").glob("step_*.png"):
            sample.unlink()
        (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)

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

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a last line torn by a kill mid-write is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise CheckpointError(f"{path} line {number} is corrupt: {line[:80]!r}") from None
    return records


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl``, in order."""
    return _read_jsonl(Path(out_dir) / "metrics.jsonl")


__all__ = [
    "DivergenceError",
    "JetTask",
    "Task",
    "TrainConfig",
    "Trainer",
    "checkpoints_in",
    "parameter_groups",
    "read_metrics",
    "reference_optimizer",
    "warmup_cosine",
]
