"""Measure a trained run of the JetFormer example (``python -m examples.jetformer train``).

Held-out bits/dim, conditioning consistency without and with guidance judged by models that
are not the JetFormer's own code path (``benchmarks/jetformer_judges.py``: a CNN trained on
the real digits; for shapes scenes, rules that read the scene back from pixels and a CNN
trained on real objects), captioning accuracy (text runs), and sampling images/s with and
without the KV cache. It writes the numbers, the settings and the load averages as JSON
(``measure.json`` in the run unless ``--out``) and the sampled grids as
``measure_w<guidance>.png`` in the run. ``benchmarks/jetformer_quality.py`` trains a preset
and measures it with :func:`measure` in one process; its ``--smoke`` runs both in seconds.

The numbers depend on the run, ``--seed`` and the number of intra-op threads (summation
order) and on nothing else; the sampling speed needs an otherwise idle machine.

    python benchmarks/jetformer_measure.py --run runs/jetformer-tiny
    python benchmarks/jetformer_measure.py --run runs/jetformer-text --scenes 200 --threads 1 \
        --out /tmp/jetformer-text-measure.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from jetformer_judges import (
    caption_accuracy,
    digit_of_caption,
    judged_agreement,
    predict,
    scene_agreement,
    train_classifier,
    train_object_judge,
)
from throughput import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples.jetformer
from examples.jetformer.data import describe
from examples.jetformer.run import load_run, sampling_settings
from examples.jetformer.sampling import caption_images, sample_images
from examples.jetformer.task import JetFormerTask, TaskConfig
from jetblocks.checkpoint import read_json
from jetblocks.integrations.images import save_grid
from jetblocks.likelihood import to_uint8
from jetblocks.validation import GUIDANCE, POSITIVE_INT, SAMPLER, SEED, TEMPERATURE


class _Local:
    """A one-process environment for loaders outside training."""

    rank, world_size = 0, 1


def _timed_sampling(model, text, guidance, temperature, device, use_cache) -> float:
    generator = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    sample_images(
        model, text, guidance=guidance, temperature=temperature, generator=generator,
        use_cache=use_cache,
    )  # fmt: skip
    return time.perf_counter() - start


def measure(
    run_dir: str | os.PathLike,
    *,
    per_prompt: int = 50,
    scenes: int = 64,
    speed_batch: int = 10,
    guidance: float | None = None,
    temperature: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Held-out bits/dim, conditioning consistency with and without guidance, captioning
    accuracy and sampling speed of the run in ``run_dir``; saves the grids in the run.

    ``per_prompt`` samples per class (digits); ``scenes`` held-out scenes prompted and
    captioned (shapes; also the images captioned of a digit run); guidance, temperature and
    sampler default to the run's ``sample`` settings; ``seed`` seeds the sampled images.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data = load_run(run_dir, device)
    spec, run = data.spec, Path(run_dir)
    guidance, temperature, sampler = sampling_settings(spec, guidance, temperature, sampler)
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
    n = per_prompt
    if digits:  # a classifier trained on the real digits judges the samples
        classifier = train_classifier(data.train.images, data.train.labels)
        accuracy = (predict(classifier, data.test.images) == data.test.labels).float().mean()
        results["classifier_test_accuracy"] = accuracy.item()
        labels = torch.arange(len(data.prompts)).repeat_interleave(n)
        text, text_mask = data.prompts[labels], data.prompt_mask[labels]  # label or caption
    elif shapes:  # parse_scene reads the scene back; a classifier of real objects checks it
        prompted = data.test_scenes[:scenes]
        text, _, text_mask = data.encode([describe(scene) for scene in prompted])
        judge = train_object_judge(data.train.images, data.train_scenes)
        real = judged_agreement(judge, data.test.images, data.test_scenes).mean()
        results["object_judge_test_accuracy"] = real.item()
    for w in (0.0, guidance) if digits or shapes else ():
        generator = torch.Generator(device).manual_seed(seed)
        images = sample_images(
            model, text.to(device), text_mask=text_mask.to(device), guidance=w,
            temperature=temperature, sampler=sampler, generator=generator,
        )  # fmt: skip
        images = to_uint8(images).cpu()
        if digits:
            score = (predict(classifier, images) == labels).float().mean().item()
            results[f"class_consistency_w{w:g}"] = score
        else:
            score = sum(scene_agreement(im, s) for im, s in zip(images, prompted, strict=True))
            results[f"scene_agreement_w{w:g}"] = score / len(prompted)
            judged = judged_agreement(judge, images, prompted).mean().item()
            results[f"scene_agreement_judged_w{w:g}"] = judged
        save_grid(images, run / f"measure_w{w:g}.png", ncols=n if digits else 8)
    results.update(guidance=guidance, temperature=temperature, sampler=sampler)
    if spec["conditioning"] == "text":
        ids = caption_images(model, data.test.images[:scenes].to(device))
        captions = [data.tokenizer.decode(row.tolist()) for row in ids]
        if digits:
            found = torch.tensor([digit_of_caption(text) for text in captions])
            correct = found == data.test.labels[: len(ids)]
            results["captioning_accuracy"] = correct.float().mean().item()
        elif shapes:
            results["captioning_accuracy"] = caption_accuracy(
                captions, data.test_scenes[: len(ids)]
            )
        results["caption_examples"] = captions[:4]

    speed_text = data.prompts[torch.arange(speed_batch) % len(data.prompts)].to(device)
    for use_cache in (True, False):
        seconds = _timed_sampling(model, speed_text, 0.0, temperature, device, use_cache)
        key = "with_kv_cache" if use_cache else "without_kv_cache"
        results[f"sampling_images_per_s_{key}"] = round(speed_batch / seconds, 2)
    results["sampling_batch"] = speed_batch
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", dest="run_dir", required=True, help="a run made by train")
    parser.add_argument("--per-prompt", type=POSITIVE_INT.parse, default=50)
    parser.add_argument("--scenes", type=POSITIVE_INT.parse, default=64)
    parser.add_argument("--speed-batch", type=POSITIVE_INT.parse, default=10)
    parser.add_argument("--guidance", type=GUIDANCE.parse, help="default: the preset's")
    parser.add_argument("--temperature", type=TEMPERATURE.parse, help="default: the preset's")
    parser.add_argument("--sampler", choices=SAMPLER.options, default=None)
    parser.add_argument("--seed", type=SEED.parse, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=POSITIVE_INT.parse, default=2)
    parser.add_argument("--out", help="the JSON report (default RUN/measure.json)")
    args = parser.parse_args(argv)
    args.out = args.out or str(Path(args.run_dir) / "measure.json")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    measured = measure(
        args.run_dir, per_prompt=args.per_prompt, scenes=args.scenes,
        speed_batch=args.speed_batch, guidance=args.guidance, temperature=args.temperature,
        sampler=args.sampler, seed=args.seed, device=args.device,
    )  # fmt: skip
    print(json.dumps(measured, indent=2))
    write_report(
        args.out,
        {
            "benchmark": "jetformer_measure",
            "settings": {**vars(args), "torch_threads": torch.get_num_threads()},
            "load_average_before": load_before,
            "measure": measured,
        },
    )
    return measured


if __name__ == "__main__":
    main()
