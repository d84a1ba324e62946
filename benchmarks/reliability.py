"""An adversarial catalogue of what a demanding new user tries: API, files, CLI and faults.

Every case declares the behaviour it expects: ``works`` (the call succeeds and a check
verifies the result) or ``error`` (a clear error; some cases also accept a correct
alternative, e.g. ``sample --out x.jpg`` writing a real JPEG). A case ends in one outcome:

- ``clear_error``: a library call raised ``ValueError`` (and subclasses such as
  ``CheckpointError`` or ``DataError``), ``TypeError``, a jetblocks-specific
  ``RuntimeError`` subclass or a type the case names, and the message names the problem
  (the case's ``mentions``, regular expressions); for the CLI: a non-zero exit whose
  stderr ends with ``jetblocks <command>: error: ...`` (or argparse's ``jetblocks: error:``)
  and holds no traceback;
- ``works``: the call succeeded and the check passed (the documented behaviour);
- ``traceback``: an unexpected exception type (``IndexError``, a raw torch ``RuntimeError``,
  an untranslated ``OSError``, ...), a CLI traceback, or an error that does not name the
  problem;
- ``silent_wrong``: the call succeeded but the result is wrong (or the error came too late);
- ``data_loss``: a file the user had, or a good checkpoint, was deleted, overwritten or
  corrupted;
- ``security``: a file was written outside the place the user named (a stored name that
  escaped ``--out``, a link followed out of it) or hostile input ran code; counted like
  ``data_loss``;
- ``skipped``: the case cannot run here (e.g. as root, where ``chmod`` does not block
  writes), with the reason.

A case is *as expected* (``ok``) when a ``works`` case works, or an ``error`` case gives a
clear error (or the accepted alternative). CLI cases run the installed ``jetblocks``
command in temporary directories, with ``OMP_NUM_THREADS=1`` (where a case is about what
the command does with a file rather than how the process ends, ``jetblocks.cli.main`` runs
in this process: the same code without the cost of starting Python); the JetFormer example
runs as ``python -m examples.jetformer`` from the repository root; models are a small Jet
(8x8 grayscale, 2x2 patches, 4 couplings) with perturbed weights, data the built-in
``digits``. Results go to ``benchmarks/results/reliability.json``.

    python benchmarks/reliability.py            # every case (a few minutes on 2 cores)
    python benchmarks/reliability.py --smoke    # a quick subset (about 8 cases)
    python benchmarks/reliability.py --only resume --out /tmp/resume.json

Groups: ``api``, ``config``, ``checkpoint``, ``big_vision``, ``data``, ``cli``, ``kit``,
``token-metadata`` (names and fields stored in token files), ``example`` (the JetFormer
example's command), ``autoregressive-heads``, ``concurrency`` (runs sharing a folder),
``signals`` (SIGTERM/SIGINT to running commands) and ``fuzzed-parsers`` (seeded mutations of
every file format jetblocks reads).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

OUTCOMES = (
    "works",
    "clear_error",
    "traceback",
    "silent_wrong",
    "data_loss",
    "security",
    "skipped",
)
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
SMALL = dict(
    image_size=(8, 8),
    channels=1,
    patch_size=2,
    depth=4,
    block_depth=1,
    emb_dim=16,
    num_heads=2,
    kinds=("channels", "spatial"),
)
TRAIN = ("--data", "digits", "--steps", "4", "--batch-size", "16", "--no-progress")
TRAIN_EVAL = ("--eval-batch-size", "100")
CLI_ERROR = re.compile(r"^jetblocks( [a-z]+)?: error:")
EXAMPLE_ERROR = re.compile(r"^(jetformer|python -m examples\.jetformer)( [a-z]+)?: error:")
STEP4 = "step_00000004"
# A JetFormer small enough to train 2 steps in a second: a 2-coupling Jet, one decoder block.
JETFORMER_JET = {**SMALL, "depth": 2}
TINY_JETFORMER = (
    "--preset", "cpu-tiny-digits", "--steps", "2", "--batch-size", "8",
    "--eval-batch-size", "100", "--no-progress",
    "--set", "model.depth=1", "--set", "model.width=32", "--set", "model.mlp_dim=64",
    "--set", "model.num_heads=2", "--set", "model.head_dim=16",
    "--set", "model.num_mixtures=2", "--set", "train.samples_per_temperature=2",
    "--set", "model.jet=" + json.dumps(JETFORMER_JET),
)  # fmt: skip
FUZZ_COUNT = 20  # seeded mutations per parser


# -- outcomes ----------------------------------------------------------------------------------
class Verdict(Exception):
    """Ends a case with ``outcome`` (raised by checks and helpers)."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


def wrong(detail: str) -> Verdict:
    return Verdict("silent_wrong", detail)


def lost(detail: str) -> Verdict:
    return Verdict("data_loss", detail)


def breach(detail: str) -> Verdict:
    """A write outside the place the user named, or code run from hostile input."""
    return Verdict("security", detail)


def accepted(detail: str) -> Verdict:
    """An ``error`` case whose call succeeded with the accepted alternative behaviour."""
    return Verdict("works", f"accepted alternative: {detail}")


def skip(reason: str) -> Verdict:
    return Verdict("skipped", reason)


class SetupFailed(Exception):
    """A shared fixture (a saved model, a training run) could not be built."""


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    group: str
    expect: str
    description: str
    fn: Callable[[Context], str | None]
    mentions: tuple[str, ...]
    errors: tuple[type[BaseException], ...]
    smoke: bool


CASES: list[Case] = []


def case(
    group: str,
    expect: str,
    *,
    mentions: tuple[str, ...] = (),
    errors: tuple[type[BaseException], ...] = (),
    smoke: bool = False,
) -> Callable:
    """Register a case: its id is the function's name with dashes, its description the
    docstring.

    ``mentions``: regular expressions (case-insensitive) that the error of an ``error``
    case must all match to count as clear; ``errors``: exception types accepted as clear
    beyond ``ValueError``/``TypeError``/jetblocks ``RuntimeError`` subclasses; ``smoke``:
    part of the quick subset.
    """
    assert expect in ("works", "error"), expect

    def register(fn: Callable[[Context], str | None]) -> Callable[[Context], str | None]:
        name, description = fn.__name__.replace("_", "-"), " ".join((fn.__doc__ or "").split())
        CASES.append(Case(name, group, expect, description, fn, mentions, errors, smoke))
        return fn

    return register


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_clear_type(error: BaseException, extra: tuple[type[BaseException], ...]) -> bool:
    if isinstance(error, (ValueError, TypeError, *extra)):
        return True
    kind = type(error)
    return (
        isinstance(error, RuntimeError)
        and kind is not RuntimeError
        and kind.__module__.startswith("jetblocks")
    )


def run_case(item: Case, ctx: Context) -> dict[str, Any]:
    try:
        detail = item.fn(ctx) or "succeeded"
        if item.expect == "works":
            outcome = "works"
        else:
            outcome, detail = "silent_wrong", f"no error: {detail}"
    except Verdict as verdict:
        outcome, detail = verdict.outcome, verdict.detail
    except SetupFailed as error:
        outcome, detail = "skipped", f"setup failed: {error}"
    except KeyboardInterrupt:
        raise
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        outcome = "clear_error" if is_clear_type(error, item.errors) else "traceback"
        detail = message
    if outcome == "clear_error" and item.expect == "error":
        missing = [m for m in item.mentions if not re.search(m, detail, re.IGNORECASE)]
        if missing:
            outcome = "traceback"
            detail = f"unclear error (does not name {' / '.join(missing)}): {detail}"
    ok = outcome == "works" if item.expect == "works" else outcome in ("clear_error", "works")
    if outcome == "skipped":
        ok = None
    return {
        "id": item.id,
        "group": item.group,
        "description": item.description,
        "expect": item.expect,
        "outcome": outcome,
        "ok": ok,
        "detail": one_line(detail),
    }


# -- fixtures ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def jetblocks_command() -> list[str]:
    script = Path(sys.executable).parent / "jetblocks"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jetblocks.cli"]


class Context:
    """Temporary folders, models and runs shared by the cases (built lazily, once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.command = jetblocks_command()
        self._cache: dict[str, Any] = {}
        self._count = 0

    def dir(self, name: str = "case") -> Path:
        self._count += 1
        path = self.root / f"{self._count:03d}-{name}"
        path.mkdir()
        return path

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = build()
            except Exception as error:
                self._cache[key] = SetupFailed(f"{key}: {one_line(error, 150)}")
        value = self._cache[key]
        if isinstance(value, SetupFailed):
            raise value
        return value

    # models and tensors
    def jet(self, **overrides: Any) -> Any:
        """A small float32 Jet with N(0, 0.1^2) noise on every parameter (seeded)."""
        from jetblocks import Jet, JetConfig

        try:
            torch.manual_seed(0)
            jet = Jet(JetConfig(**{**SMALL, **overrides}))
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for parameter in jet.parameters():
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            return jet.eval()
        except Exception as error:
            raise SetupFailed(f"building the perturbed Jet: {one_line(error, 150)}") from error

    @staticmethod
    def pixels(batch: int = 4, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (batch, 1, 8, 8), generator=generator, dtype=torch.uint8)
        if batch:
            pixels[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
        return pixels

    def floats(self, batch: int = 4) -> torch.Tensor:
        """Pixels at their bin centres in [-1, 1]."""
        return (self.pixels(batch).float() + 0.5) / 127.5 - 1.0

    def context_jet(self) -> Any:
        return self.jet(context_dim=4)

    @staticmethod
    def context(batch: int = 4, dim: int = 4) -> torch.Tensor:
        return torch.randn(batch, 3, dim, generator=torch.Generator().manual_seed(2))

    # files
    def pretrained(self) -> Path:
        """A ``save_pretrained`` folder of the perturbed Jet (read-only: copy to change it)."""

        def build() -> Path:
            path = self.root / "fixture-pretrained"
            self.jet().save_pretrained(path)
            return path

        return self._cached("pretrained model", build)

    def pretrained_copy(self) -> Path:
        target = self.dir("pretrained") / "model"
        shutil.copytree(self.pretrained(), target)
        return target

    def config_file(self) -> Path:
        def build() -> Path:
            from jetblocks import JetConfig

            path = self.root / "fixture-jet.json"
            path.write_text(JetConfig(**SMALL).to_json())
            return path

        return self._cached("config file", build)

    def train_args(self, *extra: str, evaluate: bool = True) -> list[str]:
        """``train`` arguments for the small Jet on digits; later ``extra`` options win."""
        args = ["train", "--config", str(self.config_file()), *TRAIN]
        return [*args, *(TRAIN_EVAL if evaluate else ()), *extra]

    def resume_args(self, run: Path, *extra: str) -> list[str]:
        """The base run's arguments with ``--resume``."""
        return self.train_args("--checkpoint-every", "2", *extra, "--resume", "--out", str(run))

    def base_run(self) -> Path:
        """A finished 4-step run with checkpoints at steps 2 and 4 (copy it to change it)."""

        def build() -> Path:
            out = self.root / "fixture-run"
            proc = self.cli(*self.train_args("--checkpoint-every", "2", "--out", str(out)))
            if proc.returncode != 0:
                raise RuntimeError(f"training failed: {proc.last_line}")
            return out

        return self._cached("base training run", build)

    def run_copy(self) -> Path:
        target = self.dir("run") / "run"
        shutil.copytree(self.base_run(), target)
        return target

    @staticmethod
    def env() -> dict[str, str]:
        """The environment of every process the cases start (one thread each)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("PYTHONSTARTUP", None)
        return env

    def cli(self, *args: str, cwd: Path | None = None, umask: int | None = None) -> Proc:
        try:
            done = subprocess.run(
                [*self.command, *args],
                cwd=cwd or self.root,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=600,
                preexec_fn=None if umask is None else (lambda: os.umask(umask)),
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise Verdict("traceback", f"command timed out: {' '.join(args)}") from error
        return Proc(done.returncode, done.stdout, done.stderr)

    def cli_here(self, *args: str, cwd: Path | None = None) -> Proc:
        """``jetblocks ARGS`` as ``jetblocks.cli.main`` in this process, from ``cwd``; what
        it prints is captured (an exception that escapes ``main`` lands on its stderr)."""
        from jetblocks import cli

        out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
        try:
            os.chdir(cwd or self.root)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(list(args))
                except SystemExit as stop:  # argparse
                    code = stop.code if isinstance(stop.code, int) else 1
                except Exception:
                    traceback.print_exc()
                    code = 1
        finally:
            os.chdir(previous)
        return Proc(code, out.getvalue(), err.getvalue())

    def example(self, *args: str) -> Proc:
        """``python -m examples.jetformer ARGS`` from the repository root."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "examples.jetformer", *args],
                cwd=REPO,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise Verdict("traceback", f"example timed out: {' '.join(args)}") from error
        return Proc(done.returncode, done.stdout, done.stderr)

    def jetformer_run(self, text: bool = False) -> Path:
        """A 2-step run of the tiny JetFormer on digits, conditioned on the class or (``text``)
        on captions with its own tokenizer (read-only: copy it to change it)."""

        def build() -> Path:
            out = self.root / f"fixture-jetformer-{'text' if text else 'class'}"
            conditioning = ("--conditioning", "text") if text else ()
            proc = self.example("train", *TINY_JETFORMER, *conditioning, "--out", str(out))
            if proc.returncode != 0:
                raise RuntimeError(f"training failed: {proc.last_line}")
            return out

        return self._cached(f"jetformer {'text' if text else 'class'} run", build)


def require_success(proc: Proc, pattern: re.Pattern = CLI_ERROR) -> None:
    """Return if the command exited 0; else end the case with its classified failure
    (``pattern``: what a clear error line starts with)."""
    if proc.returncode == 0:
        return
    if "Traceback" in proc.stderr:
        raise Verdict("traceback", f"exit {proc.returncode}, traceback: {proc.last_line}")
    if pattern.match(proc.last_line):
        raise Verdict("clear_error", proc.last_line)
    raise Verdict("traceback", f"exit {proc.returncode}, no error line: {proc.last_line!r}")


def cli_error(proc: Proc, pattern: re.Pattern = CLI_ERROR) -> str:
    """For ``error`` cases: end with the classified error; if it exited 0, return a detail."""
    require_success(proc, pattern)
    return f"exit 0; stdout: {one_line(proc.stdout, 120)}"


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): _sha256(p) for p in files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed(before: dict[str, str], path: Path) -> list[str]:
    after = digest(path) if path.exists() else {}
    return [name for name, value in before.items() if after.get(name) != value]


def state_of(jet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in jet.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def finite_checkpoint(step_dir: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(step_dir / "model.safetensors")
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def loads_cleanly(step_dir: Path) -> str | None:
    """None if the checkpoint's model and trainer state load, else why not."""
    from jetblocks import Jet
    from jetblocks.checkpoint import load_state

    try:
        Jet.from_pretrained(step_dir)
        load_state(step_dir, "trainer")
    except Exception as error:
        return f"{type(error).__name__}: {one_line(error, 100)}"
    return None


def metric_records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def expect_modes(paths: dict[Path, int]) -> str:
    bad = [f"{p.name} {mode(p)} (want {oct(m)})" for p, m in paths.items() if mode(p) != oct(m)]
    if bad:
        raise wrong("with umask 022: " + ", ".join(bad))
    return "modes " + ", ".join(f"{p.name} {mode(p)}" for p in paths)


# == the Jet latent API ========================================================================
@case("api", "works", smoke=True)
def roundtrip_uint8(ctx: Context) -> str:
    """uint8 pixels (all 1,797 digits and random ones) round-trip exactly through encode/decode
    on a perturbed float32 Jet of 16 couplings: to_uint8(decode(encode(pixels)[0])) == pixels."""
    from jetblocks import to_uint8
    from jetblocks.integrations.builtin import digits

    jet = ctx.jet(depth=16)
    pixels = torch.cat([digits("train")[0], digits("test")[0], ctx.pixels(64)])
    with torch.no_grad():
        back = to_uint8(jet.decode(jet.encode(pixels)[0]))
    bad = int((back != pixels).sum())
    if bad:
        raise wrong(f"{bad} of {pixels.numel()} pixels differ after the round trip")
    return f"all {pixels.numel()} pixels equal"


@case("api", "works")
def encode_uint8_bin_centres(ctx: Context) -> str:
    """encode(uint8) without noise is deterministic and uses bin centres (k + 0.5) / 127.5 - 1."""
    jet, pixels = ctx.jet(), ctx.pixels()
    with torch.no_grad():
        first, second = jet.encode(pixels)[0], jet.encode(pixels)[0]
        centres = jet((pixels.float() + 0.5) / 127.5 - 1.0)[0]
    if not torch.equal(first, second):
        raise wrong("two encodes of the same pixels differ (random dequantization by default)")
    error = (first - centres).abs().max().item()
    if error > 1e-5:
        raise wrong(f"tokens are not those of the bin centres (max difference {error:.3g})")
    return "deterministic, bin centres"


@case("api", "works")
def encode_noise_flag(ctx: Context) -> str:
    """encode(uint8, noise=True, generator=g) dequantizes uniformly within each bin, reproducibly
    per seed."""
    jet, pixels = ctx.jet(), ctx.pixels(8)
    with torch.no_grad():
        runs = [
            jet.encode(pixels, noise=True, generator=torch.Generator().manual_seed(s))[0]
            for s in (0, 0, 1)
        ]
        offset = (jet.decode(runs[0]) - (pixels.float() / 127.5 - 1.0)) * 127.5
    if not torch.equal(runs[0], runs[1]) or torch.equal(runs[0], runs[2]):
        raise wrong("noise is not reproducible per seed or does not change with the seed")
    low, high, mean = offset.min().item(), offset.max().item(), offset.mean().item()
    if low < -1e-3 or high > 1 + 1e-3 or not 0.4 < mean < 0.6:
        raise wrong(f"offsets within the bin span [{low:.3f}, {high:.3f}], mean {mean:.3f}")
    return f"offsets in bins: [{low:.3f}, {high:.3f}], mean {mean:.3f}"


@case("api", "works")
def log_prob_uniform_noise(ctx: Context) -> str:
    """log_prob / bits_per_dim of uint8 keep uniform dequantization noise (seed-dependent) and agree
    with each other."""
    jet, pixels = ctx.jet(), ctx.pixels()
    with torch.no_grad():
        bpd = [jet.bits_per_dim(pixels, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        log_p = jet.log_prob(pixels, generator=torch.Generator().manual_seed(0))
    if torch.equal(bpd[0], bpd[1]):
        raise wrong("bits/dim does not depend on the noise seed (no dequantization noise)")
    dims = 64
    expected = (-log_p + dims * math.log(127.5)) / (dims * math.log(2))
    error = (expected - bpd[0]).abs().max().item()
    if error > 1e-4:
        raise wrong(f"bits_per_dim and log_prob disagree by {error:.3g} bits")
    change = (bpd[0] - bpd[1]).abs().max().item()
    return f"bpd {bpd[0].mean():.4f}, changes by up to {change:.2g} with another seed"


@case("api", "works")
def raw_flow_outside_range(ctx: Context) -> str:
    """jet(x), the raw flow, accepts values outside [-1, 1] (defined on R^n) and inverts them."""
    jet = ctx.jet()
    x = 6 * torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) - 3
    with torch.no_grad():
        tokens, logdet = jet(x)
        back, inverse_logdet = jet.inverse(tokens)
    error = (back - x).abs().max().item()
    if error > 1e-4 or (logdet + inverse_logdet).abs().max().item() > 1e-3:
        raise wrong(f"round trip error {error:.3g} for inputs in [-3, 3]")
    return f"round trip error {error:.2g}"


@case("api", "error", mentions=(r"\[-1, 1\]|range",))
def encode_float_out_of_range(ctx: Context) -> str:
    """encode refuses float images outside [-1, 1]."""
    tokens, _ = ctx.jet().encode(3 * ctx.floats())
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("context|nan|finite",))
def encode_nan_context(ctx: Context) -> str:
    """encode with a NaN context is refused."""
    context = ctx.context().fill_(float("nan"))
    tokens, _ = ctx.context_jet().encode(ctx.pixels(), context=context)
    return f"returned tokens, finite: {bool(torch.isfinite(tokens).all())}"


@case("api", "error", mentions=("context|nan|finite",))
def decode_nan_context(ctx: Context) -> str:
    """decode with a NaN context is refused."""
    jet = ctx.context_jet()
    tokens = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0))
    images = jet.decode(tokens, context=ctx.context().fill_(float("nan")))
    return f"returned images, finite: {bool(torch.isfinite(images).all())}"


@case("api", "error", mentions=("context",))
def context_wrong_width(ctx: Context) -> str:
    """A context of the wrong width is refused."""
    tokens, _ = ctx.context_jet().encode(ctx.pixels(), context=ctx.context(dim=5))
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("context",))
def context_batch_mismatch(ctx: Context) -> str:
    """A context whose batch differs from the images' is refused."""
    tokens, _ = ctx.context_jet().encode(ctx.pixels(), context=ctx.context(batch=5))
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("context",))
def context_missing(ctx: Context) -> str:
    """A Jet built with context_dim refuses a call without a context."""
    tokens, _ = ctx.context_jet().encode(ctx.pixels())
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("context",))
def context_unexpected(ctx: Context) -> str:
    """A Jet without context_dim refuses a context instead of ignoring it."""
    tokens, _ = ctx.jet().encode(ctx.pixels(), context=ctx.context())
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("temperature",), smoke=True)
def sample_temperature_negative(ctx: Context) -> str:
    """sample(temperature=-1) is refused naming temperature."""
    return f"sampled {list(ctx.jet().sample(2, temperature=-1.0).shape)}"


@case("api", "error", mentions=("temperature",))
def sample_temperature_nan(ctx: Context) -> str:
    """sample(temperature=nan) is refused naming temperature."""
    images = ctx.jet().sample(2, temperature=float("nan"))
    return f"sampled, finite: {bool(torch.isfinite(images).all())}"


@case("api", "error", mentions=("temperature",))
def sample_temperature_inf(ctx: Context) -> str:
    """sample(temperature=inf) is refused naming temperature."""
    images = ctx.jet().sample(2, temperature=float("inf"))
    return f"sampled, finite: {bool(torch.isfinite(images).all())}"


@case("api", "error", mentions=(r"\bn\b",))
def sample_n_negative(ctx: Context) -> str:
    """sample(n=-1) is refused naming n."""
    return f"sampled {list(ctx.jet().sample(-1).shape)}"


@case("api", "error", mentions=(r"\bn\b",))
def sample_n_float(ctx: Context) -> str:
    """sample(n=2.5) is refused naming n."""
    return f"sampled {list(ctx.jet().sample(2.5).shape)}"


@case("api", "works")
def sample_zero(ctx: Context) -> str:
    """sample(0) returns an empty batch [0, C, H, W]."""
    images = ctx.jet().sample(0)
    if tuple(images.shape) != (0, 1, 8, 8):
        raise wrong(f"shape {list(images.shape)}, expected [0, 1, 8, 8]")
    return "shape [0, 1, 8, 8]"


def _dtype_case(call: str, dtype: torch.dtype) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        jet = ctx.jet()
        if call in ("encode", "forward"):
            inputs = ctx.floats().to(dtype)
            out = jet.encode(inputs)[0] if call == "encode" else jet(inputs)[0]
        else:
            tokens = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
            out = jet.decode(tokens) if call == "decode" else jet.inverse(tokens)[0]
        return f"returned {out.dtype} {list(out.shape)}"

    return run


for _call, _dtype in (
    ("encode", torch.float16),
    ("encode", torch.bfloat16),
    ("encode", torch.float64),
    ("forward", torch.float64),
    ("inverse", torch.float16),
    ("decode", torch.bfloat16),
):
    _name = str(_dtype).removeprefix("torch.")
    _fn = _dtype_case(_call, _dtype)
    _fn.__name__ = f"{_call}_{_name}_into_float32"
    _fn.__doc__ = f"{_name} input to a float32 Jet's {_call} is refused (ValueError)."
    case("api", "error", mentions=(f"{_name}|dtype",))(_fn)


def _empty_case(call: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        jet, images = ctx.jet(), ctx.floats(0)
        with torch.no_grad():
            if call == "encode":
                tokens, logdet = jet.encode(images)
                shapes = (list(tokens.shape), list(logdet.shape))
                expected = ([0, 16, 4], [0])
            else:
                shapes = list(getattr(jet, call)(images).shape)
                expected = [0]
        if shapes != expected:
            raise wrong(f"{call} of an empty batch gave shapes {shapes}, expected {expected}")
        return f"shapes {shapes}"

    return run


for _call in ("encode", "bits_per_dim", "log_prob"):
    _fn = _empty_case(_call)
    _fn.__name__ = f"{_call}_empty_batch"
    _fn.__doc__ = f"{_call} of a float batch of 0 images returns empty results."
    case("api", "works")(_fn)


@case("api", "error", mentions=("uint8|dtype",))
def encode_int64_images(ctx: Context) -> str:
    """int64 images are refused (only uint8 or float)."""
    tokens, _ = ctx.jet().encode(ctx.pixels().long())
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("shape",))
def encode_wrong_channels(ctx: Context) -> str:
    """RGB images into a grayscale Jet are refused naming the shape."""
    tokens, _ = ctx.jet().encode(ctx.pixels().expand(4, 3, 8, 8).contiguous())
    return f"encoded {list(tokens.shape)}"


@case("api", "error", mentions=("shape",))
def decode_wrong_token_shape(ctx: Context) -> str:
    """Tokens of the wrong shape are refused by decode."""
    return f"decoded {list(ctx.jet().decode(torch.zeros(2, 16, 6)).shape)}"


@case("api", "error", mentions=("keep",))
def split_tokens_keep_too_large(ctx: Context) -> str:
    """split_tokens(keep > D) is refused naming keep."""
    from jetblocks import split_tokens

    kept, rest = split_tokens(torch.zeros(2, 16, 4), keep=5)
    return f"split into {list(kept.shape)} and {list(rest.shape)}"


# == JetConfig =================================================================================
@case("config", "error", mentions=("scale_factor",), smoke=True)
def config_scale_inf(ctx: Context) -> str:
    """JetConfig(scale_factor=inf) is refused."""
    from jetblocks import JetConfig

    return f"accepted {JetConfig(**SMALL, scale_factor=math.inf).scale_factor}"


@case("config", "error", mentions=("image_size",))
def config_image_size_3d(ctx: Context) -> str:
    """JetConfig(image_size=(8, 8, 8)) is refused naming image_size."""
    from jetblocks import JetConfig

    return f"accepted {JetConfig(**{**SMALL, 'image_size': (8, 8, 8)}).image_size}"


@case("config", "error", mentions=("depth",))
def config_depth_bool(ctx: Context) -> str:
    """JetConfig(depth=True) is refused (a bool is not a depth)."""
    from jetblocks import JetConfig

    return f"accepted depth={JetConfig(**{**SMALL, 'depth': True}).depth!r}"


@case("config", "error", mentions=("seed",))
def config_seed_huge(ctx: Context) -> str:
    """JetConfig(seed=2**70) is refused naming seed (not an overflow later)."""
    from jetblocks import Jet, JetConfig

    jet = Jet(JetConfig(**SMALL, seed=2**70))
    return f"built a Jet with seed {jet.config.seed}"


@case("config", "error", mentions=("preset", "mnist"))
def config_unknown_preset(ctx: Context) -> str:
    """An unknown preset name is refused listing the presets."""
    from jetblocks import JetConfig

    return f"returned {JetConfig.preset('imagenet32')}"


@case("config", "error", mentions=("num_head",))
def config_unknown_field(ctx: Context) -> str:
    """JetConfig.from_dict with a misspelt field is refused naming it."""
    from jetblocks import JetConfig

    return f"returned {JetConfig.from_dict({**SMALL, 'num_head': 2})}"


# == checkpoints and save_pretrained ===========================================================
@case("checkpoint", "works", smoke=True)
def save_pretrained_keeps_user_files(ctx: Context) -> str:
    """save_pretrained into a folder holding other files keeps them and saves the model."""
    from jetblocks import Jet

    folder = ctx.dir("user") / "my-project"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "data" / "train.csv").write_text("x,y\n1,2\n")
    before, jet = digest(folder), ctx.jet()
    try:
        jet.save_pretrained(folder)
    finally:
        if gone := changed(before, folder):
            raise lost(f"save_pretrained deleted or changed the user's {gone}")
    if not same_state(state_of(Jet.from_pretrained(folder)), state_of(jet)):
        raise wrong("the saved model does not load back equal")
    return "user files kept, model saved"


@case("checkpoint", "error", mentions=("config.json|jetblocks|not",))
def save_pretrained_refuses_foreign(ctx: Context) -> str:
    """save_pretrained refuses a folder whose config.json is not a jetblocks save (and leaves it
    alone)."""
    folder = ctx.dir("foreign") / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (folder / "model.safetensors").write_bytes(b"not jetblocks weights")
    before = digest(folder)
    try:
        ctx.jet().save_pretrained(folder)
    finally:
        if gone := changed(before, folder):
            raise lost(f"save_pretrained overwrote another model's {gone}")
    return "saved over another model's folder"


@case("checkpoint", "works")
def save_pretrained_twice(ctx: Context) -> str:
    """save_pretrained twice into the same folder replaces the first save."""
    from jetblocks import Jet

    folder = ctx.dir("twice") / "model"
    first, second = ctx.jet(), ctx.jet(seed=1)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.mul_(0.5)
    first.save_pretrained(folder)
    second.save_pretrained(folder)
    if not same_state(state_of(Jet.from_pretrained(folder)), state_of(second)):
        raise wrong("the folder does not hold the second model")
    return "second save loads back"


@case("checkpoint", "works")
def save_pretrained_umask(ctx: Context) -> str:
    """save_pretrained honours the umask (022: folder 0755, files 0644)."""
    folder = ctx.dir("umask") / "model"
    jet = ctx.jet()
    with umask(0o022):
        jet.save_pretrained(folder)
    files = {folder: 0o755, folder / "config.json": 0o644, folder / "model.safetensors": 0o644}
    return expect_modes(files)


def _edit_config(ctx: Context, **changes: Any) -> Path:
    folder = ctx.pretrained_copy()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}, indent=2))
    return folder


def _loaded_anyway(folder: Path, ctx: Context) -> str:
    from jetblocks import Jet

    jet = Jet.from_pretrained(folder)
    with torch.no_grad():
        same = torch.allclose(jet(ctx.floats())[0], ctx.jet()(ctx.floats())[0], atol=1e-5)
    return f"loaded; outputs {'equal' if same else 'differ from'} the saved model's"


@case("checkpoint", "error", mentions=("num_heads|config",))
def load_edited_num_heads(ctx: Context) -> str:
    """An edited num_heads in a saved config.json is detected on load."""
    return _loaded_anyway(_edit_config(ctx, num_heads=4), ctx)


@case("checkpoint", "error", mentions=("scale_factor|config",))
def load_edited_scale_factor(ctx: Context) -> str:
    """An edited scale_factor in a saved config.json is detected on load."""
    return _loaded_anyway(_edit_config(ctx, scale_factor=3.0), ctx)


@case("checkpoint", "error", mentions=("checksum|corrupt|hash|digest",), smoke=True)
def load_flipped_bytes(ctx: Context) -> str:
    """Flipped bytes inside model.safetensors are detected (checksum)."""
    folder = ctx.pretrained_copy()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + header_size + header[name]["data_offsets"][0]
    for i in range(start, start + 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return _loaded_anyway(folder, ctx)


@case("checkpoint", "error", mentions=("no-such-model",))
def load_missing_dir(ctx: Context) -> str:
    """from_pretrained of a folder that does not exist names it."""
    from jetblocks import Jet

    Jet.from_pretrained(ctx.root / "no-such-model")
    return "loaded a model from nowhere"


@case("checkpoint", "error", mentions=("model.safetensors",))
def load_missing_weights(ctx: Context) -> str:
    """A model folder without model.safetensors is refused naming it."""
    folder = ctx.pretrained_copy()
    (folder / "model.safetensors").unlink()
    return _loaded_anyway(folder, ctx)


@case("checkpoint", "error", mentions=("config.json",))
def load_config_not_json(ctx: Context) -> str:
    """A config.json that is not JSON is refused naming the file."""
    folder = ctx.pretrained_copy()
    (folder / "config.json").write_text("image_size: 8\n")
    return _loaded_anyway(folder, ctx)


@case("checkpoint", "error", mentions=("model.safetensors",))
def load_truncated_weights(ctx: Context) -> str:
    """A truncated model.safetensors is refused naming the file."""
    folder = ctx.pretrained_copy()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _loaded_anyway(folder, ctx)


@case("checkpoint", "error", mentions=("depth",))
def load_other_config(ctx: Context) -> str:
    """from_pretrained(config=...) of a model made for another depth names the field."""
    from jetblocks import Jet, JetConfig

    Jet.from_pretrained(ctx.pretrained(), config=JetConfig(**{**SMALL, "depth": 2}))
    return "loaded into a 2-layer Jet"


@case("checkpoint", "error", mentions=("checkpoint|config.json",))
def from_pretrained_run_dir(ctx: Context) -> str:
    """Jet.from_pretrained of a training run folder: a clear error, or the newest checkpoint
    loaded."""
    from jetblocks import Jet

    run = ctx.base_run()
    jet = Jet.from_pretrained(run)
    newest = Jet.from_pretrained(checkpoint_dirs(run)[-1])
    if same_state(state_of(jet), state_of(newest)):
        raise accepted("loaded the newest checkpoint")
    return "loaded something other than the newest checkpoint"


# == big_vision import =========================================================================
def _bv_arrays(ctx: Context) -> tuple[Any, dict[str, np.ndarray]]:
    from jetblocks.integrations.big_vision import jet_to_arrays

    jet = ctx.jet()
    return jet, jet_to_arrays(jet)


def _bv_file(ctx: Context, arrays: dict[str, np.ndarray], name: str = "jet.npz") -> Path:
    path = ctx.dir("bv") / name
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _bv_load(path: Path) -> str:
    from jetblocks.integrations.big_vision import load_jet

    jet = load_jet(path)
    finite = all(torch.isfinite(p).all() for p in jet.parameters())
    return f"loaded a Jet (all parameters finite: {finite})"


@case("big_vision", "works")
def bv_roundtrip(ctx: Context) -> str:
    """save_jet then load_jet gives back the same Jet."""
    from jetblocks.integrations.big_vision import load_jet, save_jet

    jet = ctx.jet()
    path = ctx.dir("bv") / "jet.npz"
    save_jet(jet, path)
    loaded = load_jet(path)
    with torch.no_grad():
        error = (loaded(ctx.floats())[0] - jet(ctx.floats())[0]).abs().max().item()
    if error > 1e-6:
        raise wrong(f"loaded Jet's tokens differ by {error:.3g}")
    return f"tokens equal (max difference {error:.2g})"


def _bv_bad_leaf(
    ctx: Context,
    make: Callable[[np.ndarray], np.ndarray],
    name: str = "couplings/dnn/init_proj/kernel",
) -> str:
    _, arrays = _bv_arrays(ctx)
    arrays[name] = make(arrays[name])
    return _bv_load(_bv_file(ctx, arrays))


@case("big_vision", "error", mentions=("nan|finite",), smoke=True)
def bv_nan_leaf(ctx: Context) -> str:
    """A big_vision .npz with a NaN parameter is refused."""

    def poison(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.flat[0] = np.nan
        return a

    return _bv_bad_leaf(ctx, poison)


@case("big_vision", "error", mentions=("int|dtype|float",))
def bv_int_leaf(ctx: Context) -> str:
    """A big_vision .npz with an integer parameter leaf is refused."""
    return _bv_bad_leaf(ctx, lambda a: (a * 10).astype(np.int32))


@case("big_vision", "error", mentions=("bool|dtype|float",))
def bv_bool_leaf(ctx: Context) -> str:
    """A big_vision .npz with a bool parameter leaf is refused."""
    return _bv_bad_leaf(ctx, lambda a: a > 0)


@case("big_vision", "error", mentions=("posemb", "shape"))
def bv_shape_mismatch(ctx: Context) -> str:
    """A parameter leaf whose shape disagrees with the others is refused naming it."""
    return _bv_bad_leaf(ctx, lambda a: a[..., :-1], "couplings/dnn/posemb")


@case("big_vision", "error", mentions=("truncated-jet.npz",))
def bv_truncated_npz(ctx: Context) -> str:
    """A truncated .npz is refused naming the file."""
    _, arrays = _bv_arrays(ctx)
    path = _bv_file(ctx, arrays, "truncated-jet.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _bv_load(path)


@case("big_vision", "error", mentions=("not-a-zip.npz",))
def bv_not_zip(ctx: Context) -> str:
    """A file that is not a zip (.npz) is refused naming the file."""
    path = ctx.dir("bv") / "not-a-zip.npz"
    path.write_text("these are not the arrays you are looking for\n")
    return _bv_load(path)


@case("big_vision", "error", mentions=("missing-jet.npz",), errors=(FileNotFoundError,))
def bv_missing_file(ctx: Context) -> str:
    """A missing .npz file is refused naming it."""
    return _bv_load(ctx.root / "missing-jet.npz")


# == data sources ==============================================================================
@case("data", "works")
def png16_scaled(ctx: Context) -> str:
    """16-bit PNGs in an image folder are scaled to 0..255, not clipped."""
    from PIL import Image

    from jetblocks.integrations.datasets import ImageFolder

    folder = ctx.dir("png16")
    levels = {"a.png": 10, "b.png": 128, "c.png": 255}
    for name, level in levels.items():
        Image.fromarray(np.full((8, 8), level * 257, dtype=np.uint16)).save(folder / name)
    source = ImageFolder(folder, image_size=8, channels=1)
    read = [int(source[i][0].float().mean().round()) for i in range(len(source))]
    if any(abs(r - want) > 1 for r, want in zip(read, levels.values(), strict=True)):
        raise wrong(f"16-bit levels {list(levels.values())} read as {read}")
    return f"read as {read}"


@case("data", "error", mentions=("uint8",))
def npz_float_images(ctx: Context) -> str:
    """An .npz of float images is refused (uint8 expected)."""
    from jetblocks.integrations.datasets import load_npz

    path = ctx.dir("npz") / "floats.npz"
    np.savez(path, images=np.random.default_rng(0).random((10, 8, 8, 1), dtype=np.float32))
    return f"loaded {load_npz(path).image_shape}"


def _image_folder(ctx: Context, count: int) -> Path:
    from PIL import Image

    folder = ctx.dir("images") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return folder


@case("data", "error", mentions=("img_",))
def image_folder_corrupt_file(ctx: Context) -> str:
    """A corrupt image in an image folder is reported, naming the file, before training starts."""
    folder = _image_folder(ctx, 20)
    # A file of the held-out split: it is only read at the first evaluation.
    held_out = sorted(np.random.default_rng(0).permutation(20)[:2])
    bad = folder / f"img_{held_out[0]:02d}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    run = folder.parent / "run"
    proc = ctx.cli(*ctx.train_args("--data", str(folder), "--out", str(run)))
    trained = checkpoint_dirs(run) or any("loss" in r for r in metric_records(run))
    if proc.returncode != 0 and trained and bad.name in proc.stderr:
        raise wrong(f"reported only after training had run: {proc.last_line}")
    return cli_error(proc)


@case("data", "error", mentions=("no .*files|empty|no image",))
def image_folder_empty(ctx: Context) -> str:
    """An empty image folder is refused."""
    folder = ctx.dir("empty") / "images"
    folder.mkdir()
    return cli_error(ctx.cli(*ctx.train_args("--data", str(folder), "--out", str(folder) + "-run")))


@case("data", "error", mentions=("digitz",))
def data_unknown_name(ctx: Context) -> str:
    """An unknown --data name is refused naming it."""
    out = ctx.dir("run") / "run"
    return cli_error(ctx.cli(*ctx.train_args("--data", "digitz", "--out", str(out))))


@case("data", "error", mentions=("8x8", "28x28"))
def data_size_mismatch(ctx: Context) -> str:
    """8x8 digits for a 28x28 preset are refused naming both sizes."""
    out = ctx.dir("run") / "run"
    args = ["train", "--preset", "mnist", *TRAIN, *TRAIN_EVAL, "--out", str(out)]
    return cli_error(ctx.cli(*args))


# == the jetblocks command: train ==============================================================
@case("cli", "works")
def train_basic(ctx: Context) -> str:
    """A 4-step training run writes loadable checkpoints, metrics and samples."""
    run = ctx.base_run()
    steps = [p.name for p in checkpoint_dirs(run)]
    if steps != ["step_00000002", STEP4]:
        raise wrong(f"checkpoints {steps}")
    if problem := loads_cleanly(run / "checkpoints" / STEP4):
        raise wrong(f"newest checkpoint does not load: {problem}")
    if not list((run / "samples").glob("*.png")) or not metric_records(run):
        raise wrong("no samples or no metrics")
    return f"checkpoints {steps}, {len(metric_records(run))} metric records"


@case("cli", "error", mentions=("--resume", "--overwrite"))
def train_existing_run_refused(ctx: Context) -> str:
    """train --out into another run without --resume is refused naming --resume and --overwrite; the
    old run is untouched."""
    run = ctx.run_copy()
    before = digest(run)
    proc = ctx.cli(*ctx.train_args("--steps", "2", "--out", str(run)))
    if gone := changed(before, run):
        raise lost(f"the previous run's files were replaced or deleted: {gone}")
    return cli_error(proc)


@case("cli", "works")
def train_overwrite(ctx: Context) -> str:
    """train --overwrite replaces another run (its newest checkpoint is the new run's)."""
    run = ctx.run_copy()
    require_success(ctx.cli(*ctx.train_args("--steps", "2", "--overwrite", "--out", str(run))))
    steps = [p.name for p in checkpoint_dirs(run)]
    if steps[-1:] != ["step_00000002"]:
        raise wrong(f"after overwriting with a 2-step run the checkpoints are {steps}")
    return f"checkpoints {steps}"


def _nonfinite_checkpoints(run: Path) -> tuple[list[str], list[str]]:
    good, bad = [], []
    for step in checkpoint_dirs(run):
        (good if finite_checkpoint(step) else bad).append(step.name)
    return good, bad


@case("cli", "error", mentions=("step",))
def train_lr_divergence(ctx: Context) -> str:
    """--lr 1e3 divergence stops training with an error naming the step; no non-finite checkpoint is
    saved and good ones stay."""
    run = ctx.dir("diverge") / "run"
    args = ("--lr", "1e3", "--steps", "8", "--checkpoint-every", "1", "--out", str(run))
    proc = ctx.cli(*ctx.train_args(*args))
    good, bad = _nonfinite_checkpoints(run)
    if bad:
        verdict = lost if not good else wrong
        raise verdict(f"non-finite checkpoints saved {bad}; finite ones left {good}")
    if proc.returncode != 0 and not good:
        raise lost("no checkpoint left after the divergence, though the first steps were finite")
    return cli_error(proc)


@case("cli", "error", mentions=("non-?finite|nan",))
def train_nonfinite_skip(ctx: Context) -> str:
    """--on-nonfinite skip --max-nonfinite-steps 2 skips bad steps and stops after 2 in a row; no
    non-finite checkpoint."""
    run = ctx.dir("skip") / "run"
    skipping = ("--on-nonfinite", "skip", "--max-nonfinite-steps", "2")
    args = ("--lr", "1e3", "--steps", "10", "--checkpoint-every", "1", *skipping)
    proc = ctx.cli(*ctx.train_args(*args, "--out", str(run)))
    if "unrecognized arguments" in proc.stderr:
        raise Verdict("traceback", f"options missing: {proc.last_line}")
    good, bad = _nonfinite_checkpoints(run)
    if bad:
        raise (lost if not good else wrong)(f"non-finite checkpoints saved {bad}")
    return cli_error(proc)


@case("cli", "error", mentions=(r"\blr\b",))
def train_resume_changed_lr(ctx: Context) -> str:
    """--resume with a changed --lr is refused naming lr."""
    run = ctx.run_copy()
    return cli_error(ctx.cli(*ctx.resume_args(run, "--lr", "1e-2")))


@case("cli", "error", mentions=("batch.size",))
def train_resume_changed_batch_size(ctx: Context) -> str:
    """--resume with a changed --batch-size is refused naming batch size."""
    run = ctx.run_copy()
    return cli_error(ctx.cli(*ctx.resume_args(run, "--batch-size", "32")))


@case("cli", "works")
def train_resume_finished(ctx: Context) -> str:
    """--resume of a finished run with the same arguments changes nothing."""
    run = ctx.run_copy()
    before = digest(run / "checkpoints")
    require_success(ctx.cli(*ctx.resume_args(run)))
    if gone := changed(before, run / "checkpoints"):
        raise wrong(f"checkpoints changed: {gone}")
    return "checkpoints unchanged"


@case("cli", "works")
def train_resume_truncated_newest(ctx: Context) -> str:
    """--resume falls back to the newest intact checkpoint when the newest is truncated, says which
    it skipped, and continues exactly."""
    from safetensors.torch import load

    run = ctx.run_copy()
    weights = run / "checkpoints" / STEP4 / "model.safetensors"
    original = load(weights.read_bytes())  # not load_file: it maps the file we truncate
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = ctx.cli(*ctx.resume_args(run))
    require_success(proc)
    if STEP4 not in proc.stdout + proc.stderr:
        raise wrong("resumed without saying it skipped the truncated step_00000004")
    if not same_state(load(weights.read_bytes()), original):
        raise wrong("the resumed run's step-4 weights differ from the uninterrupted run's")
    return "skipped the truncated checkpoint, step 4 equal to the uninterrupted run"


@case("cli", "works")
def train_resume_orphan_tmp(ctx: Context) -> str:
    """An orphaned temporary checkpoint folder is cleaned up on the next start."""
    run = ctx.run_copy()
    orphan = run / "checkpoints" / f".{STEP4}.k2j4h5.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half-written")
    require_success(ctx.cli(*ctx.resume_args(run)))
    if orphan.exists():
        raise wrong(f"{orphan.name} is still there")
    return "orphan removed"


@case("cli", "works")
def train_resume_torn_metrics(ctx: Context) -> str:
    """A torn last line in metrics.jsonl does not block --resume."""
    run = ctx.run_copy()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 8.7')
    require_success(ctx.cli(*ctx.resume_args(run)))
    try:
        records = metric_records(run)
    except ValueError as error:
        raise wrong(f"metrics.jsonl still unreadable: {error}") from None
    return f"{len(records)} readable records"


@case("cli", "works")
def train_resume_fresh_dir(ctx: Context) -> str:
    """--resume on a folder with no run yet starts a new run."""
    run = ctx.dir("fresh") / "run"
    require_success(ctx.cli(*ctx.train_args("--resume", "--out", str(run))))
    if [p.name for p in checkpoint_dirs(run)] != [STEP4]:
        raise wrong(f"checkpoints {[p.name for p in checkpoint_dirs(run)]}")
    return "trained from scratch"


@case("cli", "error", mentions=("steps",))
def train_steps_zero(ctx: Context) -> str:
    """train --steps 0 is refused naming steps."""
    out = ctx.dir("run") / "run"
    return cli_error(ctx.cli(*ctx.train_args("--steps", "0", "--out", str(out))))


@case("cli", "error", mentions=("batch.size",))
def train_batch_size_zero(ctx: Context) -> str:
    """train --batch-size 0 is refused naming the batch size."""
    out = ctx.dir("run") / "run"
    return cli_error(ctx.cli(*ctx.train_args("--batch-size", "0", "--out", str(out))))


@case("cli", "error", mentions=("bogus",))
def train_device_bogus(ctx: Context) -> str:
    """train --device bogus is refused naming the device."""
    out = ctx.dir("run") / "run"
    return cli_error(ctx.cli(*ctx.train_args("--device", "bogus", "--out", str(out))))


@case("cli", "error", mentions=("cuda",))
def train_device_cuda_missing(ctx: Context) -> str:
    """train --device cuda on a machine without CUDA is refused."""
    if torch.cuda.is_available():
        raise skip("CUDA is available here")
    out = ctx.dir("run") / "run"
    return cli_error(ctx.cli(*ctx.train_args("--device", "cuda", "--out", str(out))))


@case("cli", "error", mentions=("notes.txt",))
def train_out_is_file(ctx: Context) -> str:
    """train --out pointing at an existing file is refused and the file kept."""
    path = ctx.dir("file") / "notes.txt"
    path.write_text("important\n")
    proc = ctx.cli(*ctx.train_args("--out", str(path)))
    if not path.is_file() or path.read_text() != "important\n":
        raise lost("the file given as --out was replaced")
    return cli_error(proc)


@case("cli", "error", mentions=("locked",))
def train_out_readonly(ctx: Context) -> str:
    """train --out inside a read-only folder is refused naming the path."""
    locked = ctx.dir("readonly") / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / ".probe"
        try:
            probe.write_text("")
            probe.unlink()
            raise skip("chmod 0555 does not block writes here (running as root)")
        except PermissionError:
            pass
        return cli_error(ctx.cli(*ctx.train_args("--out", str(locked / "run"))))
    finally:
        locked.chmod(0o755)


@case("cli", "works")
def train_umask(ctx: Context) -> str:
    """A training run honours the umask (022: folders 0755, files 0644)."""
    run = ctx.dir("umask") / "run"
    require_success(ctx.cli(*ctx.train_args("--out", str(run)), umask=0o022))
    step = run / "checkpoints" / STEP4
    paths = {run: 0o755, step: 0o755, run / "metrics.jsonl": 0o644}
    paths |= {path: 0o644 for path in [*step.iterdir(), *(run / "samples").glob("*.png")]}
    return expect_modes(paths)


@case("cli", "error", mentions=("space|ENOSPC|disk",))
def train_full_disk(ctx: Context) -> str:
    """A full disk during the second checkpoint: one-line error, the previous checkpoint intact and
    loadable."""
    import safetensors.torch

    from jetblocks import checkpoint as checkpoint_module
    from jetblocks import cli

    run = ctx.dir("disk") / "run"
    original, calls = safetensors.torch.save_file, []

    def save_file(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 2:  # checkpoint 1 = model + trainer state; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    patched = [(safetensors.torch, "save_file")]
    patched += [(m, "save_file") for m in (checkpoint_module,) if hasattr(m, "save_file")]
    out, err = io.StringIO(), io.StringIO()
    args = ctx.train_args("--checkpoint-every", "2", "--out", str(run))
    try:
        for module, name in patched:
            setattr(module, name, save_file)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        for module, name in patched:
            setattr(module, name, original)
        first = run / "checkpoints" / "step_00000002"
        if len(calls) > 2 and (problem := loads_cleanly(first) if first.is_dir() else "gone"):
            raise lost(f"the step-2 checkpoint is damaged after the failed save: {problem}")
    if len(calls) <= 2:
        raise skip("could not inject ENOSPC: checkpoints no longer go through save_file")
    proc = Proc(code, out.getvalue(), err.getvalue())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if code != 0 and len(lines) > 1 and "Traceback" not in proc.stderr:
        raise wrong(f"error spans {len(lines)} lines: {proc.last_line}")
    return cli_error(proc)


@case("cli", "error", mentions=("missing.json",))
def train_config_missing(ctx: Context) -> str:
    """train --config pointing at a missing file is refused naming it."""
    out = ctx.dir("run") / "run"
    args = ctx.train_args("--out", str(out))
    args[args.index("--config") + 1] = str(ctx.root / "missing.json")
    return cli_error(ctx.cli(*args))


@case("cli", "error", mentions=("jet.yaml|json",))
def train_config_not_json(ctx: Context) -> str:
    """train --config with a file that is not JSON is refused naming it."""
    folder = ctx.dir("yaml")
    (folder / "jet.yaml").write_text("image_size: [8, 8]\nchannels: 1\n")
    args = ctx.train_args("--out", str(folder / "run"))
    args[args.index("--config") + 1] = str(folder / "jet.yaml")
    return cli_error(ctx.cli(*args))


# == the jetblocks command: sample, encode, decode, eval =======================================
def _sample(ctx: Context, *args: str, cwd: Path | None = None, mask: int | None = None) -> Proc:
    return ctx.cli("sample", "--checkpoint", str(ctx.pretrained()), *args, cwd=cwd, umask=mask)


@case("cli", "error", mentions=(r"--n\b|\bn\b",), smoke=True)
def sample_n_zero(ctx: Context) -> str:
    """sample --n 0 is refused naming n (no ZeroDivisionError)."""
    return cli_error(_sample(ctx, "--n", "0", "--out", str(ctx.dir("s") / "s.png")))


@case("cli", "error", mentions=(r"--n\b|\bn\b",))
def sample_n_negative_cli(ctx: Context) -> str:
    """sample --n -3 is refused naming n."""
    return cli_error(_sample(ctx, "--n", "-3", "--out", str(ctx.dir("s") / "s.png")))


@case("cli", "error", mentions=("temperature",))
def sample_temperature_negative_cli(ctx: Context) -> str:
    """sample --temperature -1 is refused naming temperature."""
    return cli_error(_sample(ctx, "--temperature", "-1", "--out", str(ctx.dir("s") / "s.png")))


@case("cli", "error", mentions=("jpg|jpeg|png",))
def sample_jpg(ctx: Context) -> str:
    """sample --out x.jpg writes a real JPEG, or is refused."""
    path = ctx.dir("jpg") / "x.jpg"
    proc = _sample(ctx, "--n", "4", "--out", str(path))
    if proc.returncode == 0 and path.is_file():
        head = path.read_bytes()[:4]
        if head[:3] == b"\xff\xd8\xff":
            raise accepted("x.jpg is a JPEG")
        return f"x.jpg starts with {head!r} (not a JPEG)"
    return cli_error(proc)


@case("cli", "error", mentions=("grid|folder|director",))
def sample_out_dir(ctx: Context) -> str:
    """sample --out an existing folder is refused; the folder is kept."""
    folder = ctx.dir("outdir") / "pictures"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"my photo")
    before = digest(folder)
    proc = _sample(ctx, "--n", "4", "--out", str(folder))
    if changed(before, folder):
        raise lost("the folder given as --out lost its files")
    return cli_error(proc)


@case("cli", "works")
def sample_umask(ctx: Context) -> str:
    """sample's PNG honours the umask (022: 0644)."""
    path = ctx.dir("umask") / "s.png"
    require_success(_sample(ctx, "--n", "4", "--out", str(path), mask=0o022))
    return expect_modes({path: 0o644})


def _encode(ctx: Context, out: Path, *args: str) -> Proc:
    checkpoint = str(ctx.pretrained())
    return ctx.cli(
        "encode", "--checkpoint", checkpoint, "--data", "digits", *args, "--out", str(out)
    )


def _decode(ctx: Context, tokens: Path, out: Path) -> Proc:
    checkpoint = str(ctx.pretrained())
    return ctx.cli("decode", "--checkpoint", checkpoint, "--tokens", str(tokens), "--out", str(out))


@case("cli", "error", mentions=("limit",))
def encode_limit_negative(ctx: Context) -> str:
    """encode --limit -1 is refused naming limit."""
    from safetensors.torch import load_file

    out = ctx.dir("enc") / "tokens.safetensors"
    proc = _encode(ctx, out, "--limit", "-1")
    if proc.returncode == 0 and out.is_file():
        return f"wrote {list(load_file(out)['tokens'].shape)} tokens"
    return cli_error(proc)


@case("cli", "works")
def encode_decode_cli_roundtrip(ctx: Context) -> str:
    """encode --limit 10 then decode gives back exactly the first 10 test digits."""
    from PIL import Image
    from safetensors.torch import load_file

    from jetblocks.integrations.builtin import digits
    from jetblocks.integrations.images import save_grid

    folder = ctx.dir("codec")
    tokens, decoded, reference = (folder / n for n in ("t.safetensors", "d.png", "r.png"))
    require_success(_encode(ctx, tokens, "--limit", "10", "--batch-size", "8"))
    shape = list(load_file(tokens)["tokens"].shape)
    if shape != [10, 16, 4]:
        raise wrong(f"tokens of shape {shape}, expected [10, 16, 4]")
    require_success(_decode(ctx, tokens, decoded))
    save_grid(digits("test")[0][:10], reference, ncols=4)
    got, want = (np.asarray(Image.open(p)).astype(int) for p in (decoded, reference))
    if got.shape != want.shape or (got != want).any():
        bad = (got != want).sum() if got.shape == want.shape else "shape"
        raise wrong(f"decoded grid differs from the digits: {bad} pixels")
    return "decoded grid equals the digits"


@case("cli", "error", mentions=("wrong.safetensors",))
def decode_tokens_wrong_shape(ctx: Context) -> str:
    """decode of tokens with the wrong shape is refused naming the file."""
    from safetensors.torch import save_file

    path = ctx.dir("dec") / "wrong.safetensors"
    save_file({"tokens": torch.zeros(2, 5, 4)}, path)
    return cli_error(_decode(ctx, path, path.with_suffix(".png")))


@case("cli", "error", mentions=("nothing.safetensors",))
def decode_tokens_missing(ctx: Context) -> str:
    """decode --tokens of a missing file is refused naming it."""
    path = ctx.root / "nothing.safetensors"
    return cli_error(_decode(ctx, path, ctx.dir("dec") / "d.png"))


@case("cli", "error", mentions=("no-run-here",))
def eval_missing_checkpoint(ctx: Context) -> str:
    """eval --checkpoint of a missing folder is refused naming it."""
    missing = str(ctx.root / "no-run-here")
    return cli_error(ctx.cli("eval", "--checkpoint", missing, "--data", "digits"))


@case("cli", "error", mentions=("model.safetensors|checkpoint",))
def eval_checkpoint_no_weights(ctx: Context) -> str:
    """eval --checkpoint of a folder with config.json but no weights is refused."""
    folder = ctx.pretrained_copy()
    (folder / "model.safetensors").unlink()
    return cli_error(ctx.cli("eval", "--checkpoint", str(folder), "--data", "digits"))


# == the property-test kit =====================================================================
class IdentityFlow(nn.Module):
    """A correct identity flow that returns its input tensor itself."""

    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        return y, y.new_zeros(y.shape[0])


class GlowBlock(nn.Module):
    """Actnorm, an invertible 1x1 convolution and an affine coupling with a ReLU MLP."""

    def __init__(self, channels: int = 4, size: int = 2, hidden: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.log_scale = nn.Parameter(0.1 * torch.randn(channels, generator=generator))
        self.bias = nn.Parameter(0.1 * torch.randn(channels, generator=generator))
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(channels, channels))[0])
        half = channels // 2 * size * size
        self.net = nn.Sequential(nn.Linear(half, hidden), nn.ReLU(), nn.Linear(hidden, 2 * half))

    def _coupling(self, h1):
        shift, raw = self.net(h1.flatten(1)).chunk(2, dim=-1)
        return shift.view_as(h1), torch.tanh(raw).view_as(h1)

    def forward(self, x, context=None):
        pixels = x.shape[2] * x.shape[3]
        h = (x + self.bias.view(1, -1, 1, 1)) * self.log_scale.exp().view(1, -1, 1, 1)
        h = torch.einsum("ij,bjhw->bihw", self.weight, h)
        h1, h2 = h.chunk(2, dim=1)
        shift, log_s = self._coupling(h1)
        y = torch.cat([h1, h2 * log_s.exp() + shift], dim=1)
        constant = pixels * (self.log_scale.sum() + torch.linalg.slogdet(self.weight)[1])
        return y, constant + log_s.flatten(1).sum(1)

    def inverse(self, y, context=None):
        pixels = y.shape[2] * y.shape[3]
        y1, y2 = y.chunk(2, dim=1)
        shift, log_s = self._coupling(y1)
        h = torch.cat([y1, (y2 - shift) * torch.exp(-log_s)], dim=1)
        h = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight), h)
        x = h * torch.exp(-self.log_scale).view(1, -1, 1, 1) - self.bias.view(1, -1, 1, 1)
        constant = pixels * (self.log_scale.sum() + torch.linalg.slogdet(self.weight)[1])
        return x, -constant - log_s.flatten(1).sum(1)


class ScalarLogdetFlow(nn.Module):
    """y = 2x, but the log-det is one scalar for the whole batch."""

    def forward(self, x, context=None):
        return 2 * x, torch.tensor(x[0].numel() * math.log(2.0), dtype=x.dtype)

    def inverse(self, y, context=None):
        return y / 2, torch.tensor(-y[0].numel() * math.log(2.0), dtype=y.dtype)


class NotInverseFlow(nn.Module):
    """y = 2x with the right log-det, but an inverse that is off by 0.1."""

    def forward(self, x, context=None):
        return 2 * x, torch.full((x.shape[0],), x[0].numel() * math.log(2.0), dtype=x.dtype)

    def inverse(self, y, context=None):
        return y / 2 + 0.1, torch.full((y.shape[0],), -y[0].numel() * math.log(2.0), dtype=y.dtype)


class FlippedLogdetFlow(nn.Module):
    """y = 2x whose two log-dets both have the wrong sign (they still cancel)."""

    def forward(self, x, context=None):
        return 2 * x, torch.full((x.shape[0],), -x[0].numel() * math.log(2.0), dtype=x.dtype)

    def inverse(self, y, context=None):
        return y / 2, torch.full((y.shape[0],), y[0].numel() * math.log(2.0), dtype=y.dtype)


def _check(flow: Any, **options: Any) -> str:
    from jetblocks.testing import check_flow

    report = check_flow(flow, **options)
    return f"passed {len(report.properties)} properties on {report.examples} examples"


@case("kit", "works")
def kit_identity_returns_input(ctx: Context) -> str:
    """check_flow passes a correct identity flow that returns its input itself."""
    return _check(IdentityFlow(), event_shape=(4,))


@case("kit", "works")
def kit_glow_float64(ctx: Context) -> str:
    """check_flow passes a correct Glow-like block (actnorm, 1x1 conv, affine coupling with a ReLU
    MLP) in float64."""
    return _check(GlowBlock, event_shape=(4, 2, 2))


def _kit_errors() -> tuple[type[BaseException], ...]:
    from jetblocks.testing import FlowCheckError

    return (FlowCheckError,)


@case("kit", "error", mentions=(r"\[\]",), errors=_kit_errors(), smoke=True)
def kit_scalar_logdet(ctx: Context) -> str:
    """check_flow fails a flow with a scalar log-det, showing the received shape []."""
    return _check(ScalarLogdetFlow(), event_shape=(4,))


@case("kit", "error", mentions=("round_trip",), errors=_kit_errors())
def kit_not_invertible(ctx: Context) -> str:
    """check_flow catches a flow whose inverse is not its inverse."""
    return _check(NotInverseFlow(), event_shape=(4,))


@case("kit", "error", mentions=("forward_logdet",), errors=_kit_errors())
def kit_flipped_logdet(ctx: Context) -> str:
    """check_flow catches sign-flipped log-dets that still cancel."""
    return _check(FlippedLogdetFlow(), event_shape=(4,))


@case("kit", "works")
def kit_jet_float32(ctx: Context) -> str:
    """check_flow passes the small Jet in float32."""
    from jetblocks import Jet, JetConfig

    config = JetConfig(**{**SMALL, "image_size": (4, 4), "depth": 2})
    return _check(lambda: Jet(config), event_shape=(1, 4, 4), dtype=torch.float32, max_examples=8)


# == token files: stored names and fields ======================================================
def _encoded(ctx: Context, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of ``count`` distinct random images, and the pixels decode gives back for them."""
    from jetblocks import to_uint8

    jet = ctx.jet()
    with torch.no_grad():
        tokens = jet.encode(ctx.pixels(count, seed=7))[0]
        return tokens, to_uint8(jet.decode(tokens))


def _raw_token_file(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """A token file as anyone could write it: whatever tensors and header fields, with the
    jetblocks marker and a matching digest (nothing checked)."""
    from jetblocks.checkpoint import write_tensors

    write_tensors(path, tensors, header)
    return path


def _token_tensors(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    count = len(tokens)
    return {"tokens": tokens, "index": torch.arange(count), "label": torch.full((count,), -1)}


def _entries_outside(case: Path, out: Path) -> dict[str, str]:
    """Every file, folder and link under ``case`` but not under ``out`` (by relative name:
    a digest, ``dir`` or ``link``); links are not followed."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(case, followlinks=False):
        here = Path(folder)
        if here == out or out in here.parents:
            dirs.clear()
            continue
        for name in [*dirs, *files]:
            path = here / name
            if path == out:
                continue
            key = str(path.relative_to(case))
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = _sha256(path)
    return found


def _decode_into(
    ctx: Context, case: Path, tokens: Path, out: Path, probes: tuple[Path, ...] = ()
) -> Proc:
    """``jetblocks decode --tokens TOKENS --out OUT`` from ``case``; a security breach ends the
    case if anything under ``case`` outside ``out``, or a ``probes`` path, appeared or
    changed."""
    before, probed = _entries_outside(case, out), {p: p.exists() for p in probes}
    checkpoint = str(ctx.pretrained())
    proc = ctx.cli_here(
        "decode", "--checkpoint", checkpoint, "--tokens", str(tokens), "--out", str(out), cwd=case
    )
    after = _entries_outside(case, out)
    escaped = sorted(set(after) - set(before)) + [k for k in before if after.get(k) != before[k]]
    escaped += [str(p) for p, existed in probed.items() if p.exists() and not existed]
    if escaped:
        raise breach(f"decode wrote outside --out: {escaped[:4]} (exit {proc.returncode})")
    return proc


def _written_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())


def _check_written(
    out: Path,
    names: list[Any],
    expected: torch.Tensor,
    markers: list[str | None] | None = None,
) -> str:
    """Each of the ``names``' images is in its own PNG inside ``out`` holding its pixels; a
    ``markers[i]`` must appear in image ``i``'s file name (without its ``.png``)."""
    from PIL import Image

    written = _written_files(out)
    shown = [one_line(repr(str(p.relative_to(out))), 60) for p in written]
    if len(written) < len(names):
        raise lost(f"{len(names)} images but {len(written)} file(s) {shown}: one replaced another")
    if len(written) > len(names):
        raise wrong(f"{len(names)} images but {len(written)} files: {shown}")
    holder: dict[int, Path] = {}
    for path in written:
        relative = path.relative_to(out)
        if any(ord(c) < 32 or c == "\x7f" for c in str(relative)):
            raise wrong(f"a written file name holds control characters: {str(relative)!r}")
        if any(len(part.encode()) > 255 for part in relative.parts):
            raise wrong(f"a written file name part is longer than 255 bytes: {str(relative)!r}")
        pixels = np.asarray(Image.open(path))
        same = [i for i in range(len(names)) if np.array_equal(pixels, expected[i, 0].numpy())]
        if len(same) != 1 or same[0] in holder:
            raise wrong(f"{relative} does not hold exactly one of the images (matches {same})")
        holder[same[0]] = relative
    for i, marker in enumerate(markers or []):
        stem = str(holder[i].with_suffix(""))
        if marker is not None and marker not in stem:
            raise wrong(f"the image of {names[i]!r} is in {str(holder[i])!r}")
    return "wrote " + ", ".join(shown)


def _hostile_names(
    ctx: Context,
    names: list[str],
    *,
    markers: list[str | None] | None = None,
    probes: tuple[Path, ...] = (),
) -> str:
    """Decode a token file whose header holds ``names`` into a fresh ``case/deep/er/out``."""
    case = ctx.dir("names")
    out = case / "deep" / "er" / "out"
    out.parent.mkdir(parents=True)
    names = [name.replace("{case}", str(case)) for name in names]
    tokens, expected = _encoded(ctx, len(names))
    path = _raw_token_file(
        case / "tokens.safetensors", _token_tensors(tokens), {"names": json.dumps(names)}
    )
    require_success(_decode_into(ctx, case, path, out, probes))
    return _check_written(out, names, expected, markers)


@case("token-metadata", "works")
def names_dot_dot(ctx: Context) -> str:
    """A token file's stored name ../escaped_0.png (and ../../escaped_1.png) decodes inside --out:
    nothing is written outside it."""
    return _hostile_names(ctx, ["../escaped_0.png", "../../escaped_1.png"], markers=["0", "1"])


@case("token-metadata", "works")
def names_absolute(ctx: Context) -> str:
    """Absolute stored names (/tmp/x/abs.png, a path beside --out) decode inside --out."""
    probe = Path("/tmp/x/abs.png")
    names = ["/tmp/x/abs.png", "{case}/elsewhere/abs2.png"]
    return _hostile_names(ctx, names, markers=["abs", "abs2"], probes=(probe,))


@case("token-metadata", "works")
def names_nul_byte(ctx: Context) -> str:
    """A stored name holding NUL (nul\\x00byte.png) decodes to a file without it."""
    return _hostile_names(ctx, ["nul\x00byte.png", "other.png"], markers=["byte", "other"])


@case("token-metadata", "works")
def names_control_chars(ctx: Context) -> str:
    """Stored names with terminal escapes and bell (\\x1b[31mred\\x07.png) decode to clean
    names."""
    return _hostile_names(ctx, ["\x1b[31mred\x07.png", "tab\there.png"], markers=["red", "here"])


@case("token-metadata", "works")
def names_backslashes(ctx: Context) -> str:
    """A Windows-style name ..\\..\\x.png cannot climb out of --out."""
    return _hostile_names(ctx, ["..\\..\\x.png", "a\\..\\..\\y.png"], markers=["x", "y"])


@case("token-metadata", "works")
def names_1000_chars(ctx: Context) -> str:
    """1000-character stored names decode to files the file system accepts (cut, distinct)."""
    return _hostile_names(ctx, ["n" * 1000 + ".png", "n" * 999 + "m.png"])


@case("token-metadata", "works")
def names_unusable(ctx: Context) -> str:
    """Stored names with nothing usable (.., an empty string) fall back to the image index."""
    return _hostile_names(ctx, ["..", ""])


@case("token-metadata", "works")
def names_case_collision(ctx: Context) -> str:
    """Cat.png and cat.png decode to two files (they would be one on a case-insensitive disk)."""
    return _hostile_names(ctx, ["Cat.png", "cat.png"], markers=["Cat", "cat"])


@case("token-metadata", "works")
def names_file_and_folder(ctx: Context) -> str:
    """Stored names x and x.png/y.png (a file where the other needs a folder) both decode."""
    return _hostile_names(ctx, ["x", "x.png/y.png"], markers=[None, "y"])


@case("token-metadata", "error", mentions=("link",))
def names_symlinked_subfolder(ctx: Context) -> str:
    """--out holds sub -> a folder outside; a stored name sub/x.png must not be written through
    the link (refused, or written elsewhere inside --out)."""
    case = ctx.dir("link")
    outside, out = case / "outside", case / "out"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    tokens, _ = _encoded(ctx, 2)
    names = ["first.png", "sub/x.png"]
    path = _raw_token_file(
        case / "t.safetensors", _token_tensors(tokens), {"names": json.dumps(names)}
    )
    proc = _decode_into(ctx, case, path, out)
    if list(outside.iterdir()):
        raise breach(f"decode wrote through the link: {[p.name for p in outside.iterdir()]}")
    if proc.returncode == 0:
        files = [p for p in _written_files(out) if not p.is_symlink()]
        raise accepted(f"did not follow the link; wrote {[str(p.relative_to(out)) for p in files]}")
    return cli_error(proc)


def _encode_folder_then_decode(ctx: Context, files: dict[str, str]) -> str:
    """``jetblocks encode`` an image folder holding ``files`` (name -> marker its decoded
    file must carry), then ``jetblocks decode`` into a folder."""
    from PIL import Image

    from jetblocks import to_uint8
    from jetblocks.tokenfile import read_token_file

    case = ctx.dir("stems")
    folder, tokens, out = case / "images", case / "t.safetensors", case / "decoded"
    rng = np.random.default_rng(0)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
            folder / name, quality=95
        )
    checkpoint = str(ctx.pretrained())
    args = ("--data", str(folder), "--split", "all", "--out", str(tokens))
    require_success(ctx.cli_here("encode", "--checkpoint", checkpoint, *args, cwd=case))
    contents = read_token_file(tokens)
    if sorted(contents.names or []) != sorted(files):
        raise wrong(f"encode stored the names {contents.names}, expected {sorted(files)}")
    with torch.no_grad():
        expected = to_uint8(ctx.jet().decode(contents.tokens))
    require_success(_decode_into(ctx, case, tokens, out))
    markers = [files[name] for name in contents.names]
    return _check_written(out, contents.names, expected, markers)


@case("token-metadata", "works")
def names_same_stem(ctx: Context) -> str:
    """An image folder holding cat.png and cat.jpg: encode, then decode into a folder gives two
    files, each holding its own image."""
    return _encode_folder_then_decode(ctx, {"cat.png": "png", "cat.jpg": "jpg"})


@case("token-metadata", "works")
def names_same_stem_subfolder(ctx: Context) -> str:
    """a/x.png and a/x.jpg (in a subfolder) decode to two files, each holding its own image."""
    return _encode_folder_then_decode(ctx, {"a/x.png": "png", "a/x.jpg": "jpg"})


@case("token-metadata", "error", mentions=("b.png|exist",))
def names_existing_file(ctx: Context) -> str:
    """decode into a folder where a stored name's file exists already: refused, the user's file
    kept."""
    case = ctx.dir("exists")
    out = case / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"the user's own picture")
    tokens, expected = _encoded(ctx, 2)
    names = json.dumps(["a.png", "b.png"])
    path = _raw_token_file(case / "t.safetensors", _token_tensors(tokens), {"names": names})
    proc = _decode_into(ctx, case, path, out)
    if (out / "b.png").read_bytes() != b"the user's own picture":
        raise lost("decode replaced the existing b.png")
    if proc.returncode == 0:
        return _check_written(out, ["a.png", "b.png"], expected)
    return cli_error(proc)


def _bad_token_file(
    ctx: Context,
    *,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    header: dict[str, str] | None = None,
    raw: Callable[[bytes], bytes] | None = None,
) -> str:
    """decode of ``bad.safetensors``: 2 images' tokens, with ``tensors`` changed, ``header``
    fields set or the bytes changed by ``raw``."""
    case = ctx.dir("badtok")
    tokens, _ = _encoded(ctx, 2)
    content = _token_tensors(tokens)
    path = _raw_token_file(
        case / "bad.safetensors", tensors(content) if tensors else content, header or {}
    )
    if raw is not None:
        path.write_bytes(raw(path.read_bytes()))
    out = case / "out"
    proc = _decode_into(ctx, case, path, out)
    if proc.returncode == 0:
        return f"decoded into {[str(p.relative_to(out)) for p in _written_files(out)]}"
    return cli_error(proc)


@case("token-metadata", "error", mentions=("bad.safetensors", "names"))
def names_not_json(ctx: Context) -> str:
    """A token file whose 'names' header field is not JSON is refused naming file and field."""
    return _bad_token_file(ctx, header={"names": "not json ["})


@case("token-metadata", "error", mentions=("bad.safetensors", "names"))
def names_wrong_length(ctx: Context) -> str:
    """One stored name for two images is refused naming the field."""
    return _bad_token_file(ctx, header={"names": json.dumps(["only.png"])})


@case("token-metadata", "error", mentions=("bad.safetensors", "names"))
def names_not_strings(ctx: Context) -> str:
    """Stored names that are not strings ([1, null]) are refused naming the field."""
    return _bad_token_file(ctx, header={"names": json.dumps([1, None])})


@case("token-metadata", "error", mentions=("bad.safetensors", "names"))
def names_not_a_list(ctx: Context) -> str:
    """A 'names' field holding a JSON object instead of a list is refused."""
    return _bad_token_file(ctx, header={"names": json.dumps({"0": "a.png", "1": "b.png"})})


@case("token-metadata", "error", mentions=("bad.safetensors", "config"))
def header_config_not_object(ctx: Context) -> str:
    """A 'config' header field that is a JSON list is refused naming the field."""
    return _bad_token_file(ctx, header={"config": "[1, 2]"})


@case("token-metadata", "error", mentions=("bad.safetensors", "index"))
def index_not_distinct(ctx: Context) -> str:
    """An 'index' that repeats a position ([0, 0]) is refused (two images, one file)."""
    return _bad_token_file(ctx, tensors=lambda t: {**t, "index": torch.zeros(2, dtype=torch.long)})


@case("token-metadata", "error", mentions=("bad.safetensors", "index"))
def index_negative(ctx: Context) -> str:
    """A negative 'index' is refused."""
    return _bad_token_file(ctx, tensors=lambda t: {**t, "index": torch.tensor([-1, 0])})


@case("token-metadata", "error", mentions=("bad.safetensors", "index"))
def index_float(ctx: Context) -> str:
    """A float 'index' is refused."""
    return _bad_token_file(ctx, tensors=lambda t: {**t, "index": torch.tensor([0.0, 1.0])})


@case("token-metadata", "error", mentions=("bad.safetensors", "tokens"))
def tokens_int_dtype(ctx: Context) -> str:
    """'tokens' of an integer dtype are refused naming the tensor."""
    return _bad_token_file(ctx, tensors=lambda t: {**t, "tokens": t["tokens"].to(torch.int32)})


@case("token-metadata", "error", mentions=("bad.safetensors", "tokens"))
def tokens_nan(ctx: Context) -> str:
    """'tokens' holding NaN are refused (not decoded into garbage images)."""

    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = t["tokens"].clone()
        tokens[1, 3, 2] = float("nan")
        return {**t, "tokens": tokens}

    return _bad_token_file(ctx, tensors=poison)


@case("token-metadata", "error", mentions=("bad.safetensors", "tokens"))
def tokens_missing(ctx: Context) -> str:
    """A safetensors file without 'tokens' (someone's weights) is refused naming the file."""
    return _bad_token_file(ctx, tensors=lambda t: {"weight": t["tokens"]})


@case("token-metadata", "error", mentions=("bad.safetensors",))
def header_huge(ctx: Context) -> str:
    """A token file declaring a 100 MB header (on a few KB of bytes) is refused naming the file,
    without reading 100 MB."""
    return _bad_token_file(ctx, raw=lambda data: struct.pack("<Q", 100_000_000) + data[8:])


@case("token-metadata", "error", mentions=("bad.safetensors",))
def header_length_past_end(ctx: Context) -> str:
    """A declared header length just past the end of the file is refused naming the file."""
    return _bad_token_file(ctx, raw=lambda data: struct.pack("<Q", len(data)) + data[8:])


@case("token-metadata", "error", mentions=("bad.safetensors",))
def token_file_truncated(ctx: Context) -> str:
    """A truncated token file is refused naming the file."""
    return _bad_token_file(ctx, raw=lambda data: data[: len(data) - len(data) // 3])


# == the JetFormer example's command ===========================================================
def _example_error(ctx: Context, *args: str) -> str:
    return cli_error(ctx.example(*args), EXAMPLE_ERROR)


@case("example", "error", mentions=("--n",))
def example_caption_n_negative(ctx: Context) -> str:
    """python -m examples.jetformer caption --n -2 is refused naming --n."""
    return _example_error(ctx, "caption", "--run", str(ctx.jetformer_run()), "--n", "-2")


def _example_sample(ctx: Context, *args: str) -> str:
    out = ctx.dir("exsample") / "grid.png"
    return _example_error(
        ctx, "sample", "--run", str(ctx.jetformer_run()), "--out", str(out), *args
    )


@case("example", "error", mentions=("guidance",))
def example_sample_guidance_nan(ctx: Context) -> str:
    """sample --guidance nan is refused naming guidance."""
    return _example_sample(ctx, "--guidance", "nan")


@case("example", "error", mentions=("temperature",))
def example_sample_temperature_negative(ctx: Context) -> str:
    """sample --temperature -1 is refused naming temperature."""
    return _example_sample(ctx, "--temperature", "-1")


@case("example", "error", mentions=("per-prompt",))
def example_sample_per_prompt_zero(ctx: Context) -> str:
    """sample --per-prompt 0 is refused naming --per-prompt."""
    return _example_sample(ctx, "--per-prompt", "0")


@case("example", "error", mentions=("42",))
def example_sample_class_out_of_range(ctx: Context) -> str:
    """sample --prompt 42 on a 10-class run is refused in one line naming 42 and the classes."""
    return _example_sample(ctx, "--prompt", "42", "--per-prompt", "1")


@case("example", "works")
def example_sample_class(ctx: Context) -> str:
    """sample --prompt 3 --per-prompt 2 writes one row of two images."""
    from PIL import Image

    out = ctx.dir("exsample") / "grid.png"
    args = ("--prompt", "3", "--per-prompt", "2", "--out", str(out))
    require_success(ctx.example("sample", "--run", str(ctx.jetformer_run()), *args), EXAMPLE_ERROR)
    size = Image.open(out).size
    if size != (16, 8):
        raise wrong(f"a grid of {size[0]}x{size[1]} pixels, expected one row of two 8x8 images")
    return "one row of two images"


@case("example", "error", mentions=("tokenizer.model",))
def example_corrupt_tokenizer(ctx: Context) -> str:
    """caption on a text run whose tokenizer.model is garbage is refused naming the file."""
    run = ctx.dir("extext") / "run"
    shutil.copytree(ctx.jetformer_run(text=True), run)
    (run / "tokenizer.model").write_bytes(random.Random(0).randbytes(300))
    return _example_error(ctx, "caption", "--run", str(run), "--n", "2")


def _example_train(ctx: Context, *args: str) -> str:
    out = ctx.dir("extrain") / "run"
    return _example_error(ctx, "train", *TINY_JETFORMER, *args, "--out", str(out))


@case("example", "error", mentions=("steps",))
def example_train_steps_zero(ctx: Context) -> str:
    """train --steps 0 is refused naming steps."""
    return _example_train(ctx, "--steps", "0")


@case("example", "error", mentions=("lr",))
def example_train_lr_negative(ctx: Context) -> str:
    """train --lr -1 is refused naming lr."""
    return _example_train(ctx, "--lr", "-1")


@case("example", "error", mentions=("seed",))
def example_train_seed_negative(ctx: Context) -> str:
    """train --seed -1 is refused naming seed."""
    return _example_train(ctx, "--seed", "-1")


@case("example", "error", mentions=("in use",))
def example_two_trains_one_out(ctx: Context) -> str:
    """A second train into the --out of a running one is refused naming the holding process; the
    first keeps running."""
    out = ctx.dir("extwo") / "run"
    command = [sys.executable, "-m", "examples.jetformer", "train", *TINY_JETFORMER]
    long_run = ("--steps", "100000", "--log-every", "100000")
    with _background(ctx, [*command, *long_run, "--out", str(out)], cwd=REPO) as first:
        _wait_until(first, lambda: _holds_lock(out, first.pid), "the first train to lock --out")
        second = ctx.example("train", *TINY_JETFORMER, "--out", str(out))
        if first.poll() is not None:
            raise wrong(f"the first train stopped (exit {first.returncode}) during the second")
    _names_holder(second, first.pid, EXAMPLE_ERROR)
    return cli_error(second, EXAMPLE_ERROR)


# == background processes ======================================================================
@contextlib.contextmanager
def _background(ctx: Context, command: list[str], cwd: Path | None = None) -> Iterator[Any]:
    """A process started here, killed (by its handle) if it still runs when the block ends."""
    proc = subprocess.Popen(
        command,
        cwd=cwd or ctx.root,
        env=ctx.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=60)


def _wait_until(proc: Any, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll ``ready`` while ``proc`` runs; a process that ends first ends the case."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            ended = Proc(proc.returncode, out, err)
            if ended.returncode == 0:
                raise skip(f"the process finished before {what}")
            require_success(ended, re.compile(f"{CLI_ERROR.pattern}|{EXAMPLE_ERROR.pattern}"))
        if time.monotonic() > deadline:
            raise Verdict("traceback", f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def _names_holder(proc: Proc, pid: int, pattern: re.Pattern = CLI_ERROR) -> None:
    """A clear refusal that does not name the holding process ``pid`` is unclear."""
    clear = pattern.match(proc.last_line) and "Traceback" not in proc.stderr
    if proc.returncode != 0 and clear and f"process {pid}" not in proc.last_line:
        raise Verdict("traceback", f"does not name process {pid}: {proc.last_line}")


def _holds_lock(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / ".lock").read_text()).get("pid") == pid
    except (OSError, ValueError, AttributeError):
        return False


def _logged_steps(run: Path) -> list[int]:
    """The steps of the loss records of ``run/metrics.jsonl`` (a torn last line skipped)."""
    path, steps = run / "metrics.jsonl", []
    text = path.read_text() if path.is_file() else ""
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "loss" in record:
                steps.append(record["step"])
    return steps


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


# == autoregressive models and their heads =====================================================
class RunningMean(nn.Module):
    """A causal decoder: ``h_t = tanh(W x_t + mean(x_0 .. x_t))``; no KV cache."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.proj = nn.Linear(width, width)
        with torch.no_grad():
            self.proj.weight.copy_(0.3 * torch.randn(width, width, generator=generator))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        total = x.cumsum(1)
        count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        if cache is not None:
            total, count = total + cache["sum"], count + cache["count"]
            cache["sum"], cache["count"] = total[:, -1:], count[:, -1:]
        return torch.tanh(self.proj(x) + total / count)


class CachedRunningMean(RunningMean):
    """:class:`RunningMean` with a cache: the running sum and count of earlier positions."""

    def new_cache(self, max_len: int) -> dict:
        return {"sum": 0.0, "count": 0}


def _ar_parts(batch: int = 2, width: int = 8, dim: int = 3) -> tuple[Any, nn.Module, torch.Tensor]:
    """A seeded GMM head, an embedding of its tokens and a prefix ``[batch, 2, width]``."""
    from jetblocks import GMMHead

    torch.manual_seed(0)
    head, embed = GMMHead(width, 2, dim), nn.Linear(dim, width)
    prefix = torch.randn(batch, 2, width, generator=torch.Generator().manual_seed(1))
    return head, embed, prefix


def _soft_tokens(decoder: nn.Module, count: int = 5, **options: Any) -> torch.Tensor:
    from jetblocks.autoregressive import sample_soft_tokens

    head, embed, prefix = _ar_parts()
    generator = torch.Generator().manual_seed(2)
    return sample_soft_tokens(decoder, head, embed, prefix, count, generator=generator, **options)


@case("autoregressive-heads", "error", mentions=("num_mixtures",))
def gmm_head_zero_mixtures(ctx: Context) -> str:
    """GMMHead(8, 0, 4) (no mixture components) is refused naming num_mixtures."""
    from jetblocks import GMMHead

    return f"built {GMMHead(8, 0, 4)}"


@case("autoregressive-heads", "error", mentions=(r"\bdim\b",))
def gmm_head_negative_dim(ctx: Context) -> str:
    """GMMHead(8, 2, -3) is refused naming dim."""
    from jetblocks import GMMHead

    return f"built {GMMHead(8, 2, -3)}"


@case("autoregressive-heads", "error", mentions=("temperature",))
def gmm_sample_temperature_negative(ctx: Context) -> str:
    """GMMHead.sample(h, temperature=-1) is refused naming temperature."""
    head, _, _ = _ar_parts()
    return f"sampled {list(head.sample(torch.randn(2, 3, 8), temperature=-1.0).shape)}"


@case("autoregressive-heads", "error", mentions=("temperature",))
def gmm_sample_temperature_nan(ctx: Context) -> str:
    """GMMHead.sample(h, temperature=nan) is refused naming temperature."""
    head, _, _ = _ar_parts()
    tokens = head.sample(torch.randn(2, 3, 8), temperature=float("nan"))
    return f"sampled, finite: {bool(torch.isfinite(tokens).all())}"


@case("autoregressive-heads", "error", mentions=("GMMHead", r"\b8\b"))
def gmm_head_wrong_width(ctx: Context) -> str:
    """Hidden states of the wrong width into a GMMHead are refused naming the width."""
    head, _, _ = _ar_parts()
    return f"mixture of {list(head(torch.randn(2, 3, 6)).means.shape)}"


@case("autoregressive-heads", "error", mentions=("shape",))
def sample_guided_shape_mismatch(ctx: Context) -> str:
    """sample_guided with conditional and unconditional mixtures of different shapes is refused."""
    from jetblocks import sample_guided

    head, _, _ = _ar_parts()
    h = torch.randn(2, 3, 8)
    return f"sampled {list(sample_guided(head(h), head(h[:, :2]), 2.0).shape)}"


@case("autoregressive-heads", "error", mentions=("guidance",))
def soft_tokens_guidance_nan(ctx: Context) -> str:
    """sample_soft_tokens(..., guidance=nan) is refused naming guidance."""
    _, _, prefix = _ar_parts()
    tokens = _soft_tokens(RunningMean(), guidance=float("nan"), uncond_prefix=prefix.clone())
    return f"sampled, finite: {bool(torch.isfinite(tokens).all())}"


@case("autoregressive-heads", "error", mentions=("uncond_prefix",))
def soft_tokens_guidance_without_uncond(ctx: Context) -> str:
    """Guidance without an unconditional prefix is refused naming uncond_prefix."""
    return f"sampled {list(_soft_tokens(RunningMean(), guidance=2.0).shape)}"


@case("autoregressive-heads", "error", mentions=("sampler",))
def soft_tokens_unknown_sampler(ctx: Context) -> str:
    """sample_soft_tokens(sampler='fancy') is refused naming the sampler."""
    _, _, prefix = _ar_parts()
    options = dict(guidance=2.0, uncond_prefix=prefix.clone(), sampler="fancy")
    return f"sampled {list(_soft_tokens(RunningMean(), **options).shape)}"


@case("autoregressive-heads", "works")
def soft_tokens_zero(ctx: Context) -> str:
    """sample_soft_tokens with 0 tokens returns the empty [B, 0, d]."""
    tokens = _soft_tokens(RunningMean(), count=0)
    if tuple(tokens.shape) != (2, 0, 3):
        raise wrong(f"shape {list(tokens.shape)}, expected [2, 0, 3]")
    return "shape [2, 0, 3]"


@case("autoregressive-heads", "works")
def soft_tokens_decoder_without_cache(ctx: Context) -> str:
    """A decoder without new_cache samples with the default use_cache, giving the tokens of
    use_cache=False."""
    default, recomputed = _soft_tokens(RunningMean()), _soft_tokens(RunningMean(), use_cache=False)
    if default.shape != (2, 5, 3) or not torch.equal(default, recomputed):
        raise wrong(f"default {list(default.shape)} differs from use_cache=False")
    return "same tokens as use_cache=False"


@case("autoregressive-heads", "error", mentions=("new_cache",))
def soft_tokens_use_cache_without_cache(ctx: Context) -> str:
    """use_cache=True on a decoder without new_cache is a clear TypeError naming new_cache."""
    return f"sampled {list(_soft_tokens(RunningMean(), use_cache=True).shape)}"


@case("autoregressive-heads", "works")
def soft_tokens_cache_matches_recompute(ctx: Context) -> str:
    """A decoder with a cache samples (by default with it) the tokens of full recomputation."""
    cached, recomputed = (
        _soft_tokens(CachedRunningMean(), count=6, use_cache=use) for use in (None, False)
    )
    error = (cached - recomputed).abs().max().item()
    if cached.shape != (2, 6, 3) or error > 1e-4:
        raise wrong(f"cached tokens differ from recomputed ones by {error:.3g}")
    return f"max difference {error:.2g}"


@case("autoregressive-heads", "error", mentions=("keep",))
def split_tokens_float_keep(ctx: Context) -> str:
    """split_tokens(t, 2.0) is refused naming keep (not silently sliced)."""
    from jetblocks import split_tokens

    kept, rest = split_tokens(torch.zeros(2, 16, 4), 2.0)
    return f"split into {list(kept.shape)} and {list(rest.shape)}"


@case("autoregressive-heads", "error", mentions=("batch",))
def image_bpd_batch_mismatch(ctx: Context) -> str:
    """image_bits_per_dim with gmm_nll of 2 images and factored dims of 3 is refused."""
    from jetblocks import image_bits_per_dim

    bpd = image_bits_per_dim(torch.rand(2, 16), torch.randn(3, 16, 2), torch.zeros(2), 64)
    return f"returned {list(bpd.shape)}"


@case("autoregressive-heads", "error", mentions=("num_dims",))
def nats_to_bpd_zero_dims(ctx: Context) -> str:
    """nats_to_bits_per_dim(x, logdet, 0) is refused naming num_dims (no division by zero)."""
    from jetblocks.likelihood import nats_to_bits_per_dim

    return f"returned {nats_to_bits_per_dim(torch.ones(2), torch.zeros(2), 0).tolist()}"


@case("autoregressive-heads", "error", mentions=("generator",))
def log_prob_int_generator(ctx: Context) -> str:
    """log_prob(x, generator=123) (a seed, not a Generator) is refused naming generator."""
    return f"returned {ctx.jet().log_prob(ctx.pixels(), generator=123).tolist()}"


@case("autoregressive-heads", "error", mentions=("meta",))
def encode_meta_tensor(ctx: Context) -> str:
    """encode of a tensor on the meta device (no data) is refused naming the device."""
    images = torch.empty(4, 1, 8, 8, dtype=torch.uint8, device="meta")
    tokens, _ = ctx.jet().encode(images)
    return f"returned tokens on {tokens.device}"


@case("autoregressive-heads", "works")
def causal_mask_zero(ctx: Context) -> str:
    """causal_mask(0) is the empty [0, 0] mask."""
    from jetblocks.autoregressive import causal_mask

    mask = causal_mask(0)
    if tuple(mask.shape) != (0, 0) or mask.dtype != torch.bool:
        raise wrong(f"{mask.dtype} {list(mask.shape)}")
    return "bool [0, 0]"


@case("autoregressive-heads", "error", mentions=("queries",))
def causal_mask_negative(ctx: Context) -> str:
    """causal_mask(-1) is refused naming queries."""
    from jetblocks.autoregressive import causal_mask

    return f"returned {list(causal_mask(-1).shape)}"


@case("autoregressive-heads", "error", mentions=("total_steps",))
def noise_curriculum_negative_steps(ctx: Context) -> str:
    """NoiseCurriculum(total_steps=-5) is refused naming total_steps."""
    from jetblocks import NoiseCurriculum

    return f"sigma(0) = {NoiseCurriculum(total_steps=-5).sigma(0)}"


@case("autoregressive-heads", "error", mentions=("step",))
def noise_curriculum_negative_step(ctx: Context) -> str:
    """A NoiseCurriculum called at step -1 is refused naming step."""
    from jetblocks import NoiseCurriculum

    noisy = NoiseCurriculum(total_steps=10)(ctx.pixels(), -1)
    return f"noised at step -1: {list(noisy.shape)}"


@case("autoregressive-heads", "error", mentions=("max_std",))
def input_noise_negative(ctx: Context) -> str:
    """add_input_noise(tokens, max_std=-1) is refused naming max_std."""
    from jetblocks.autoregressive import add_input_noise

    return f"returned {list(add_input_noise(torch.zeros(2, 4, 3), -1.0).shape)}"


@case("autoregressive-heads", "error", mentions=("kept",))
def decode_soft_tokens_too_many_dims(ctx: Context) -> str:
    """decode_soft_tokens with more kept dims than a token has is refused."""
    from jetblocks.autoregressive import decode_soft_tokens

    return f"decoded {list(decode_soft_tokens(ctx.jet(), torch.zeros(2, 16, 5)).shape)}"


# == runs that share a folder ==================================================================
@case("concurrency", "error", mentions=("in use",))
def two_trains_started_together(ctx: Context) -> str:
    """Two jetblocks train processes started together into one --out: one runs, the other stops
    in one line naming the holder's pid; metrics.jsonl holds one run's steps in order."""
    run = ctx.dir("together") / "run"
    command = [
        *ctx.command,
        *ctx.train_args("--steps", "300", "--log-every", "10", "--out", str(run)),
    ]
    ended: dict[int, Proc] = {}
    with _background(ctx, command) as one, _background(ctx, command) as two:
        for proc in (one, two):
            out, err = proc.communicate(timeout=600)
            ended[proc.pid] = Proc(proc.returncode, out, err)
    codes = {pid: proc.returncode for pid, proc in ended.items()}
    steps = _logged_steps(run)
    if steps != list(range(10, 301, 10)):
        raise lost(f"metrics.jsonl holds the loss steps {steps[:8]}... ({len(steps)} records)")
    winners = [pid for pid, code in codes.items() if code == 0]
    if len(winners) != 1:
        raise wrong(f"exit codes {sorted(codes.values())}: {len(winners)} runs trained")
    loser = next(proc for pid, proc in ended.items() if pid != winners[0])
    lines = [line for line in loser.stderr.splitlines() if line.strip()]
    _names_holder(loser, winners[0])
    if loser.returncode != 0 and "Traceback" not in loser.stderr and len(lines) != 1:
        raise wrong(f"the refusal spans {len(lines)} lines: {lines[:3]}")
    return cli_error(loser)


@case("concurrency", "works")
def stale_lock_taken_over(ctx: Context) -> str:
    """A .lock left by a dead process (its pid in the file) does not block a new run."""
    run = ctx.dir("stale") / "run"
    run.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = {"pid": int(dead.stdout), "host": os.uname().nodename, "command": "jetblocks train",
              "since": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    (run / ".lock").write_text(json.dumps(holder))
    require_success(ctx.cli_here(*ctx.train_args("--out", str(run))))
    if [p.name for p in checkpoint_dirs(run)] != [STEP4]:
        raise wrong(f"checkpoints {[p.name for p in checkpoint_dirs(run)]}")
    return f"trained past the lock of dead process {holder['pid']}"


def _second_while_running(ctx: Context, *extra: str) -> str:
    """While a train runs into --out, a second ``train ... EXTRA`` into it must be refused
    naming the first's pid, and leave the running run alone."""
    run = ctx.dir("busy") / "run"
    options = ("--steps", "5000", "--log-every", "1", "--checkpoint-every", "5000")
    command = [*ctx.command, *ctx.train_args(*options, "--out", str(run))]
    with _background(ctx, command) as first:
        _wait_until(first, lambda: len(_logged_steps(run)) >= 2, "the first run's records")
        logged = _logged_steps(run)
        second = ctx.cli_here(*ctx.train_args(*options, *extra, "--out", str(run)))
        after = _logged_steps(run)
        running = first.poll() is None and _holds_lock(run, first.pid)
    if after[: len(logged)] != logged:
        raise lost(f"the running run's metrics went from {logged[:4]}... to {after[:4]}...")
    if not running:
        raise wrong(f"the first run stopped or lost its lock (exit {first.returncode})")
    _names_holder(second, first.pid)
    return cli_error(second)


@case("concurrency", "error", mentions=("in use",))
def resume_while_running(ctx: Context) -> str:
    """train --resume into the --out of a running train is refused naming its pid."""
    return _second_while_running(ctx, "--resume")


@case("concurrency", "error", mentions=("in use",))
def overwrite_while_running(ctx: Context) -> str:
    """train --overwrite into the --out of a running train is refused; nothing of the running
    run is deleted."""
    return _second_while_running(ctx, "--overwrite")


# == signals ===================================================================================
def _signal_train(ctx: Context, signum: int, code: int) -> str:
    name = signal.Signals(signum).name
    run = ctx.dir(name.lower()) / "run"
    options = ("--log-every", "1", "--checkpoint-every", "10000", "--eval-every", "10000")
    command = [*ctx.command, *ctx.train_args("--steps", "5000", *options, "--out", str(run))]
    with _background(ctx, command) as proc:
        _wait_until(proc, lambda: bool(_logged_steps(run)), "the first metrics record")
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            raise Verdict("traceback", f"still running 300 s after {name}") from None
    ended = Proc(proc.returncode, out, err)
    if "Traceback" in err:
        raise Verdict("traceback", f"exit {proc.returncode}, traceback: {ended.last_line}")
    if proc.returncode != code or name not in ended.last_line:
        raise wrong(f"exit {proc.returncode} (expected {code}), last line {ended.last_line!r}")
    saved = checkpoint_dirs(run)
    if not saved:
        raise lost(f"no checkpoint saved on {name}")
    step = int(saved[-1].name.removeprefix("step_"))
    said = re.search(r"at step (\d+)", ended.last_line)
    if said and int(said[1]) != step:
        raise wrong(f"says step {said[1]}, saved {saved[-1].name}")
    if problem := loads_cleanly(saved[-1]):
        raise lost(f"the checkpoint saved on {name} does not load: {problem}")
    if _logged_steps(run)[-1:] != [step]:
        raise wrong(f"saved step {step} but logged up to {_logged_steps(run)[-1:]}")
    resumed = ctx.cli_here(*ctx.train_args("--steps", str(step + 2), *options, "--resume",
                                           "--out", str(run)))  # fmt: skip
    require_success(resumed)
    if _logged_steps(run) != list(range(1, step + 3)):
        raise wrong(f"after --resume the loss steps are {_logged_steps(run)}")
    return f"exit {code} at step {step} ({one_line(ended.last_line, 70)}); resumed to {step + 2}"


@case("signals", "works")
def sigterm_train(ctx: Context) -> str:
    """SIGTERM to a running train: exit 143, one line naming SIGTERM, a checkpoint of the step
    reached, and --resume continues from it."""
    return _signal_train(ctx, signal.SIGTERM, 143)


@case("signals", "works")
def sigint_train(ctx: Context) -> str:
    """SIGINT (Ctrl-C) to a running train: exit 130, a checkpoint, and --resume continues."""
    return _signal_train(ctx, signal.SIGINT, 130)


@case("signals", "works")
def sigterm_encode(ctx: Context) -> str:
    """SIGTERM to jetblocks encode mid-run: exit 143 in one line, and no partial token file (nor
    temporary file) left at --out."""
    folder = ctx.dir("encsig")
    out = folder / "tokens.safetensors"
    args = ("--data", "digits", "--split", "train", "--batch-size", "1", "--out", str(out))
    command = [*ctx.command, "encode", "--checkpoint", str(ctx.pretrained()), *args]
    with _background(ctx, command, cwd=folder) as proc:
        _wait_until(proc, lambda: _catches(proc.pid, signal.SIGTERM), "encode to catch SIGTERM")
        time.sleep(2.0)
        if proc.poll() is not None:
            raise skip("encode finished within 2 s of starting to encode")
        proc.send_signal(signal.SIGTERM)
        out_text, err_text = proc.communicate(timeout=300)
        ended = Proc(proc.returncode, out_text, err_text)
    if "Traceback" in ended.stderr:
        raise Verdict("traceback", f"exit {ended.returncode}, traceback: {ended.last_line}")
    if ended.returncode != 143 or "SIGTERM" not in ended.last_line:
        raise wrong(f"exit {ended.returncode}, last line {ended.last_line!r}")
    left = sorted(p.name for p in folder.iterdir())
    if left:
        raise wrong(f"left {left} at --out's folder after SIGTERM")
    return f"exit 143 ({ended.last_line}), nothing left"


# == fuzzed parsers: seeded mutations of every file format jetblocks reads =====================
BYTE_KINDS = ("overwrite", "truncate", "flip-header", "length", "insert", "random-file", "flip")
JSON_KINDS = ("semantic", "overwrite", "semantic", "truncate", "semantic", "insert", "flip")
HOSTILE_JSON: tuple[Any, ...] = (
    None, True, -1, 0, 2**70, 1e308, float("nan"), float("inf"), "x", "", [], {}, [1, 2, 3],
    {"__tensor__": "no.such.tensor"}, {"__int_keys__": {"x": 1}}, {"__tuple__": 5},
)  # fmt: skip
Fields = Callable[[bytes], list[tuple[int, str]]]


def _mutations(
    data: bytes,
    seed: int,
    *,
    fields: Fields | None = None,
    semantic: Callable[[random.Random], tuple[str, bytes]] | None = None,
    kinds: tuple[str, ...] = BYTE_KINDS,
    count: int = FUZZ_COUNT,
) -> Iterator[tuple[str, bytes]]:
    """``count`` seeded mutations of ``data`` as ``(label, bytes)``: random bytes written or
    inserted, truncations at random offsets, bits flipped (in the first 64 bytes: the header),
    declared lengths changed (at the ``fields(data)`` offsets, struct formats), whole random
    files and ``semantic`` ones (a parsed value replaced)."""
    rng = random.Random(seed)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "length" and fields is None:
            kind = "flip"
        if kind == "semantic" and semantic is None:
            kind = "overwrite"
        mutated = bytearray(data)
        if kind == "overwrite":
            at, size = rng.randrange(len(mutated)), rng.randint(1, 16)
            mutated[at : at + size] = rng.randbytes(size)
            label = f"{size} random bytes written at {at}"
        elif kind == "truncate":
            at = rng.randrange(len(mutated))
            del mutated[at:]
            label = f"truncated to {at} bytes"
        elif kind == "flip-header":
            spots = sorted(rng.sample(range(min(len(mutated), 64)), 3))
            for at in spots:
                mutated[at] ^= 1 << rng.randrange(8)
            label = f"header bits flipped at {spots}"
        elif kind == "flip":
            at, bit = rng.randrange(len(mutated)), rng.randrange(8)
            mutated[at] ^= 1 << bit
            label = f"bit {bit} flipped at {at}"
        elif kind == "length":
            label = _change_length(mutated, rng, fields(data))
        elif kind == "insert":
            at, size = rng.randrange(len(mutated)), rng.randint(1, 64)
            mutated[at:at] = rng.randbytes(size)
            label = f"{size} random bytes inserted at {at}"
        elif kind == "random-file":
            mutated = bytearray(rng.randbytes(rng.randint(0, 512)))
            label = f"a file of {len(mutated)} random bytes"
        else:
            label, changed_bytes = semantic(rng)
            mutated = bytearray(changed_bytes)
        yield f"seed {seed} mutation {i} ({label})", bytes(mutated)


def _change_length(data: bytearray, rng: random.Random, fields: list[tuple[int, str]]) -> str:
    """Set one declared length (or size, offset, count) to a hostile value."""
    fields = [(at, fmt) for at, fmt in fields if at + struct.calcsize(fmt) <= len(data)]
    if not fields:
        data[0] ^= 0xFF
        return "first byte inverted (no length field)"
    at, fmt = rng.choice(fields)
    (old,) = struct.unpack_from(fmt, data, at)
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    values = [
        v for v in (0, 1, old - 1, old + 1, 2 * old, top, rng.randrange(top + 1)) if 0 <= v <= top
    ]
    value = rng.choice(values)
    struct.pack_into(fmt, data, at, value)
    return f"declared length at byte {at} changed from {old} to {value}"


def _json_semantic(text: bytes) -> Callable[[random.Random], tuple[str, bytes]]:
    """Mutations that replace (or delete) one value anywhere in the JSON ``text``."""
    original = json.loads(text)

    def mutate(rng: random.Random) -> tuple[str, bytes]:
        tree = json.loads(text)
        spots: list[tuple[Any, Any, str]] = []

        def walk(node: Any, where: str) -> None:
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                spots.append((node, key, f"{where}[{key!r}]"))
                if isinstance(value, (dict, list)) and len(spots) < 5000:
                    walk(value, f"{where}[{key!r}]")

        if not isinstance(original, (dict, list)) or not original:
            return "replaced by null", b"null"
        walk(tree, "")
        node, key, where = rng.choice(spots)
        if rng.random() < 0.2:
            del node[key]
            return f"deleted {where}", json.dumps(tree).encode()
        value = rng.choice(HOSTILE_JSON)
        node[key] = value
        return f"{where} = {value!r}", json.dumps(tree).encode()

    return mutate


class CliRefused(ValueError):
    """A command exited with a clear one-line error (for the fuzz tallies)."""


def _fuzz(
    items: Iterator[tuple[str, Any]],
    attempt: Callable[[Any], Any],
    names: str,
    extra: tuple[type[BaseException], ...] = (),
) -> str:
    """Run ``attempt`` on every mutation: each must succeed (``attempt`` may return how, e.g.
    ``"fell back"``) or raise a clear error whose message matches ``names`` (the file it
    read). The case ends with the first mutation that did neither (its label reproduces it)
    and how many did neither, else with the tally."""
    tally: Counter[str] = Counter()
    failed: list[Verdict] = []
    for label, payload in items:
        try:
            how = attempt(payload)
            tally[how if isinstance(how, str) else "loaded"] += 1
        except Verdict as verdict:
            failed.append(Verdict(verdict.outcome, f"{label}: {verdict.detail}"))
        except Exception as error:
            message = f"{type(error).__name__}: {one_line(error, 120)}"
            if not is_clear_type(error, extra):
                failed.append(Verdict("traceback", f"{label}: {message}"))
            elif not re.search(names, str(error)):
                unclear = f"unclear error (does not name {names})"
                failed.append(Verdict("traceback", f"{label}: {unclear}: {message}"))
            else:
                tally[type(error).__name__] += 1
    total = len(failed) + sum(tally.values())
    if failed:
        first = failed[0]
        raise Verdict(first.outcome, f"{len(failed)} of {total} mutations failed; {first.detail}")
    refused = total - sum(count for how, count in tally.items() if how[:1].islower())
    kinds = ", ".join(f"{how} {count}" for how, count in tally.most_common())
    raise Verdict("clear_error", f"{refused} of {total} mutations cleanly refused ({kinds})")


def _safetensors_fields(data: bytes) -> list[tuple[int, str]]:
    return [(0, "<Q")]


def _zip_fields(data: bytes) -> list[tuple[int, str]]:
    """Sizes, name lengths and offsets of a zip's (an .npz's) headers, and .npy header lengths."""
    fields: list[tuple[int, str]] = []
    for match in re.finditer(rb"PK\x03\x04", data):
        at = match.start()
        fields += [(at + 18, "<I"), (at + 22, "<I"), (at + 26, "<H"), (at + 28, "<H")]
        (name_length,) = struct.unpack_from("<H", data, at + 26)
        npy = at + 30 + name_length
        if data[npy : npy + 6] == b"\x93NUMPY":
            fields.append((npy + 8, "<H"))
    for match in re.finditer(rb"PK\x01\x02", data):
        at = match.start()
        fields += [(at + 20, "<I"), (at + 24, "<I"), (at + 28, "<H"), (at + 42, "<I")]
    end = data.rfind(b"PK\x05\x06")
    if end >= 0:
        fields += [(end + 10, "<H"), (end + 12, "<I"), (end + 16, "<I")]
    return fields


def _png_fields(data: bytes) -> list[tuple[int, str]]:
    """Every chunk's length, and the IHDR's width and height."""
    fields, at = [(16, ">I"), (20, ">I")], 8
    while at + 8 <= len(data):
        fields.append((at, ">I"))
        at += 12 + struct.unpack_from(">I", data, at)[0]
    return fields


def _png_with_crc(data: bytes) -> Callable[[random.Random], tuple[str, bytes]]:
    """Mutations of IHDR (a huge size) or IDAT bytes whose chunk CRC is fixed, so that only
    decoding can tell."""

    def mutate(rng: random.Random) -> tuple[str, bytes]:
        mutated = bytearray(data)
        # a chunk: length (4 bytes), type (4), data (length), CRC of type and data (4)
        if rng.random() < 0.5:
            width, height = rng.choice([(0, 8), (2**31 - 1, 2**31 - 1), (100_000, 100_000), (9, 8)])
            struct.pack_into(">II", mutated, 16, width, height)
            start, end, label = 12, 29, f"IHDR {width}x{height} with a valid CRC"
        else:
            start = data.find(b"IDAT")
            end = start + 4 + struct.unpack_from(">I", data, start - 4)[0]
            at = rng.randrange(start + 4, end)
            mutated[at] ^= 1 << rng.randrange(8)
            label = f"IDAT byte {at} changed, CRC fixed"
        struct.pack_into(">I", mutated, end, zlib.crc32(bytes(mutated[start:end])))
        return label, bytes(mutated)

    return mutate


def _jpeg_fields(data: bytes) -> list[tuple[int, str]]:
    """Segment lengths, and the frame's height and width."""
    fields = []
    for at in range(2, len(data) - 8):
        if data[at] == 0xFF and data[at + 1] in (0xC0, 0xC4, 0xDA, 0xDB, 0xE0):
            fields.append((at + 2, ">H"))
            if data[at + 1] == 0xC0:
                fields += [(at + 5, ">H"), (at + 7, ">H")]
    return fields


def _pickle_fields(data: bytes) -> list[tuple[int, str]]:
    """The lengths of a pickle's strings and bytes, and its memo indices."""
    formats = {"BINUNICODE": "<I", "BINSTRING": "<I", "BINBYTES": "<I", "SHORT_BINSTRING": "<B",
               "SHORT_BINBYTES": "<B", "SHORT_BINUNICODE": "<B", "BINPUT": "<B", "BINGET": "<B",
               "LONG_BINPUT": "<I", "LONG_BINGET": "<I", "LONG1": "<B"}  # fmt: skip
    return [
        (position + 1, formats[opcode.name])
        for opcode, _, position in pickletools.genops(data)
        if opcode.name in formats
    ]


def _protobuf_fields(data: bytes) -> list[tuple[int, str]]:
    """The one-byte lengths after a length-delimited tag (fields 1-3) near the start."""
    return [
        (at + 1, "<B") for at in range(min(len(data) - 1, 400)) if data[at] in (0x0A, 0x12, 0x1A)
    ]


@case("fuzzed-parsers", "error")
def fuzz_safetensors_checkpoint(ctx: Context) -> str:
    """20 seeded mutations of a saved model's model.safetensors (bytes, truncations, header bits,
    the declared header length): read_tensors and load_pretrained refuse each clearly or load the
    saved weights."""
    from jetblocks.checkpoint import read_tensors
    from jetblocks.pretrained import load_pretrained

    source, reference = ctx.pretrained(), state_of(ctx.jet())
    data, folder = (source / "model.safetensors").read_bytes(), ctx.dir("fuzzst")
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> None:
        model = folder / f"m{next(counter):02d}"
        model.mkdir()
        shutil.copy(source / "config.json", model / "config.json")
        (model / "model.safetensors").write_bytes(mutated)
        read_tensors(model / "model.safetensors")
        if not same_state(state_of(load_pretrained(model)), reference):
            raise wrong("loaded weights that differ from the saved ones")

    return _fuzz(_mutations(data, 1, fields=_safetensors_fields), attempt, r"m\d\d")


@case("fuzzed-parsers", "error")
def fuzz_token_file(ctx: Context) -> str:
    """20 seeded mutations of a token file (with names, config, data and split in its header):
    read_token_file refuses each clearly or reads it."""
    from jetblocks.tokenfile import TokenFile, read_token_file, write_token_file

    folder = ctx.dir("fuzztok")
    tokens, _ = _encoded(ctx, 3)
    contents = TokenFile(tokens=tokens, names=["a.png", "b/c.png", "d.jpg"], data="digits",
                         split="test", config={"image_size": [8, 8]})  # fmt: skip
    write_token_file(folder / "original.safetensors", contents)
    data = (folder / "original.safetensors").read_bytes()
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> None:
        path = folder / f"t{next(counter):02d}.safetensors"
        path.write_bytes(mutated)
        read_token_file(path)

    return _fuzz(_mutations(data, 2, fields=_safetensors_fields), attempt, r"t\d\d\.safetensors")


@case("fuzzed-parsers", "error")
def fuzz_config_json(ctx: Context) -> str:
    """20 seeded mutations of a saved config.json (values replaced by hostile ones: NaN, 2**70,
    lists, null; keys deleted; bytes changed): JetConfig.from_json and load_pretrained refuse
    each clearly or load the saved weights."""
    from jetblocks import JetConfig
    from jetblocks.pretrained import load_pretrained

    source, reference = ctx.pretrained(), state_of(ctx.jet())
    data, folder = (source / "config.json").read_bytes(), ctx.dir("fuzzcfg")
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> None:
        try:
            JetConfig.from_json(mutated.decode("utf-8", "replace"))
        except Exception as error:
            if not is_clear_type(error, ()):
                message = f"JetConfig.from_json: {type(error).__name__}: {one_line(error, 100)}"
                raise Verdict("traceback", message) from None
        model = folder / f"m{next(counter):02d}"
        model.mkdir()
        shutil.copy(source / "model.safetensors", model / "model.safetensors")
        (model / "config.json").write_bytes(mutated)
        if not same_state(state_of(load_pretrained(model)), reference):
            raise wrong("loaded weights that differ from the saved ones")

    mutations = _mutations(data, 3, semantic=_json_semantic(data), kinds=JSON_KINDS)
    return _fuzz(mutations, attempt, r"m\d\d")


@case("fuzzed-parsers", "error")
def fuzz_trainer_state(ctx: Context) -> str:
    """20 seeded mutations of the newest checkpoint's trainer.json (values anywhere in the
    optimizer, scheduler, loader and RNG states replaced or deleted; bytes changed): train
    --resume --steps 6 refuses clearly naming the checkpoint, falls back to the older one
    (saying so), or resumes and trains on."""
    run = ctx.base_run()
    state = run / "checkpoints" / STEP4 / "trainer.json"
    data, folder = state.read_bytes(), ctx.dir("fuzzstate")
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> str:
        copy = folder / f"run{next(counter):02d}"
        shutil.copytree(run, copy)
        (copy / "checkpoints" / STEP4 / "trainer.json").write_bytes(mutated)
        proc = ctx.cli_here(*ctx.resume_args(copy, "--steps", "6"))
        shutil.rmtree(copy)
        if proc.returncode == 0:
            return (
                "fell back to step 2"
                if f"skipping checkpoint {STEP4}" in proc.stderr
                else "resumed"
            )
        if "Traceback" not in proc.stderr and CLI_ERROR.match(proc.last_line):
            raise CliRefused(proc.last_line)
        raise Verdict("traceback", f"exit {proc.returncode}: {proc.last_line}")

    mutations = _mutations(data, 4, semantic=_json_semantic(data), kinds=JSON_KINDS)
    return _fuzz(mutations, attempt, r"step_\d+|trainer")


@case("fuzzed-parsers", "error")
def fuzz_big_vision_npz(ctx: Context) -> str:
    """20 seeded mutations of a big_vision .npz (bytes, truncations, zip and .npy header sizes
    and offsets): load_jet refuses each clearly or loads a Jet."""
    from jetblocks.integrations.big_vision import load_jet, save_jet

    folder = ctx.dir("fuzzbv")
    save_jet(ctx.jet(), folder / "jet.npz")
    data = (folder / "jet.npz").read_bytes()
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> None:
        path = folder / f"j{next(counter):02d}.npz"
        path.write_bytes(mutated)
        load_jet(path)

    return _fuzz(_mutations(data, 5, fields=_zip_fields), attempt, r"j\d\d\.npz")


@case("fuzzed-parsers", "error")
def fuzz_image_files(ctx: Context) -> str:
    """10 mutated PNGs (chunk lengths, a huge IHDR or changed IDAT with valid CRCs) and 10
    mutated JPEGs (segment lengths, frame size) beside a good image: ImageFolder refuses each
    clearly (DataError naming the file) or reads every image."""
    from PIL import Image

    from jetblocks.integrations.datasets import ImageFolder

    folder = ctx.dir("fuzzimg")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    encoded = {}
    for suffix, options in ((".png", {}), (".jpg", {"quality": 90})):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=suffix[1:].replace("jpg", "jpeg"), **options)
        encoded[suffix] = buffer.getvalue()
    half = FUZZ_COUNT // 2
    png = _mutations(
        encoded[".png"],
        6,
        fields=_png_fields,
        semantic=_png_with_crc(encoded[".png"]),
        kinds=(*BYTE_KINDS, "semantic"),
        count=half,
    )
    jpeg = _mutations(encoded[".jpg"], 7, fields=_jpeg_fields, count=FUZZ_COUNT - half)
    items = [(f"png {label}", (".png", b)) for label, b in png]
    items += [(f"jpeg {label}", (".jpg", b)) for label, b in jpeg]
    counter = iter(range(10**6))

    def attempt(payload: tuple[str, bytes]) -> None:
        suffix, mutated = payload
        images = folder / f"images{next(counter):02d}"
        images.mkdir()
        (images / "good.png").write_bytes(encoded[".png"])
        (images / f"bad{suffix}").write_bytes(mutated)
        source = ImageFolder(images, image_size=8, channels=1)
        read = [source[index][0] for index in range(len(source))]
        if any(tuple(pixels.shape) != (1, 8, 8) for pixels in read):
            raise wrong(f"read images of shapes {[list(p.shape) for p in read]}")

    return _fuzz(iter(items), attempt, r"bad\.(png|jpg)")


class _Shell:
    """Pickles as a call of ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Eval:
    """Pickles as a call of ``eval(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple:
        return (eval, (self.source,))


@case("fuzzed-parsers", "error")
def fuzz_cifar_pickles(ctx: Context) -> str:
    """20 seeded mutations of a CIFAR-10 batch pickle (bytes, truncations, string lengths, memo
    indices), and pickles calling os.system and eval: load_cifar10 refuses each clearly (the
    two code-running ones as UnsafePickleError, running nothing) or loads it."""
    from jetblocks.integrations.datasets import UnsafePickleError, load_cifar10

    folder = ctx.dir("fuzzcifar")
    rng = np.random.default_rng(0)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, 6)],
        b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(6)],
    }
    data = pickle.dumps(batch, protocol=2)
    counter = iter(range(10**6))

    def load(raw: bytes) -> Any:
        root = folder / f"cifar{next(counter):02d}"
        root.mkdir()
        (root / "test_batch").write_bytes(raw)
        return load_cifar10(root, "test")

    try:
        if not torch.equal(load(data).images[0].flatten(), torch.from_numpy(batch[b"data"][0])):
            raise wrong("a valid CIFAR-10 batch pickle loads other pixels")
    except (ValueError, TypeError) as error:
        raise SetupFailed(f"a valid batch does not load: {one_line(error, 120)}") from None
    sentinel = folder / "pwned"
    evil = [
        ("os.system", pickle.dumps({b"data": _Shell(f"touch {sentinel}")}, protocol=2)),
        ("eval", pickle.dumps({b"data": _Eval(f"open({str(sentinel)!r}, 'w')")}, protocol=2)),
    ]
    for what, raw in evil:
        try:
            load(raw)
        except UnsafePickleError:
            pass
        except Exception as error:
            if sentinel.exists():
                raise breach(f"the {what} pickle ran: {sentinel.name} created") from None
            raise Verdict(
                "traceback", f"the {what} pickle: {type(error).__name__}, not UnsafePickleError"
            ) from None
        else:
            raise breach(f"a pickle calling {what} loaded")
        if sentinel.exists():
            raise breach(f"the {what} pickle ran: {sentinel.name} created")
    return _fuzz(_mutations(data, 8, fields=_pickle_fields), load, "test_batch")


@case("fuzzed-parsers", "error")
def fuzz_sentencepiece(ctx: Context) -> str:
    """20 seeded mutations of a sentencepiece tokenizer.model (bytes, truncations, protobuf
    lengths): SentencePieceTokenizer.load refuses each clearly or gives a tokenizer that
    encodes and decodes."""
    from jetblocks.integrations.sentencepiece import SentencePieceTokenizer

    folder = ctx.dir("fuzzspm")
    captions = [f"a {size} {color} {shape} on the {side}" for size in ("small", "big")
                for color in ("red", "blue", "green") for shape in ("square", "circle")
                for side in ("left", "right")]  # fmt: skip
    data = SentencePieceTokenizer.train(captions, 64, model_type="word").model_proto
    counter = iter(range(10**6))

    def attempt(mutated: bytes) -> None:
        path = folder / f"t{next(counter):02d}.model"
        path.write_bytes(mutated)
        tokenizer = SentencePieceTokenizer.load(path)
        ids, _ = tokenizer.encode_batch(["a small red square on the left"], 12)
        tokenizer.decode(ids[0].tolist())

    return _fuzz(_mutations(data, 9, fields=_protobuf_fields), attempt, r"t\d\d\.model")


# == runner ====================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run the quick subset only")
    parser.add_argument("--only", default=None, help="run cases whose id or group contains this")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON results (full run default: {RESULTS})"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if a case is not as expected (skips pass)"
    )
    args = parser.parse_args(argv)
    cases = [c for c in CASES if c.smoke] if args.smoke else list(CASES)
    if args.only:
        cases = [c for c in cases if args.only in c.id or args.only in c.group]
    out = args.out or (RESULTS if not (args.smoke or args.only) else None)
    torch.set_num_threads(1)
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="jetblocks-reliability-") as root:
        ctx = Context(Path(root))
        for item in cases:
            result = run_case(item, ctx)
            results.append(result)
            flag = {True: "ok", False: "!!", None: "--"}[result["ok"]]
            line = f"[{flag}] {result['outcome']:<12} {item.id:<36} {result['detail']}"
            print(line if len(line) <= 180 else line[:177] + "...", flush=True)
    counts = {name: sum(r["outcome"] == name for r in results) for name in OUTCOMES}
    as_expected = sum(r["ok"] is True for r in results)
    unexpected = [r["id"] for r in results if r["ok"] is False]
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    seconds = time.time() - started
    total = len(results)
    print(f"{total} cases: {summary}; as expected {as_expected}/{total} ({seconds:.0f} s)")
    if unexpected:
        print(f"not as expected: {' '.join(unexpected)}")
    if out is not None:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "smoke": args.smoke,
            "only": args.only,
            "counts": counts,
            "as_expected": as_expected,
            "not_as_expected": unexpected,
            "cases": results,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if args.strict and unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
