"""The ``jetblocks`` command: train, eval, sample, encode and decode Jet models.

    jetblocks train --preset mnist --data mnist5k --steps 600 --out runs/demo
    jetblocks eval --checkpoint runs/demo --data mnist5k --split test
    jetblocks sample --checkpoint runs/demo --n 16 --temperature 0.8 --out samples.png
    jetblocks encode --checkpoint runs/demo --data mnist5k --split test --out tokens.safetensors
    jetblocks decode --checkpoint runs/demo --tokens tokens.safetensors --out decoded.png

``--checkpoint`` takes a training run's directory (its newest checkpoint is used), one
checkpoint directory, or a ``Jet.save_pretrained`` directory. Under ``torchrun`` the
``train`` command runs data-parallel (``--distributed ddp``, the default, or ``fsdp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from jetblocks.checkpoint import CheckpointError, read_tensors
from jetblocks.flow import BACKPROP_MODES
from jetblocks.jet import PRESETS, Jet, JetConfig
from jetblocks.likelihood import to_uint8
from jetblocks.train import TrainConfig, checkpoints_in


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory behind ``path`` (a run, a checkpoint or a pretrained directory)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path} (expected model.safetensors or checkpoints/)"
        )
    return found[-1]


def load_jet(path: str | Path, device: str) -> Jet:
    return Jet.from_pretrained(resolve_checkpoint(path)).to(device).eval()


def _loader(args, jet_config: JetConfig, split: str, batch_size: int, env, shuffle: bool, epochs):
    from jetblocks.integrations.torchdata import image_loader, open_source

    source = open_source(
        args.data, split, image_size=jet_config.image_size[0], channels=jet_config.channels
    )
    return image_loader(
        source,
        batch_size,
        seed=args.seed,
        shuffle=shuffle,
        drop_last=shuffle,
        rank=env.rank,
        world_size=env.world_size,
        epochs=epochs,
    )


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args) -> None:
    from jetblocks.integrations.distributed import init_distributed
    from jetblocks.train import JetTask, Trainer

    env = init_distributed(args.device)
    if args.config:
        jet_config = JetConfig.from_json(Path(args.config).read_text())
    else:
        jet_config = JetConfig.preset(args.preset)
    if args.backprop is not None:
        jet_config = dataclasses.replace(jet_config, backprop=args.backprop)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        bf16=args.bf16,
        compile=args.compile,
        ema_decay=args.ema,
        grad_accum=args.grad_accum,
        activation_checkpointing=args.activation_checkpointing,
        distributed=args.distributed,
        eval_every=args.eval_every or args.steps,
        checkpoint_every=args.checkpoint_every or args.steps,
        log_every=args.log_every,
        seed=args.seed,
        progress=not args.no_progress,
    )
    torch.manual_seed(args.seed)
    local = train_config.local_batch_size(env.world_size)
    train_loader = _loader(args, jet_config, "train", local, env, shuffle=True, epochs=None)

    def eval_batches():
        return _loader(args, jet_config, "test", args.eval_batch_size, env, False, epochs=1)

    trainer = Trainer(
        Jet(jet_config),
        JetTask(),
        train_config,
        model_config=jet_config.to_dict(),
        train_loader=train_loader,
        eval_batches=eval_batches,
        out_dir=args.out,
        env=env,
    )
    if env.is_main:
        params = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"training Jet ({params:,} parameters) on {args.data} for {args.steps} steps "
            f"on {env.world_size} x {env.device}"
        )
    before = trainer.evaluate() if args.eval_before else None
    result = trainer.fit(resume=args.resume)
    if env.is_main:
        summary = {"step": trainer.step, **{f"eval_{k}": v for k, v in result.items()}}
        if before:
            summary.update({f"initial_eval_{k}": v for k, v in before.items()})
        print(json.dumps(summary))
        print(f"outputs in {args.out}: checkpoints/, metrics.jsonl, samples/")


def cmd_eval(args) -> None:
    from jetblocks.integrations.distributed import Distributed

    device = _device(args)
    jet = load_jet(args.checkpoint, device)
    env = Distributed(device=torch.device(device))
    generator = torch.Generator(device).manual_seed(args.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _loader(args, jet.config, args.split, args.batch_size, env, False, 1):
            pixels = batch["image"].to(device)
            total += jet.bits_per_dim(pixels, generator=generator).double().sum().item()
            count += len(pixels)
    print(json.dumps({"split": args.split, "images": count, "bits_per_dim": total / count}))


def cmd_sample(args) -> None:
    from jetblocks.integrations.images import save_grid

    device = _device(args)
    jet = load_jet(args.checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        images = jet.sample(args.n, args.temperature, generator=generator)
    ncols = args.ncols or math.ceil(math.sqrt(args.n))
    print(save_grid(to_uint8(images), args.out, ncols=ncols))


def cmd_encode(args) -> None:
    from safetensors.torch import save_file

    from jetblocks.checkpoint import atomic_file
    from jetblocks.integrations.distributed import Distributed

    device = _device(args)
    jet = load_jet(args.checkpoint, device)
    env = Distributed(device=torch.device(device))
    generator = torch.Generator(device).manual_seed(args.seed)
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "logdet": [], "label": []}
    with torch.no_grad():
        for batch in _loader(args, jet.config, args.split, args.batch_size, env, False, 1):
            tokens, logdet = jet.encode(batch["image"].to(device), generator=generator)
            for name, value in (("tokens", tokens), ("logdet", logdet), ("label", batch["label"])):
                parts[name].append(value.cpu())
            if args.limit and sum(map(len, parts["tokens"])) >= args.limit:
                break
    tensors = {name: torch.cat(values)[: args.limit or None] for name, values in parts.items()}
    with atomic_file(args.out) as staging:
        save_file(tensors, staging, metadata={"config": jet.config.to_json()})
    print(json.dumps({"out": str(args.out), "tokens": list(tensors["tokens"].shape)}))


def cmd_decode(args) -> None:
    from jetblocks.integrations.images import save_grid

    device = _device(args)
    jet = load_jet(args.checkpoint, device)
    tokens = read_tensors(Path(args.tokens)).get("tokens")
    cfg = jet.config
    if tokens is None or tokens.dim() != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.token_dim):
        found = None if tokens is None else list(tokens.shape)
        raise CheckpointError(
            f"{args.tokens} must hold 'tokens' of shape [B, {cfg.num_tokens}, {cfg.token_dim}] "
            f"for this Jet, got {found}"
        )
    with torch.no_grad():
        images = jet.decode(tokens.to(device, next(jet.parameters()).dtype))
    ncols = args.ncols or math.ceil(math.sqrt(len(images)))
    print(save_grid(to_uint8(images), args.out, ncols=ncols))


# -- argument parsing --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetblocks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    train = commands.add_parser("train", help="train a Jet (single process or under torchrun)")
    model = train.add_mutually_exclusive_group()
    model.add_argument(
        "--preset",
        default="mnist",
        choices=sorted(PRESETS),
        help="JetConfig preset (default: mnist)",
    )
    model.add_argument("--config", help="a JetConfig JSON file instead of a preset")
    _data_arguments(train)
    _runtime_arguments(train)
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="global batch size (split over processes and accumulation steps)",
    )
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an EMA of the weights with this decay (evaluated and sampled)",
    )
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 islands)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument(
        "--backprop",
        choices=BACKPROP_MODES,
        default=None,
        help="how gradients pass the couplings (default: the config's): store activations, "
        "checkpoint each coupling, or rebuild inputs from outputs (memory-saving)",
    )
    train.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each coupling in backward (for a Jet: --backprop checkpoint)",
    )
    train.add_argument(
        "--distributed",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="data-parallel strategy under torchrun",
    )
    train.add_argument("--eval-every", type=int, default=None, help="default: at the end")
    train.add_argument("--checkpoint-every", type=int, default=None, help="default: at the end")
    train.add_argument("--log-every", type=int, default=50)
    train.add_argument("--eval-batch-size", type=int, default=250)
    train.add_argument(
        "--eval-before", action="store_true", help="also evaluate before training and report it"
    )
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="print held-out bits/dim as JSON")
    _checkpoint_arguments(evaluate)
    _data_arguments(evaluate)
    evaluate.add_argument("--split", default="test", choices=("train", "test"))
    evaluate.add_argument("--batch-size", type=int, default=250)
    evaluate.set_defaults(run=cmd_eval)

    sample = commands.add_parser("sample", help="write a PNG grid of samples")
    _checkpoint_arguments(sample)
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--ncols", type=int, default=None)
    sample.add_argument("--out", required=True, help="PNG file")
    sample.set_defaults(run=cmd_sample)

    encode = commands.add_parser("encode", help="images -> tokens in a .safetensors file")
    _checkpoint_arguments(encode)
    _data_arguments(encode)
    encode.add_argument("--split", default="test", choices=("train", "test"))
    encode.add_argument("--batch-size", type=int, default=250)
    encode.add_argument("--limit", type=int, default=None, help="encode at most this many images")
    encode.add_argument("--out", required=True, help=".safetensors file (tokens, logdet, label)")
    encode.set_defaults(run=cmd_encode)

    decode = commands.add_parser("decode", help="tokens in a .safetensors file -> PNG grid")
    _checkpoint_arguments(decode)
    decode.add_argument("--tokens", required=True, help=".safetensors file with 'tokens'")
    decode.add_argument("--ncols", type=int, default=None)
    decode.add_argument("--out", required=True, help="PNG file")
    decode.set_defaults(run=cmd_decode)
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="mnist5k",
        help="mnist5k, digits, photo-patches, an image folder, an .npz file or "
        "a CIFAR-10 batches folder (default: mnist5k)",
    )


def _runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, a checkpoint or a save_pretrained directory",
    )
    _runtime_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"jetblocks {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
