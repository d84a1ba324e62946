"""Data for the JetFormer example: captioned coloured shapes it draws itself, digit captions.

**Shapes** (16x16 RGB, black background): two objects of 7x7 pixels, each a square, a circle
or a triangle in red, green, blue or yellow, one above the other or side by side. Every
image has a caption drawn from several phrasings of the same scene (``"a red square above
a blue circle"``, ``"a blue circle below a red square"``, ``"there is a red square on top
of a blue circle"``, ...). ``benchmarks/jetformer_judges.py`` reads scenes back from
pixels and from captions, to score how well generated images and captions match.

**Digits**: captions such as ``"a handwritten seven"`` or ``"the digit 7"`` for labelled sets.

**Captioned folders** (:func:`captioned_folder`): images plus a ``captions.jsonl`` file, one
JSON object a line ``{"file": "relative/path.png", "caption": "..."}``.

**Synthetic captions** (:func:`random_captions`): random words, for throughput runs.

:class:`CaptionedSource` is an image source (see ``jetblocks.integrations.datasets``) whose
batches also hold ``text`` (token ids ``[B, L]``), ``text_loss`` and ``text_mask``
(:func:`layout_captions`: the reference's ``ignore_pad`` layouts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from jetblocks.integrations.datasets import (
    ArraySource,
    ImageFolder,
    ImageSource,
    Subset,
    load_batch,
)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 90, 240),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")
SIZE, OBJECT = 16, 7
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# (first object, relation words, second object): first is above / left of second.
_VERTICAL = ("above", "on top of", "over")
_VERTICAL_REVERSED = ("below", "under", "beneath")
_HORIZONTAL = ("left of", "to the left of")
_HORIZONTAL_REVERSED = ("right of", "to the right of")
_TEMPLATES = ("{a} {rel} {b}", "there is {a} {rel} {b}", "{a} is {rel} {b}", "{A} {rel} {B}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """``first`` is above (``vertical``) or left of (not ``vertical``) ``second``."""

    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]
    vertical: bool


def random_scene(rng: np.random.Generator) -> Scene:
    def thing():
        return (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))

    return Scene(thing(), thing(), bool(rng.integers(2)))


def describe(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption of ``scene``; with ``rng`` one of several phrasings, else the plain one."""
    if rng is None:
        rel = "above" if scene.vertical else "left of"
        return f"a {' '.join(scene.first)} {rel} a {' '.join(scene.second)}"
    a, b = scene.first, scene.second
    if rng.integers(2):  # name the second object first
        a, b = b, a
        rel = rng.choice(_VERTICAL_REVERSED if scene.vertical else _HORIZONTAL_REVERSED)
    else:
        rel = rng.choice(_VERTICAL if scene.vertical else _HORIZONTAL)
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return template.format(
        a=f"a {' '.join(a)}", b=f"a {' '.join(b)}", A=" ".join(a), B=" ".join(b), rel=rel
    )


def _mask(shape: str) -> np.ndarray:
    """A ``7x7`` boolean mask of a square, a circle or an upward triangle."""
    i, j = np.mgrid[:OBJECT, :OBJECT]
    centre = (OBJECT - 1) / 2
    if shape == "square":
        return np.ones((OBJECT, OBJECT), dtype=bool)
    if shape == "circle":
        return (i - centre) ** 2 + (j - centre) ** 2 <= (OBJECT / 2) ** 2
    return np.abs(j - centre) <= i / 2  # triangle: row i is i + 1 pixels wide


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as uint8 ``[3, 16, 16]``, each object placed at random in its half."""
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for index, (colour, shape) in enumerate((scene.first, scene.second)):
        if scene.vertical:  # halves are 8 x 16
            top = index * SIZE // 2 + int(rng.integers(0, SIZE // 2 - OBJECT + 1))
            left = int(rng.integers(0, SIZE - OBJECT + 1))
        else:
            top = int(rng.integers(0, SIZE - OBJECT + 1))
            left = index * SIZE // 2 + int(rng.integers(0, SIZE // 2 - OBJECT + 1))
        region = canvas[top : top + OBJECT, left : left + OBJECT]
        region[_mask(shape)] = COLOURS[colour]
    return canvas.transpose(2, 0, 1).copy()


@functools.cache
def shapes_dataset(count: int, seed: int) -> tuple[Tensor, list[Scene], list[str]]:
    """``count`` images ``uint8 [count, 3, 16, 16]``, their scenes and captions (seeded).

    Cached per process: callers must not modify what they get.
    """
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    images = np.stack([render(scene, rng) for scene in scenes])
    captions = [describe(scene, rng) for scene in scenes]
    return torch.from_numpy(images), scenes, captions


def digit_caption(label: int, rng: np.random.Generator) -> str:
    name = DIGIT_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    options = (
        f"{article} handwritten {name}",
        f"the digit {label}",
        f"the number {name}",
        f"{article} {name}",
        f"a picture of the digit {name}",
    )
    return options[rng.integers(len(options))]


def digit_captions(labels: Sequence[int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [digit_caption(int(label), rng) for label in labels]


CAPTIONS_FILE = "captions.jsonl"
CAPTIONS_FORMAT = (
    f"a folder of images with a {CAPTIONS_FILE} file, one JSON object a line "
    '{"file": "relative/path.png", "caption": "..."} (or train/ and test/ subfolders with '
    f"a {CAPTIONS_FILE} each)"
)
CAPTIONED_HOLDOUT = 0.05  # the last 5% of an unsplit captioned folder is the test split


def read_captions(path: str | os.PathLike) -> dict[Path, tuple[str, int]]:
    """``{file: (caption, line number)}`` of a ``captions.jsonl`` file.

    Each non-blank line is a JSON object ``{"file": ..., "caption": ...}``, ``file`` relative
    to the folder holding ``path``. A file may have several lines: only its **first**
    caption is kept. A malformed line raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    captions: dict[Path, tuple[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("file"), str)
                and isinstance(entry.get("caption"), str)
                and entry["file"]
            ):
                raise ValueError(
                    f'{path}, line {number}: expected {{"file": "relative/path.png", '
                    f'"caption": "..."}}, got {line.strip()[:120]!r}'
                )
            captions.setdefault(Path(entry["file"]), (entry["caption"], number))
    return captions


def _more(count: int) -> str:
    return f" (and {count} more)" if count else ""


def _captioned_images(
    folder: Path, image_size: int, channels: int
) -> tuple[ImageFolder, list[str]]:
    """The images of ``folder`` (an :class:`ImageFolder`) and their captions, in its order."""
    images = ImageFolder(folder, image_size, channels)
    path = folder / CAPTIONS_FILE
    captions = read_captions(path)
    known = set(images.files)
    missing = [(file, line) for file, (_, line) in captions.items() if file not in known]
    if missing:
        file, line = missing[0]
        raise ValueError(
            f"{path}, line {line}: {file} is not an image in {folder} (missing, unreadable "
            f"or not .png/.jpg/.jpeg){_more(len(missing) - 1)}"
        )
    uncaptioned = [file for file in images.files if file not in captions]
    if uncaptioned:
        raise ValueError(
            f"{folder / uncaptioned[0]} has no caption in {path}{_more(len(uncaptioned) - 1)}"
        )
    return images, [captions[file][0] for file in images.files]


def is_captioned_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``captions.jsonl`` (its own or its ``train/``'s)."""
    path = Path(path)
    return (path / CAPTIONS_FILE).is_file() or (path / "train" / CAPTIONS_FILE).is_file()


def captioned_folder(
    root: str | os.PathLike, image_size: int, channels: int
) -> tuple[tuple[ImageSource, list[str]], tuple[ImageSource, list[str]]]:
    """``((train images, captions), (test images, captions))`` of a captioned image folder.

    ``root`` holds images (PNG/JPEG, found recursively as :class:`ImageFolder` does: each is
    center-cropped to a square and resized to ``image_size`` with ``channels``) and a
    ``captions.jsonl`` naming every image (see :func:`read_captions`; an image keeps the first
    of its captions). With ``train/`` and ``test/`` subfolders holding a ``captions.jsonl``
    each, those are the splits; otherwise the last 5% (at least one) of the images in sorted
    path order are the test split. An image without a caption, a caption naming no image
    and a malformed line raise ``ValueError``.
    """
    root = Path(root)
    parts = (root / "train", root / "test")
    if all((part / CAPTIONS_FILE).is_file() for part in parts):
        train, test = (_captioned_images(part, image_size, channels) for part in parts)
        return train, test
    if not (root / CAPTIONS_FILE).is_file():
        raise ValueError(f"{root} is not a captioned image folder: expected {CAPTIONS_FORMAT}")
    images, captions = _captioned_images(root, image_size, channels)
    count = len(images)
    if count < 2:
        raise ValueError(f"{root}: {count} image, cannot hold out a test split")
    cut = count - max(1, round(count * CAPTIONED_HOLDOUT))
    return (
        (Subset(images, range(cut)), captions[:cut]),
        (Subset(images, range(cut, count)), captions[cut:]),
    )


SYNTHETIC_WORDS = (
    "a", "the", "of", "on", "in", "with", "near", "under", "red", "green", "blue", "small",
    "large", "old", "bright", "dark", "dog", "cat", "bird", "tree", "house", "car", "street",
    "river", "mountain", "beach", "city", "flower", "person", "photo", "painting", "sky",
)  # fmt: skip


def random_captions(count: int, seed: int) -> list[str]:
    """``count`` seeded captions of 3 to 12 words drawn from :data:`SYNTHETIC_WORDS`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 13, size=count)
    return [" ".join(rng.choice(SYNTHETIC_WORDS, size=int(n)).tolist()) for n in lengths]


class LazyImages:
    """The images of a source, indexed like a uint8 ``[N, C, H, W]`` tensor (an int, a slice
    or a sequence of indices) but loaded only when indexed."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, int):
            return self.source[index][0]
        if isinstance(index, slice):
            indices = list(range(len(self.source))[index])
        else:
            indices = [int(i) for i in index]
        return load_batch(self.source, indices)["image"]


class CaptionedImages:
    """Like :class:`CaptionedSource`, but the images stay in another source (an image folder)
    and are read batch by batch; ``images`` loads them when indexed, labels are all -1."""

    def __init__(self, source: ImageSource, text: Tensor, text_loss: Tensor, text_mask: Tensor):
        if not len(source) == len(text) == len(text_loss) == len(text_mask):
            raise ValueError(
                f"{len(source)} images but {len(text)} captions and {len(text_loss)}, "
                f"{len(text_mask)} masks"
            )
        self.source, self.image_shape = source, source.image_shape
        self.images = LazyImages(source)
        self.labels = torch.full((len(source),), -1, dtype=torch.long)
        self.text, self.text_loss, self.text_mask = text, text_loss, text_mask

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.source[index][0], -1

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return {
            "image": load_batch(self.source, chosen.tolist())["image"],
            "label": self.labels[chosen],
            "text": self.text[chosen],
            "text_loss": self.text_loss[chosen],
            "text_mask": self.text_mask[chosen],
        }


class CaptionedSource(ArraySource):
    """An :class:`ArraySource` whose batches also carry tokenized captions: ``text`` (ids),
    ``text_loss`` (the caption loss mask) and ``text_mask`` (which ids may be attended)."""

    def __init__(
        self, images: Tensor, labels: Tensor, text: Tensor, text_loss: Tensor, text_mask: Tensor
    ):
        super().__init__(images, labels, name="captioned images")
        if not len(images) == len(text) == len(text_loss) == len(text_mask):
            raise ValueError(
                f"{len(images)} images but {len(text)} captions and {len(text_loss)}, "
                f"{len(text_mask)} masks"
            )
        self.text, self.text_loss, self.text_mask = text, text_loss, text_mask

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return {
            **super().batch(chosen),
            "text": self.text[chosen],
            "text_loss": self.text_loss[chosen],
            "text_mask": self.text_mask[chosen],
        }


def layout_captions(
    ids: Tensor, with_eos: Tensor, eos_id: int, ignore_pad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(text, text_loss, text_mask)`` of captions in the reference's two layouts.

    ``ids [B, L]`` hold each caption and its EOS (``with_eos`` True there) then pads.
    ``ignore_pad=False``: the pads become EOS, every position is attended and trained (the
    model learns to repeat EOS). ``ignore_pad=True``: pads stay, only the caption is
    attended, the loss covers the caption and its EOS.
    """
    if ignore_pad:
        return ids, with_eos, with_eos & (ids != eos_id)
    everything = torch.ones_like(with_eos)
    return torch.where(with_eos, ids, torch.full_like(ids, eos_id)), everything, everything


__all__ = [
    "CAPTIONS_FILE",
    "CAPTIONS_FORMAT",
    "COLOURS",
    "SHAPES",
    "CaptionedImages",
    "CaptionedSource",
    "LazyImages",
    "Scene",
    "captioned_folder",
    "describe",
    "digit_captions",
    "is_captioned_folder",
    "layout_captions",
    "random_captions",
    "random_scene",
    "read_captions",
    "render",
    "shapes_dataset",
]
