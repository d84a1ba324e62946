"""The judges of the JetFormer example's samples and captions; their own accuracy as JSON.

``benchmarks/jetformer_measure.py`` scores a trained run with them, by code that shares
nothing with the JetFormer's own path:

- :func:`train_classifier` / :func:`predict`: a small CNN (:class:`DigitClassifier`) trained
  on the real digits, which names the class of each generated digit;
- :func:`parse_scene` / :func:`scene_agreement`: rules that read a shapes scene back from
  pixels (the palette colour nearest the lit pixels' mean, the shape from how much of its
  bounding box the object fills; exact on the data);
- :func:`train_object_judge` / :func:`judged_agreement`: the same CNN trained on the objects
  of real shapes scenes, a second reader of generated scenes;
- :func:`parse_caption` / :func:`caption_accuracy` and :func:`digit_of_caption`: generated
  captions read back as scenes or digits.

Run as a script, it trains the two CNN judges on the real training data and writes their
held-out accuracy, and how exactly the rules read the held-out scenes and captions back,
with the settings and the load averages:

    python benchmarks/jetformer_judges.py --out benchmarks/results/jetformer_judges.json
    python benchmarks/jetformer_judges.py --smoke --out /tmp/judges.json  # 8x8 digits, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from throughput import parse_args, write_report
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples.jetformer
from examples.jetformer.data import (
    COLOURS,
    DIGIT_NAMES,
    SHAPES,
    SIZE,
    Scene,
    shapes_dataset,
)
from jetblocks.integrations.datasets import open_source
from jetblocks.likelihood import pixels_to_unit

# -- reading scenes and captions back ----------------------------------------------------------


def parse_half(pixels: np.ndarray) -> tuple[str, str] | None:
    """``(colour, shape)`` of the object in ``pixels [h, w, 3]``, or None if it is empty.

    Colour: the palette colour nearest the mean of the lit pixels. Shape: how much of its
    bounding box the object fills (square 1, circle ~0.76, triangle ~0.57).
    """
    lit = pixels.max(-1) > 100
    if lit.sum() < 4:
        return None
    mean = pixels[lit].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.square(mean - COLOURS[c]).sum()))
    rows, cols = np.nonzero(lit)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = lit.sum() / box
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    return colour, shape


def parse_scene(image: Tensor, vertical: bool) -> tuple[tuple[str, str] | None, ...]:
    """The two objects of a uint8 ``[3, 16, 16]`` image split along the scene's axis."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    if vertical:
        halves = pixels[: SIZE // 2], pixels[SIZE // 2 :]
    else:
        halves = pixels[:, : SIZE // 2], pixels[:, SIZE // 2 :]
    return tuple(parse_half(half) for half in halves)


def scene_halves(images: Tensor, vertical: Sequence[bool]) -> Tensor:
    """The two halves of each uint8 ``[B, 3, 16, 16]`` scene along its axis, each in the
    top-left corner of a black 16x16 canvas: ``[2B, 3, 16, 16]`` (first, second, ...)."""
    halves = torch.zeros(2 * len(images), *images.shape[1:], dtype=images.dtype)
    half = SIZE // 2
    for index, (image, is_vertical) in enumerate(zip(images, vertical, strict=True)):
        if is_vertical:
            halves[2 * index, :, :half] = image[:, :half]
            halves[2 * index + 1, :, :half] = image[:, half:]
        else:
            halves[2 * index, :, :, :half] = image[:, :, :half]
            halves[2 * index + 1, :, :, :half] = image[:, :, half:]
    return halves


def object_labels(scenes: Sequence[Scene]) -> Tensor:
    """``colour * 3 + shape`` of each scene's first and second object, ``[2B]``."""
    colours = list(COLOURS)
    return torch.tensor(
        [colours.index(c) * len(SHAPES) + SHAPES.index(s)
         for scene in scenes for c, s in (scene.first, scene.second)]
    )  # fmt: skip


def scene_agreement(image: Tensor, scene: Scene) -> float:
    """Fraction of the 4 attributes (2 colours, 2 shapes) that ``image`` gets right."""
    found = parse_scene(image, scene.vertical)
    score = 0
    for want, got in zip((scene.first, scene.second), found, strict=True):
        if got is not None:
            score += (want[0] == got[0]) + (want[1] == got[1])
    return score / 4


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes (the inverse of the example's ``data.describe``), or
    None."""
    words = text.lower().replace("to the", "").split()
    things = [
        (words[i - 1], word)
        for i, word in enumerate(words)
        if word in SHAPES and i > 0 and words[i - 1] in COLOURS
    ]
    relations = {"above": (True, False), "on": (True, False), "over": (True, False),
                 "below": (True, True), "under": (True, True), "beneath": (True, True),
                 "left": (False, False), "right": (False, True)}  # fmt: skip
    found = [relations[word] for word in words if word in relations]
    if len(things) != 2 or len(found) != 1:
        return None
    vertical, reversed_ = found[0]
    first, second = things[::-1] if reversed_ else things
    return Scene(first, second, vertical)


def caption_accuracy(captions: Sequence[str], scenes: Sequence[Scene]) -> float:
    """Mean fraction of 4 attributes + the axis a generated caption gets right."""
    total = 0.0
    for text, scene in zip(captions, scenes, strict=True):
        found = parse_caption(text)
        if found is None:
            continue
        pairs = zip(found.first + found.second, scene.first + scene.second, strict=True)
        total += (sum(a == b for a, b in pairs) + (found.vertical == scene.vertical)) / 5
    return total / len(captions)


def digit_of_caption(text: str) -> int:
    """The digit a caption names (as a word or a numeral), or -1."""
    for word in text.lower().split():
        if word in DIGIT_NAMES:
            return DIGIT_NAMES.index(word)
        if word.isdigit() and len(word) == 1:
            return int(word)
    return -1


# -- the CNN judges ----------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers with a 2x2 max-pool after the first two, pooled to 4x4, then
    dropout and a linear layer; any input size >= 8."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * 16, classes))

    def forward(self, images: Tensor) -> Tensor:
        """Logits for float images in ``[-1, 1]``."""
        return self.out(self.features(images).flatten(1))


def shifted(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by up to ``max_shift`` pixels in each direction, zero-padded."""
    height, width = images.shape[-2:]
    padded = F.pad(images, [max_shift] * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    crops = zip(padded, offsets.tolist(), strict=True)
    return torch.stack([p[..., dy : dy + height, dx : dx + width] for p, (dy, dx) in crops])


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int = 12, seed: int = 0
) -> DigitClassifier:
    """Fit on uint8 ``images [N, C, H, W]`` shifted by up to 2 pixels (Adam, batch 64, lr 2e-3
    decayed to 0 by a cosine)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * -(-len(images) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(64):
            batch = shifted(pixels_to_unit(images[index]) + 1.0, 2, generator) - 1.0
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor) -> Tensor:
    """Predicted classes of uint8 images."""
    return torch.cat([model(pixels_to_unit(chunk)).argmax(-1) for chunk in images.split(500)])


def train_object_judge(images: Tensor, scenes, seed: int = 0) -> DigitClassifier:
    """A classifier of ``colour * 3 + shape`` (12 classes) for each half of a shapes scene
    (:func:`scene_halves`), trained on real scenes."""
    halves = scene_halves(images, [scene.vertical for scene in scenes])
    return train_classifier(halves, object_labels(scenes), epochs=6, seed=seed)


def judged_agreement(judge: DigitClassifier, images: Tensor, scenes) -> Tensor:
    """Per image, the fraction of its prompt's 4 attributes (2 colours, 2 shapes) the judge
    sees in the generated ``images``."""
    found = predict(judge, scene_halves(images, [scene.vertical for scene in scenes]))
    wanted = object_labels(scenes)
    colour = (found // len(SHAPES) == wanted // len(SHAPES)).float()
    shape = (found % len(SHAPES) == wanted % len(SHAPES)).float()
    return (colour + shape).view(-1, 2).sum(1) / 4


# -- the script: the judges' own accuracy ------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", default="mnist5k", help="the labelled digit set")
    parser.add_argument("--epochs", type=int, default=12, help="of the digit classifier")
    parser.add_argument("--train-scenes", type=int, default=8000, help="as the example's")
    parser.add_argument("--test-scenes", type=int, default=500, help="as the example's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    smoke = dict(digits="digits", epochs=1, train_scenes=200, test_scenes=50)
    args = parse_args(parser, "benchmarks/results/jetformer_judges.json", smoke, argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    start = time.perf_counter()
    train, test = (open_source(args.digits, split) for split in ("train", "test"))
    classifier = train_classifier(train.images, train.labels, args.epochs, args.seed)
    digits = {
        "test_accuracy": (predict(classifier, test.images) == test.labels).float().mean().item(),
        "train_images": len(train),
        "test_images": len(test),
        "wall_s": round(time.perf_counter() - start, 1),
    }

    start = time.perf_counter()
    images, scenes, _ = shapes_dataset(args.train_scenes, seed=0)  # the example's splits
    test_images, test_scenes, test_captions = shapes_dataset(args.test_scenes, seed=1)
    judge = train_object_judge(images, scenes, args.seed)
    read = [scene_agreement(i, s) for i, s in zip(test_images, test_scenes, strict=True)]
    exact = [parse_caption(c) == s for c, s in zip(test_captions, test_scenes, strict=True)]
    objects = {
        "judge_test_agreement": judged_agreement(judge, test_images, test_scenes).mean().item(),
        "parse_scene_test_agreement": sum(read) / len(read),
        "parse_caption_test_exact": sum(exact) / len(exact),
        "train_scenes": len(scenes),
        "test_scenes": len(test_scenes),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_report(
        args.out,
        {
            "benchmark": "jetformer_judges",
            "settings": {**vars(args), "torch_threads": torch.get_num_threads()},
            "load_average_before": load_before,
            "digit_classifier": digits,
            "object_judge": objects,
        },
    )


__all__ = [
    "DigitClassifier",
    "caption_accuracy",
    "digit_of_caption",
    "judged_agreement",
    "object_labels",
    "parse_caption",
    "parse_half",
    "parse_scene",
    "predict",
    "scene_agreement",
    "scene_halves",
    "shifted",
    "train_classifier",
    "train_object_judge",
]


if __name__ == "__main__":
    main()
