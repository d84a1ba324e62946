"""The ``jetblocks`` command: train, eval, sample, encode, decode and export Jet models (and
the multi-scale flows of :mod:`jetblocks.multiscale`).

    jetblocks train --preset mnist --data mnist5k --steps 600 --out runs/demo
    jetblocks eval --checkpoint runs/demo --data mnist5k --split test
    jetblocks sample --checkpoint runs/demo --n 16 --temperature 0.8 --out samples.png
    jetblocks encode --checkpoint runs/demo --data mnist5k --split test --out tokens.safetensors
    jetblocks decode --checkpoint runs/demo --tokens tokens.safetensors --out decoded.png
    jetblocks diagnose runs/demo
    jetblocks export --checkpoint runs/demo --format onnx --out exported/
    jetblocks shards --data mnist5k --split train --per-shard 1000 --out shards/train

``--checkpoint`` takes a training run's directory (its newest checkpoint is used), one
checkpoint directory, a ``save_pretrained`` directory, or a Hugging Face Hub repo id
(``org/name``, downloaded into the Hub's cache; a local path of that name wins). Under
``torchrun`` the ``train`` command runs data-parallel (``--distributed ddp``, the default, or
``fsdp``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from jetblocks.acceleration import accelerate_by_default
from jetblocks.checkpoint import CheckpointError, read_json
from jetblocks.config import add_arguments, arguments_of
from jetblocks.export import EXPORT_FORMATS
from jetblocks.flow import BACKPROP_MODES
from jetblocks.imageflow import ImageFlow
from jetblocks.jet import PRESETS, JetConfig
from jetblocks.likelihood import to_uint8
from jetblocks.multiscale import MULTISCALE_PRESETS, MultiScaleConfig
from jetblocks.optional import missing_dependency
from jetblocks.pretrained import build_model, load_pretrained, model_class
from jetblocks.train import DivergenceError, TrainConfig, TrainingInterrupted
from jetblocks.validation import COUNT, NON_NEGATIVE, POSITIVE_INT, SEED

__all__ = [
    "build_parser",
    "load_model",
    "main",
    "model_config",
]


def model_config(args):
    """The ``JetConfig`` or ``MultiScaleConfig`` of ``--config`` or ``--preset``."""
    if args.preset in MULTISCALE_PRESETS:
        return MultiScaleConfig.preset(args.preset)
    if not args.config:
        return JetConfig.preset(args.preset)
    try:
        values = read_json(Path(args.config))
        return model_class(values).config_class.from_dict(values)
    except (TypeError, ValueError) as error:
        text, path = str(error), str(args.config)
        text = text[len(path) :] if text.startswith(path) else f" is not a model config: {text}"
        raise ValueError(f"--config {path}{text}") from None


def load_model(path: str | Path, device: torch.device) -> ImageFlow:
    """The model saved at ``path`` (a run, a checkpoint or a pretrained directory)."""
    model = load_pretrained(path)
    if not isinstance(model, ImageFlow):
        raise CheckpointError(f"{path} holds a {type(model).__name__}, not an image flow")
    return accelerate_by_default(model.to(device).eval(), device, inference=True)


def _source(args, jet_config, split: str):
    """The ``split`` of ``--data`` (unreadable images refused, or skipped and counted)."""
    from jetblocks.integrations.torchdata import open_source

    source = open_source(
        args.data,
        split,
        image_size=jet_config.image_size[0],
        channels=jet_config.channels,
        skip_corrupt=args.skip_corrupt,
    )
    if skipped := getattr(source, "skipped", None):
        print(f"jetblocks: skipped {len(skipped)} unreadable image(s) in {args.data}", flush=True)
    return source


def _loader(args, source, batch_size: int, env, shuffle: bool, epochs):
    """Batches of ``source`` for this rank: an image loader, or a shard stream's."""
    from jetblocks.integrations.torchdata import ShardSet, image_loader, shard_loader

    common = dict(
        seed=args.seed,
        shuffle=shuffle,
        drop_last=shuffle,
        rank=env.rank,
        world_size=env.world_size,
        epochs=epochs,
        num_workers=args.workers,
    )
    if isinstance(source, ShardSet):
        buffer = getattr(args, "shuffle_buffer", 1)
        return shard_loader(
            source, batch_size, buffer=buffer, skip_corrupt=args.skip_corrupt, **common
        )
    return image_loader(source, batch_size, **common)


def _describe(source) -> str:
    """``"1,234 images"``, or how many shards a stream reads."""
    return source.describe() if hasattr(source, "describe") else f"{len(source):,} images"


def _device(args) -> torch.device:
    """``--device``, checked: a device torch knows and this machine has."""
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"unknown --device {args.device!r}; expected cpu, cuda, cuda:N or mps"
        ) from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (device.index or 0) < max(torch.cuda.device_count(), 1),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ValueError(f"--device {args.device} is not available on this machine")
    return device


def _output_file(path: str, suffixes: tuple[str, ...]) -> Path:
    """``--out`` for a file: not a directory, with one of ``suffixes``."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; expected a file name")
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"--out {out} must end in {' or '.join(suffixes)}")
    return out


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args) -> None:
    from jetblocks.integrations.distributed import init_distributed
    from jetblocks.train import BitsPerDimTask, Trainer

    env = init_distributed(str(_device(args)))
    flow_config = model_config(args)
    if args.backprop is not None:
        flow_config = flow_config.replace(backprop=args.backprop)
    train_config = TrainConfig(**arguments_of(args, TrainConfig))
    torch.manual_seed(train_config.seed)
    local = train_config.local_batch_size(env.world_size)
    train_source, eval_source = (
        _source(args, flow_config, "train"),
        _source(args, flow_config, "test"),
    )
    train_loader = _loader(args, train_source, local, env, shuffle=True, epochs=None)

    def eval_batches():
        return _loader(args, eval_source, args.eval_batch_size, env, False, epochs=1)

    trainer = Trainer(
        build_model(model_class(flow_config.to_dict()), flow_config),
        BitsPerDimTask(),
        train_config,
        model_config=flow_config.to_dict(),
        train_loader=train_loader,
        eval_batches=eval_batches,
        out_dir=args.out,
        env=env,
        card={"data": args.data},
    )
    if env.is_main:
        params = sum(p.numel() for p in trainer.model.parameters())
        name = type(trainer.model).__name__
        print(
            f"training {name} ({params:,} parameters) on {args.data} ({_describe(train_source)} "
            f"for training, {_describe(eval_source)} held out) for {args.steps} steps "
            f"on {env.world_size} x {env.device}"
        )
    before = trainer.evaluate() if args.eval_before else None
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    if env.is_main:
        summary = {"step": trainer.step, **{f"eval_{k}": v for k, v in result.items()}}
        if before:
            summary.update({f"initial_eval_{k}": v for k, v in before.items()})
        print(json.dumps(summary))
        logs = "".join(f", {name}/" for name in train_config.log)
        print(f"outputs in {args.out}: checkpoints/, metrics.jsonl, samples/{logs}")


def cmd_eval(args) -> None:
    from jetblocks.integrations.distributed import Distributed
    from jetblocks.train import BitsPerDimTask, evaluate

    device = _device(args)
    flow = load_model(args.checkpoint, device)
    env = Distributed(device=torch.device(device))
    source = _source(args, flow.config, args.split)
    batches = _loader(args, source, args.batch_size, env, False, 1)
    generator = torch.Generator(device).manual_seed(args.seed)
    means, count = evaluate(BitsPerDimTask(), flow, batches, generator, env=env)
    print(json.dumps({"split": args.split, "images": count, **means}))


def cmd_sample(args) -> None:
    from jetblocks.integrations.images import GRID_SUFFIXES, check_grid_size, save_grid

    out = _output_file(args.out, GRID_SUFFIXES)
    ncols = args.ncols or math.ceil(math.sqrt(args.n))
    device = _device(args)
    jet = load_model(args.checkpoint, device)
    try:
        check_grid_size(args.n, ncols, *jet.config.image_size)
    except ValueError as error:
        raise ValueError(f"--n {args.n}: {error}") from None
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        images = [
            to_uint8(jet.sample(min(args.batch_size, args.n - start), args.temperature,
                                generator=generator)).cpu()
            for start in range(0, args.n, args.batch_size)
        ]  # fmt: skip
    print(save_grid(torch.cat(images), out, ncols=ncols))


def cmd_encode(args) -> None:
    from jetblocks.integrations.distributed import Distributed
    from jetblocks.tokenfile import TokenFile, write_token_file

    out = _output_file(args.out, (".safetensors",))
    device = _device(args)
    jet = load_model(args.checkpoint, device)
    source = _source(args, jet.config, args.split)
    if not hasattr(source, "__len__"):
        raise ValueError(f"encode reads images by index; {args.data} is a stream of shards")
    count = min(len(source), args.limit or len(source))
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "logdet": [], "label": []}
    with torch.no_grad():
        for batch in _loader(args, source, args.batch_size, Distributed(device=device), False, 1):
            tokens, logdet = jet.encode(batch["image"].to(device))
            for name, value in (("tokens", tokens), ("logdet", logdet), ("label", batch["label"])):
                parts[name].append(value.cpu())
            if sum(map(len, parts["tokens"])) >= count:
                break
    tensors = {name: torch.cat(values)[:count] for name, values in parts.items()}
    names = getattr(source, "names", None)
    contents = TokenFile(
        **tensors,
        index=torch.arange(count),  # the source's order: loading is not shuffled
        names=None if names is None else names[:count],
        config=jet.config.to_dict(),
        data=args.data,
        split=args.split,
    )
    write_token_file(out, contents)
    print(
        f"encoded {count:,} images of {args.data} ({args.split}) into {out}: tokens "
        f"{list(contents.tokens.shape)}, logdet, label, index"
        + (", names in the header" if names is not None else "")
    )


def cmd_decode(args) -> None:
    from jetblocks.integrations.images import (
        GRID_SUFFIXES,
        check_grid_size,
        save_grid,
        save_images,
    )
    from jetblocks.paths import plan_outputs
    from jetblocks.tokenfile import read_token_file

    out = Path(args.out)
    grid = out.suffix.lower() in GRID_SUFFIXES
    if not grid and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected an image file name or a folder")
    device = _device(args)
    jet = load_model(args.checkpoint, device)
    contents = read_token_file(args.tokens)
    tokens, (num_tokens, token_dim) = contents.tokens, jet.latent_shape
    if tokens.shape[1:] != (num_tokens, token_dim):
        raise CheckpointError(
            f"{args.tokens} must hold 'tokens' of shape [B, {num_tokens}, {token_dim}] "
            f"for this model, got {list(tokens.shape)}"
        )
    index = contents.index.tolist()
    paths = None if grid else plan_outputs(out, contents.names or [None] * len(index), index)
    ncols = args.ncols or math.ceil(math.sqrt(len(tokens)))
    if grid:
        check_grid_size(len(tokens), ncols, *jet.config.image_size)
    dtype = next(jet.parameters()).dtype
    with torch.no_grad():
        pixels = torch.cat(
            [
                to_uint8(jet.decode(part.to(device, dtype))).cpu()
                for part in tokens.split(args.batch_size)
            ]
        )
    if grid:
        print(f"decoded {len(pixels):,} images into the grid {save_grid(pixels, out, ncols)}")
        return
    files = save_images(pixels, paths)
    print(f"decoded {len(files):,} images into {out}/ (one PNG per image)")


def cmd_export(args) -> None:
    from jetblocks.export import export_flow

    flow = load_model(args.checkpoint, torch.device("cpu"))  # exported from a plain copy
    description = export_flow(flow, args.out, args.format)
    files = [description[graph]["file"] for graph in ("encode", "decode")] + ["export.json"]
    sizes = ", ".join(f"{name} ({_file_size(Path(args.out) / name)})" for name in files)
    model = description["model"]
    print(f"exported {model} encode and decode ({args.format}) into {args.out}: {sizes}")


def cmd_shards(args) -> None:
    import numpy as np

    from jetblocks.integrations.shards import ShardSet, write_shards
    from jetblocks.integrations.torchdata import open_source

    source = open_source(
        args.data,
        args.split,
        image_size=args.image_size,
        channels=args.channels,
        skip_corrupt=args.skip_corrupt,
    )
    if isinstance(source, ShardSet):
        raise ValueError(f"{args.data} are shards already")
    shuffled = np.random.default_rng(args.shuffle_seed).permutation(len(source))
    written = write_shards(
        source, args.out, args.per_shard, order=None if args.in_order else shuffled
    )
    pattern = f"{args.out}-{{000000..{len(written) - 1:06d}}}.tar"
    print(
        f"wrote {len(source):,} images of {args.data} ({args.split}) into "
        f"{len(written)} shard(s): --data '{pattern}'"
    )


def _file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def cmd_diagnose(args) -> None:
    from jetblocks.diagnostics import report
    from jetblocks.run_folder import read_metrics

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run} is not a training run (it has no metrics.jsonl)")
    print(report(read_metrics(run)))


# -- argument parsing --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetblocks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a Jet (single process or under torchrun)")
    model = train.add_mutually_exclusive_group()
    model.add_argument(
        "--preset",
        default="mnist",
        choices=sorted(PRESETS) + sorted(MULTISCALE_PRESETS),
        help="a Jet preset, or a multi-scale flow's (*-multiscale; default: mnist)",
    )
    model.add_argument(
        "--config", help="a JetConfig (or MultiScaleConfig) JSON file instead of a preset"
    )
    _data_arguments(train)
    _runtime_arguments(train, seed=False)  # --seed is TrainConfig's
    add_arguments(
        train,
        TrainConfig,
        aliases={"ema_decay": ("--ema",), "nonfinite": ("--on-nonfinite",)},
    )
    train.add_argument(
        "--backprop",
        choices=BACKPROP_MODES,
        default=None,
        help="how gradients pass the couplings (default: the config's): store activations, "
        "checkpoint each coupling, or rebuild inputs from outputs (memory-saving)",
    )
    train.add_argument(
        "--shuffle-buffer",
        type=_positive_int,
        default=1000,
        help="samples in the shuffle buffer of a shard stream (default: 1000)",
    )
    train.add_argument("--eval-batch-size", type=_positive_int, default=250)
    train.add_argument(
        "--eval-before", action="store_true", help="also evaluate before training and report it"
    )
    train.add_argument("--out", required=True, help="run directory")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (deletes its checkpoints, metrics.jsonl, samples and logs)",
    )
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="print held-out bits/dim as JSON")
    _checkpoint_arguments(evaluate)
    _data_arguments(evaluate)
    evaluate.add_argument("--split", default="test", choices=("train", "test"))
    evaluate.add_argument("--batch-size", type=_positive_int, default=250)
    evaluate.set_defaults(run=cmd_eval)

    sample = commands.add_parser("sample", help="write a PNG grid of samples")
    _checkpoint_arguments(sample)
    sample.add_argument("--n", type=_positive_int, default=64)
    sample.add_argument("--temperature", type=_non_negative_float, default=1.0)
    sample.add_argument("--ncols", type=_positive_int, default=None)
    sample.add_argument(
        "--batch-size", type=_positive_int, default=256, help="images sampled at a time"
    )
    sample.add_argument("--out", required=True, help="image file (.png, or .jpg: lossy)")
    sample.set_defaults(run=cmd_sample)

    encode = commands.add_parser("encode", help="images -> tokens in a .safetensors file")
    _checkpoint_arguments(encode)
    _data_arguments(encode)
    encode.add_argument(
        "--split",
        default="test",
        choices=("train", "test", "all"),
        help="all: every image of an unsplit folder or .npz (default: test)",
    )
    encode.add_argument("--batch-size", type=_positive_int, default=250)
    encode.add_argument(
        "--limit", type=_positive_int, default=None, help="encode at most this many images"
    )
    encode.add_argument(
        "--out", required=True, help=".safetensors file (tokens, logdet, label, index; names)"
    )
    encode.set_defaults(run=cmd_encode)

    decode = commands.add_parser("decode", help="tokens in a .safetensors file -> PNG grid")
    _checkpoint_arguments(decode)
    decode.add_argument("--tokens", required=True, help=".safetensors file with 'tokens'")
    decode.add_argument("--ncols", type=_positive_int, default=None)
    decode.add_argument(
        "--batch-size", type=_positive_int, default=256, help="images decoded at a time"
    )
    decode.add_argument(
        "--out",
        required=True,
        help="a grid image file (.png, or .jpg: lossy), or a folder for one PNG per image "
        "(named after the encoded files, else their index)",
    )
    decode.set_defaults(run=cmd_decode)

    diagnose = commands.add_parser(
        "diagnose", help="a run's loss split, couplings and gradient norms, as logged"
    )
    diagnose.add_argument("run_dir", metavar="RUN", help="a training run's folder")
    diagnose.add_argument("--threads", type=_positive_int, default=None, help=argparse.SUPPRESS)
    diagnose.set_defaults(run=cmd_diagnose)

    shards = commands.add_parser(
        "shards", help="write any --data source as webdataset tar shards (PNG images, labels)"
    )
    _data_arguments(shards)
    shards.add_argument("--split", default="train", choices=("train", "test", "all"))
    shards.add_argument(
        "--image-size", type=_positive_int, default=None, help="decode a folder's images to this"
    )
    shards.add_argument("--channels", type=int, choices=(1, 3), default=None)
    shards.add_argument("--per-shard", type=_positive_int, default=10_000)
    shards.add_argument(
        "--shuffle-seed",
        type=SEED.parse,
        default=0,
        help="store the samples in this seed's random order, so that a shard holds a mix",
    )
    shards.add_argument("--in-order", action="store_true", help="store them in source order")
    shards.add_argument(
        "--out", required=True, help="prefix of the shards: PREFIX-000000.tar, PREFIX-000001.tar"
    )
    shards.add_argument("--threads", type=_positive_int, default=None, help=argparse.SUPPRESS)
    shards.set_defaults(run=cmd_shards)

    export = commands.add_parser(
        "export", help="encode and decode graphs for onnxruntime (ONNX) or torch.export"
    )
    export.add_argument(
        "--format",
        default="onnx",
        choices=EXPORT_FORMATS,
        help="onnx: encode.onnx and decode.onnx (onnxruntime; needs jetblocks[export]); "
        "torch: encode.pt2 and decode.pt2 (torch.export.load) (default: onnx)",
    )
    export.add_argument(
        "--out",
        required=True,
        help="a folder for the two graphs and export.json (existing export files are refused)",
    )
    _checkpoint_arguments(export, seed=False, device=False)  # graphs are traced on the CPU
    export.set_defaults(run=cmd_export)
    return parser


_positive_int = POSITIVE_INT.parse
_non_negative_float = NON_NEGATIVE.parse


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="mnist5k",
        help="mnist5k, digits, photo-patches, an image folder, an .npz file, a CIFAR-10 "
        "batches folder, or tar shards: 'shards/{split}-{000000..000127}.tar' "
        "(default: mnist5k)",
    )
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip (and count) unreadable images in a folder or shards (default: refuse them)",
    )
    parser.add_argument(
        "--workers",
        type=COUNT.parse,
        default=0,
        help="worker processes decoding images (folders, shards); 0: in the main process",
    )


def _runtime_arguments(
    parser: argparse.ArgumentParser, seed: bool = True, device: bool = True
) -> None:
    if seed:
        parser.add_argument(
            "--seed", type=SEED.parse, default=0, help="seed of data order and noise"
        )
    if device:
        parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for tensor maths (default: PyTorch's, one per core; on a machine "
        "shared with other jobs pass fewer: busy-waiting threads slow everything down)",
    )


def _checkpoint_arguments(
    parser: argparse.ArgumentParser, seed: bool = True, device: bool = True
) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, a checkpoint, a save_pretrained directory, or a Hugging Face "
        "Hub repo id org/name (HF_HUB_OFFLINE=1: from the cache only)",
    )
    _runtime_arguments(parser, seed=seed, device=device)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; every failure is one line on stderr and a non-zero exit code.

    Exit codes: 0 done, 2 a problem named on stderr, 130 (SIGINT) and 143 (SIGTERM) stopped
    by a signal (training saves a checkpoint first; ``--resume`` continues), 1 an unexpected
    error. Set ``JETBLOCKS_TRACEBACK=1`` to see the traceback of an unexpected error.
    """
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with _terminate_as_exception():
            args.run(args)
    except ModuleNotFoundError as error:
        print(f"jetblocks {args.command}: error: {missing_dependency(error)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:
        print(f"jetblocks {args.command}: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    except (ValueError, TypeError, OSError, DivergenceError) as error:
        print(f"jetblocks {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jetblocks {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"jetblocks {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as error:
        if os.environ.get("JETBLOCKS_TRACEBACK"):
            raise
        print(
            f"jetblocks {args.command}: internal error: {type(error).__name__}: "
            f"{_one_line(error)} (set JETBLOCKS_TRACEBACK=1 to see the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


class _Terminated(BaseException):
    """SIGTERM arrived outside training (which handles it itself)."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """SIGTERM unwinds the command like SIGINT does (files being written are abandoned by
    their atomic writers, never left half-written), in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    raise SystemExit(main())
