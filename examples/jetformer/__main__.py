"""JetFormer example: train, sample and caption (run from the repository root).

    python -m examples.jetformer train --preset cpu-tiny --out runs/jetformer-tiny
    python -m examples.jetformer sample --run runs/jetformer-tiny --guidance 2 --out grid.png
    python -m examples.jetformer train --preset cpu-tiny-text --out runs/jetformer-text
    python -m examples.jetformer caption --run runs/jetformer-text --n 8
    python -m examples.jetformer presets          # parameter counts of every preset

Training reuses ``jetblocks.train.Trainer`` (checkpoints, ``--resume``, progress, metrics,
sample grids, ``torchrun`` data parallelism). Measuring a run (held-out bits/dim, judged
conditioning consistency, captioning accuracy, sampling speed) is a benchmark script:
``python benchmarks/jetformer_measure.py --run runs/jetformer-tiny``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from jetblocks.checkpoint import read_json
from jetblocks.config import add_arguments, arguments_of
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import to_uint8
from jetblocks.run_folder import RunFolder
from jetblocks.train import DivergenceError, TrainConfig, Trainer, TrainingInterrupted
from jetblocks.validation import GUIDANCE, POSITIVE_INT, SAMPLER, SEED, TEMPERATURE, Number

from .model import JetFormer, JetFormerConfig, meta_parameter_counts
from .presets import PRESETS, preset, with_text_conditioning
from .run import TOKENIZER_FILE, RunData, load_run, sampling_settings, write_run_file
from .sampling import caption_images, sample_images
from .task import JetFormerTask, TaskConfig, jetformer_optimizer


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_train(args) -> dict:
    from jetblocks.integrations.distributed import init_distributed

    env = init_distributed(args.device)
    out = Path(args.out)
    run = RunFolder(out, main=env.is_main)
    resuming = args.resume and (out / "run.json").is_file()
    run.open(resume=args.resume, overwrite=args.overwrite)  # locked before anything is written
    try:
        return _train(args, env, run, resuming)
    finally:
        run.close()


def _train(args, env, run: RunFolder, resuming: bool) -> dict:
    out = run.path
    if resuming:
        spec = read_json(out / "run.json")["spec"]
        spec["train"].pop("decay_kernels_only", None)  # runs of earlier versions: now the default
    else:
        spec = preset(args.preset)
        if args.data is not None:
            spec["data"] = args.data
        if args.conditioning == "text" and spec["conditioning"] == "class":
            spec = with_text_conditioning(spec)
        for setting in args.set or ():
            apply_setting(spec, setting)
    spec["train"].update(arguments_of(args, TrainConfig))  # the flags given (resumable ones)
    tokenizer = None if resuming else args.tokenizer  # a resumed run keeps its own
    data = RunData(spec, out, create_tokenizer=not resuming, tokenizer=tokenizer)
    if env.is_main and not resuming:
        write_run_file(out, args.preset, spec)
        if data.tokenizer is not None:
            data.tokenizer.save(out / TOKENIZER_FILE)
    model_config = data.model_config()
    steps = spec["train"]["steps"]
    train_config = TrainConfig(
        **{"eval_every": steps, "checkpoint_every": steps, **spec["train"], "seed": args.seed}
    )
    task_config = TaskConfig(
        conditioning=spec["conditioning"], curriculum_steps=steps, **spec["task"]
    )
    torch.manual_seed(args.seed)
    local = train_config.local_batch_size(env.world_size)
    eval_batch = min(args.eval_batch_size, len(data.test))
    trainer = Trainer(
        JetFormer(model_config),
        JetFormerTask(task_config, data.prompts, data.prompt_mask),
        train_config,
        model_config=model_config.to_dict(),
        train_loader=data.loader("train", local, env, args.seed, training=True),
        eval_batches=lambda: data.loader("test", eval_batch, env, args.seed, training=False),
        out_dir=run,
        env=env,
        optimizer=jetformer_optimizer,
    )
    if env.is_main:
        params = sum(p.numel() for p in trainer.model.parameters())
        print(f"JetFormer ({params:,} parameters) on {spec['data']}: {steps} steps of "
              f"{train_config.batch_size} on {env.world_size} x {env.device}")  # fmt: skip
    start = time.perf_counter()
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    summary = {
        "step": trainer.step,
        **{f"eval_{k}": v for k, v in result.items()},
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if env.is_main:
        print(json.dumps(summary))
        print(f"outputs in {out}: checkpoints/, metrics.jsonl, samples/, run.json")
    return summary


def apply_setting(spec: dict, setting: str) -> None:
    """``section.key=value`` (value as JSON, else a string) into the preset ``spec``."""
    name, sep, text = setting.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or section not in ("model", "train", "task", "sample"):
        raise ValueError(
            f"--set expects SECTION.KEY=VALUE with SECTION one of model, train, task, sample; "
            f"got {setting!r}"
        )
    known = {
        "model": {f.name for f in dataclasses.fields(JetFormerConfig)},
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
        "task": {f.name for f in dataclasses.fields(TaskConfig)},
        "sample": {"guidance", "temperature", "sampler"},
    }[section]
    if key not in known:
        raise ValueError(f"--set: {section} has no {key!r}; expected one of {sorted(known)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    spec[section][key] = value


def _prompts(data: RunData, given: Sequence[str] | None):
    """``(ids, mask, texts)`` of the given prompts (class ids or captions), else the run's."""
    if not given:
        return data.prompts, data.prompt_mask, data.prompt_texts
    if data.tokenizer is None:
        classes = data.spec["model"]["vocab_size"]
        rule = Number(int, low=0, high=classes - 1)
        try:
            ids = torch.tensor([[rule.parse(c)] for c in given])
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"--prompt: {error} (class ids of a {classes}-class run)") from None
        return ids, torch.ones_like(ids, dtype=torch.bool), list(given)
    ids, _, mask = data.encode(list(given))
    return ids, mask, list(given)


def cmd_sample(args) -> dict:
    device = _device(args)
    model, data = load_run(args.run_dir, device)
    prompts, masks, texts = _prompts(data, args.prompt)
    text = prompts.repeat_interleave(args.per_prompt, dim=0).to(device)
    text_mask = masks.repeat_interleave(args.per_prompt, dim=0).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    guidance, temperature, sampler = sampling_settings(
        data.spec, args.guidance, args.temperature, args.sampler
    )
    images = sample_images(
        model, text, text_mask=text_mask, guidance=guidance, temperature=temperature,
        sampler=sampler, generator=generator, use_cache=not args.no_cache,
    )  # fmt: skip
    path = save_grid(to_uint8(images), args.out, ncols=args.per_prompt)
    print(f"{path}: one row per prompt, guidance {guidance}, temperature {temperature}")
    for row, prompt in enumerate(texts):
        print(f"  row {row}: {prompt}")
    return {"out": str(path)}


def cmd_caption(args) -> dict:
    model, data = load_run(args.run_dir, _device(args))
    if data.tokenizer is None:
        raise ValueError("captioning needs a text-conditioned run (cpu-tiny-text)")
    pixels = data.test.images[: args.n].to(_device(args))
    ids = caption_images(model, pixels)
    captions = [data.tokenizer.decode(row.tolist()) for row in ids]
    for index, caption in enumerate(captions):
        print(f"{index}: {caption!r}  (data: {data.test_captions[index]!r})")
    return {"captions": captions}


def cmd_presets(args) -> dict:
    counts = {}
    for name, spec in PRESETS.items():
        model = dict(spec["model"])
        model["vocab_size"] = model["vocab_size"] or 64
        counts[name] = meta_parameter_counts(JetFormerConfig(**model))
        print(name, json.dumps(counts[name]))
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.jetformer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a preset with jetblocks' Trainer")
    train.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    train.add_argument(
        "--data",
        default=None,
        help="override the preset's data: a built-in set, a path, 'synthetic' (random images "
        "and, for text, random captions), or for text conditioning a captioned image folder "
        '(images + captions.jsonl, lines {"file": "relative/path.png", "caption": "..."})',
    )
    train.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH.model",
        help="text conditioning: this sentencepiece model (copied into the run as "
        "tokenizer.model) instead of one trained from the captions; its vocabulary size must "
        "equal model.vocab_size unless that is null",
    )
    train.add_argument(
        "--conditioning",
        choices=("class", "text"),
        default=None,
        help="text: condition a labelled set on generated captions instead of labels",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any preset value, e.g. model.dropout=0.1 or task.text_first_prob=0.5",
    )
    add_arguments(train, TrainConfig, skip=("seed",), defaults=False)
    train.add_argument("--eval-batch-size", type=POSITIVE_INT.parse, default=250)
    train.add_argument("--out", required=True)
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true")
    existing.add_argument("--overwrite", action="store_true")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser("sample", help="PNG grid: one row per class or prompt")
    sample.add_argument("--prompt", action="append", help="a class id or a caption (repeat)")
    sample.add_argument("--per-prompt", type=POSITIVE_INT.parse, default=8)
    sample.add_argument("--no-cache", action="store_true", help="recompute instead of KV cache")
    sample.add_argument("--out", required=True)
    sample.set_defaults(run=cmd_sample)

    caption = commands.add_parser("caption", help="caption held-out images (image first)")
    caption.add_argument("--n", type=POSITIVE_INT.parse, default=8)
    caption.set_defaults(run=cmd_caption)

    for sub in (sample, caption):
        sub.add_argument(
            "--run", dest="run_dir", required=True, help="a run directory made by train"
        )
    sample.add_argument("--guidance", type=GUIDANCE.parse, help="default: the preset's")
    sample.add_argument("--temperature", type=TEMPERATURE.parse, help="default: the preset's")
    sample.add_argument("--sampler", choices=SAMPLER.options, default=None)
    for sub in (train, sample, caption):
        sub.add_argument("--seed", type=SEED.parse, default=0)
        sub.add_argument("--device", default=None)
    presets = commands.add_parser("presets", help="print the presets' parameter counts")
    presets.set_defaults(run=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a failure is one line on stderr (exit 2; 130/143 after a signal)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TrainingInterrupted as error:
        print(f"jetformer {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except (ValueError, TypeError, OSError, DivergenceError) as error:
        print(f"jetformer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jetformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
