"""JetFormer example: train, sample, caption and measure (run from the repository root).

    python -m examples.jetformer train --preset cpu-tiny --out runs/jetformer-tiny
    python -m examples.jetformer sample --run runs/jetformer-tiny --guidance 2 --out grid.png
    python -m examples.jetformer measure --run runs/jetformer-tiny
    python -m examples.jetformer train --preset cpu-tiny-text --out runs/jetformer-text
    python -m examples.jetformer caption --run runs/jetformer-text --n 8
    python -m examples.jetformer presets          # parameter counts of every preset

Training reuses ``jetblocks.train.Trainer`` (checkpoints, ``--resume``, progress, metrics,
sample grids, ``torchrun`` data parallelism).
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

from jetblocks.checkpoint import atomic_file, read_json
from jetblocks.config import add_arguments, arguments_of
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import to_uint8
from jetblocks.run_folder import RunFolder
from jetblocks.train import DivergenceError, TrainConfig, Trainer, TrainingInterrupted
from jetblocks.validation import GUIDANCE, POSITIVE_INT, SAMPLER, SEED, TEMPERATURE, Number

from .classifier import judged_agreement, predict, train_classifier, train_object_judge
from .data import describe, digit_of_caption, parse_caption, scene_agreement
from .model import JetFormer, JetFormerConfig, meta_parameter_counts
from .presets import PRESETS, preset, with_text_conditioning
from .run import TOKENIZER_FILE, RunData, load_run, write_run_file
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
    guidance, temperature, sampler = _sampling(data.spec, args)
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


def caption_accuracy(captions: Sequence[str], scenes) -> float:
    """Mean fraction of 4 attributes + the axis a generated caption gets right."""
    total = 0.0
    for text, scene in zip(captions, scenes, strict=True):
        found = parse_caption(text)
        if found is None:
            continue
        pairs = zip(found.first + found.second, scene.first + scene.second, strict=True)
        total += (sum(a == b for a, b in pairs) + (found.vertical == scene.vertical)) / 5
    return total / len(captions)


def _timed_sampling(model, text, guidance, temperature, device, use_cache) -> float:
    generator = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    sample_images(
        model, text, guidance=guidance, temperature=temperature, generator=generator,
        use_cache=use_cache,
    )  # fmt: skip
    return time.perf_counter() - start


def _sampling(spec: dict, args) -> tuple[float, float, str]:
    """Guidance, temperature and sampler: the run's ``sample`` settings unless overridden."""
    settings = spec["sample"]
    guidance = settings["guidance"] if args.guidance is None else args.guidance
    temperature = settings["temperature"] if args.temperature is None else args.temperature
    sampler = args.sampler or settings.get("sampler", "exact")
    return guidance, temperature, sampler


def cmd_measure(args) -> dict:
    """Held-out bits/dim, conditioning consistency with and without guidance, sampling speed."""
    device = _device(args)
    model, data = load_run(args.run_dir, device)
    spec, run = data.spec, Path(args.run_dir)
    guidance, temperature, sampler = _sampling(spec, args)
    results: dict = {"run": str(run), "preset": read_json(run / "run.json")["preset"]}
    task_config = TaskConfig(conditioning=spec["conditioning"], **spec["task"])
    task = JetFormerTask(task_config, data.prompts, data.prompt_mask)
    generator = torch.Generator(device).manual_seed(10_007)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in data.loader("test", 250, _Local(), 0, training=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            for name, values in task.evaluate(model, batch, generator).items():
                sums[name] = sums.get(name, 0.0) + values.double().sum().item()
    results.update({f"held_out_{k}": v / len(data.test) for k, v in sums.items()})

    shapes = spec["data"] == "shapes"
    digits = not shapes and bool((data.test.labels >= 0).all())  # labels or digit captions
    n = args.per_prompt
    if digits:  # a classifier trained on the real digits judges the samples
        classifier = train_classifier(data.train.images, data.train.labels)
        accuracy = (predict(classifier, data.test.images) == data.test.labels).float().mean()
        results["classifier_test_accuracy"] = accuracy.item()
        labels = torch.arange(len(data.prompts)).repeat_interleave(n)
        text, text_mask = data.prompts[labels], data.prompt_mask[labels]  # label or caption
    elif shapes:  # parse_scene reads the scene back; a classifier of real objects checks it
        scenes = data.test_scenes[: args.scenes]
        text, _, text_mask = data.encode([describe(scene) for scene in scenes])
        judge = train_object_judge(data.train.images, data.train_scenes)
        real = judged_agreement(judge, data.test.images, data.test_scenes).mean()
        results["object_judge_test_accuracy"] = real.item()
    for w in (0.0, guidance) if digits or shapes else ():
        generator = torch.Generator(device).manual_seed(args.seed)
        images = sample_images(
            model, text.to(device), text_mask=text_mask.to(device), guidance=w,
            temperature=temperature, sampler=sampler, generator=generator,
        )  # fmt: skip
        images = to_uint8(images).cpu()
        if digits:
            score = (predict(classifier, images) == labels).float().mean().item()
            results[f"class_consistency_w{w:g}"] = score
        else:
            score = sum(scene_agreement(im, s) for im, s in zip(images, scenes, strict=True))
            results[f"scene_agreement_w{w:g}"] = score / len(scenes)
            judged = judged_agreement(judge, images, scenes).mean().item()
            results[f"scene_agreement_judged_w{w:g}"] = judged
        save_grid(images, run / f"measure_w{w:g}.png", ncols=n if digits else 8)
    results.update(guidance=guidance, temperature=temperature, sampler=sampler)
    if spec["conditioning"] == "text":
        ids = caption_images(model, data.test.images[: args.scenes].to(device))
        captions = [data.tokenizer.decode(row.tolist()) for row in ids]
        if digits:
            found = torch.tensor([digit_of_caption(text) for text in captions])
            correct = found == data.test.labels[: len(ids)]
            results["captioning_accuracy"] = correct.float().mean().item()
        elif shapes:
            scenes = data.test_scenes[: len(ids)]
            results["captioning_accuracy"] = caption_accuracy(captions, scenes)
        results["caption_examples"] = captions[:4]

    speed_text = data.prompts[torch.arange(args.speed_batch) % len(data.prompts)].to(device)
    for use_cache in (True, False):
        seconds = _timed_sampling(model, speed_text, 0.0, temperature, device, use_cache)
        key = "with_kv_cache" if use_cache else "without_kv_cache"
        results[f"sampling_images_per_s_{key}"] = round(args.speed_batch / seconds, 2)
    results["sampling_batch"] = args.speed_batch
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    with atomic_file(run / "measure.json") as staging:
        staging.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


class _Local:
    """A one-process environment for loaders outside training."""

    rank, world_size = 0, 1


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

    measure = commands.add_parser("measure", help="bits/dim, consistency, sampling speed")
    measure.add_argument("--per-prompt", type=POSITIVE_INT.parse, default=50)
    measure.add_argument("--scenes", type=POSITIVE_INT.parse, default=64)
    measure.add_argument("--speed-batch", type=POSITIVE_INT.parse, default=10)
    measure.set_defaults(run=cmd_measure)

    for sub in (sample, caption, measure):
        sub.add_argument(
            "--run", dest="run_dir", required=True, help="a run directory made by train"
        )
    for sub in (sample, measure):
        sub.add_argument("--guidance", type=GUIDANCE.parse, help="default: the preset's")
        sub.add_argument("--temperature", type=TEMPERATURE.parse, help="default: the preset's")
        sub.add_argument("--sampler", choices=SAMPLER.options, default=None)
    for sub in (train, sample, caption, measure):
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
