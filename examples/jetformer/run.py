"""Build a JetFormer run (data, tokenizer, model, trainer) from a preset, and load it back.

A run directory holds ``run.json`` (the preset with overrides), ``tokenizer.model`` for
text conditioning (trained from the captions, or a copy of ``train --tokenizer``), and what
:class:`jetblocks.train.Trainer` writes: ``checkpoints/``, ``metrics.jsonl`` and ``samples/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jetblocks.acceleration import accelerate_by_default
from jetblocks.checkpoint import atomic_file, read_json
from jetblocks.integrations.datasets import BUILTINS, ArraySource
from jetblocks.integrations.sentencepiece import SentencePieceTokenizer
from jetblocks.integrations.torchdata import image_loader, open_source

from .data import (
    CAPTIONS_FORMAT,
    DIGIT_NAMES,
    CaptionedImages,
    CaptionedSource,
    Scene,
    captioned_folder,
    describe,
    digit_captions,
    is_captioned_folder,
    layout_captions,
    random_captions,
    random_scene,
    shapes_dataset,
)
from .model import JetFormer, JetFormerConfig

SHAPES_TRAIN, SHAPES_TEST = 8000, 500
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 4096, 512
TOKENIZER_FILE = "tokenizer.model"
TRAINED_VOCAB = 64  # the limit of the word tokenizer trained from a run's captions


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    """A sentencepiece ``.model`` file; one that is not readable as such raises ValueError."""
    try:
        return SentencePieceTokenizer.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer {path} does not exist") from None
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(f"tokenizer {path}: {error}") from error


class RunData:
    """Train and test sources, the prompts for sample grids, and the tokenizer (text).

    Text conditioning: ``data`` ``shapes`` (drawn captioned shapes), ``synthetic`` (random
    pixels and random-word captions, for throughput), a captioned image folder (see
    :func:`.data.captioned_folder`), or a labelled digit set captioned from its labels.
    ``tokenizer``: a sentencepiece model to use instead of training one from the captions
    (when ``create_tokenizer``; otherwise the run directory's ``tokenizer.model`` is loaded).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        out_dir: Path,
        create_tokenizer: bool,
        tokenizer: str | os.PathLike | None = None,
    ):
        self.spec = spec
        jet = JetFormerConfig(**{**spec["model"], "vocab_size": 1}).jet_config
        self.image_size, self.channels = jet.image_size, jet.channels
        self.tokenizer: SentencePieceTokenizer | None = None
        self.scenes: list[Scene] = []  # the prompts' scenes (shapes)
        self.train_scenes: list[Scene] = []
        self.test_scenes: list[Scene] = []
        self.test_captions: list[str] = []
        if spec["conditioning"] == "class":
            if tokenizer is not None:
                raise ValueError("a tokenizer is only for text conditioning (--conditioning text)")
            self.train, self.test = (self._images(spec["data"], s) for s in ("train", "test"))
            classes = spec["model"]["vocab_size"]
            self.prompts = torch.arange(classes)[:, None]
            self.prompt_mask = torch.ones_like(self.prompts, dtype=torch.bool)
            self.prompt_texts = [str(c) for c in range(classes)]
        else:
            self._captioned(spec, out_dir, create_tokenizer, tokenizer)

    def _random_pixels(self, split: str) -> tuple[torch.Tensor, torch.Generator]:
        """Seeded uint8 noise images of the run's size, and the generator that drew them."""
        generator = torch.Generator().manual_seed(int(split == "test"))
        count = SYNTHETIC_TRAIN if split == "train" else SYNTHETIC_TEST
        pixels = torch.randint(
            0, 256, (count, self.channels, *self.image_size), generator=generator
        ).to(torch.uint8)
        return pixels, generator

    def _images(self, data: str, split: str):
        if data == "synthetic":  # random pixels and labels, for throughput measurements
            pixels, generator = self._random_pixels(split)
            count = len(pixels)
            classes = self.spec["model"]["vocab_size"]
            labels = torch.randint(0, classes, (count,), generator=generator)
            return ArraySource(pixels, labels, name="synthetic")
        return open_source(data, split, image_size=self.image_size[0], channels=self.channels)

    def _captioned(
        self,
        spec: dict[str, Any],
        out_dir: Path,
        create_tokenizer: bool,
        tokenizer: str | os.PathLike | None,
    ) -> None:
        data = spec["data"]
        if data == "shapes":
            train_images, self.train_scenes, train_captions = shapes_dataset(SHAPES_TRAIN, seed=0)
            test_images, self.test_scenes, test_captions = shapes_dataset(SHAPES_TEST, seed=1)
            train, test = ArraySource(train_images), ArraySource(test_images)
            rng = np.random.default_rng(2)
            self.scenes = [random_scene(rng) for _ in range(8)]
            self.prompt_texts = [describe(scene) for scene in self.scenes]
        elif data == "synthetic":  # random pixels and random-word captions, for throughput
            train, test = (ArraySource(self._random_pixels(s)[0]) for s in ("train", "test"))
            train_captions = random_captions(SYNTHETIC_TRAIN, seed=0)
            test_captions = random_captions(SYNTHETIC_TEST, seed=1)
            self.prompt_texts = test_captions[:8]
        elif is_captioned_folder(data):
            if self.image_size[0] != self.image_size[1]:
                raise ValueError(f"captioned folders need square images, not {self.image_size}")
            (train, train_captions), (test, test_captions) = captioned_folder(
                data, self.image_size[0], self.channels
            )
            self.prompt_texts = test_captions[:8]
        elif data in BUILTINS or Path(data.replace("{split}", "train")).exists():
            # a labelled digit set with generated captions
            train, test = (self._images(data, s) for s in ("train", "test"))
            for source in (train, test):
                if not ((source.labels >= 0) & (source.labels < len(DIGIT_NAMES))).all():
                    raise ValueError(
                        f"{data} has no captions and its labels are not the digits 0-9 to "
                        f"caption; text conditioning takes {CAPTIONS_FORMAT}"
                    )
            train_captions = digit_captions(train.labels.tolist(), seed=0)
            test_captions = digit_captions(test.labels.tolist(), seed=1)
            self.prompt_texts = [f"a handwritten {name}" for name in DIGIT_NAMES]
        else:
            raise ValueError(
                f"data {data!r} is neither a built-in set (shapes, synthetic, "
                f"{', '.join(BUILTINS)}) nor an existing path; the text256 presets need "
                f"--data DIR, {CAPTIONS_FORMAT}"
            )
        self.tokenizer = self._tokenizer(out_dir, create_tokenizer, tokenizer, train_captions)
        self.train = self._with_text(train, train_captions)
        self.test = self._with_text(test, test_captions)
        self.test_captions = test_captions
        self.prompts, _, self.prompt_mask = self.encode(self.prompt_texts)

    def _tokenizer(
        self,
        out_dir: Path,
        create: bool,
        given: str | os.PathLike | None,
        captions: list[str],
    ) -> SentencePieceTokenizer:
        """The run's tokenizer; an int ``model.vocab_size`` must be its vocabulary size."""
        if not create:
            tokenizer = SentencePieceTokenizer.load(out_dir / TOKENIZER_FILE)
        elif given is not None:
            tokenizer = load_tokenizer(given)
        else:
            tokenizer = SentencePieceTokenizer.train(captions, TRAINED_VOCAB, model_type="word")
        wanted, size = self.spec["model"].get("vocab_size"), tokenizer.vocab_size
        if wanted is not None and wanted != size:
            if create and given is None:
                raise ValueError(
                    f"model.vocab_size is {wanted} but the tokenizer trained from the captions "
                    f"has {size} pieces: pass --tokenizer PATH.model, a sentencepiece model of "
                    f"{wanted} pieces (the reference used sentencepiece c4_en, 32k pieces), "
                    f"or --set model.vocab_size=null to size the model to the trained tokenizer"
                )
            source = given if given is not None else out_dir / TOKENIZER_FILE
            raise ValueError(
                f"model.vocab_size is {wanted} but tokenizer {source} has {size} pieces: pass "
                f"a tokenizer of {wanted} pieces or --set model.vocab_size=null (the "
                f"tokenizer's size)"
            )
        return tokenizer

    def _with_text(self, images, captions: list[str]):
        """``images`` (an :class:`ArraySource` or any image source) with encoded captions."""
        if isinstance(images, ArraySource):
            return CaptionedSource(images.images, images.labels, *self.encode(captions))
        return CaptionedImages(images, *self.encode(captions))

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(text, text_loss, text_mask)`` of captions in the run's layout (``ignore_pad``)."""
        ids, with_eos = self.tokenizer.encode_batch(texts, self.spec["model"]["text_len"])
        ignore_pad = self.spec["task"].get("ignore_pad", False)
        return layout_captions(ids, with_eos, self.tokenizer.eos_id, ignore_pad)

    def model_config(self) -> JetFormerConfig:
        values = dict(self.spec["model"])
        if values.get("vocab_size") is None:
            values["vocab_size"] = self.tokenizer.vocab_size
        return JetFormerConfig(**values)

    def loader(self, split: str, batch_size: int, env, seed: int, training: bool):
        source = self.train if split == "train" else self.test
        return image_loader(
            source,
            batch_size,
            seed=seed,
            shuffle=training,
            drop_last=training,
            rank=env.rank,
            world_size=env.world_size,
            epochs=None if training else 1,
            flip=bool(self.spec.get("flip", False)) and training,  # train-time augmentation
        )


def write_run_file(out_dir: Path, name: str, spec: dict[str, Any]) -> None:
    """``out_dir/run.json``: the preset's name and the spec the run trains (atomically)."""
    with atomic_file(out_dir / "run.json") as staging:
        staging.write_text(json.dumps({"preset": name, "spec": spec}, indent=2))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[JetFormer, RunData]:
    """The newest checkpoint of a run (eval mode, on ``device``) and its data."""
    run_dir = Path(run_dir)
    spec = read_json(run_dir / "run.json")["spec"]
    data = RunData(spec, run_dir, create_tokenizer=False)
    model = JetFormer.from_pretrained(run_dir)
    return accelerate_by_default(model.to(device).eval(), device, inference=True), data


def sampling_settings(
    spec: dict[str, Any],
    guidance: float | None = None,
    temperature: float | None = None,
    sampler: str | None = None,
) -> tuple[float, float, str]:
    """Guidance, temperature and sampler: the run's ``sample`` settings unless given."""
    settings = spec["sample"]
    guidance = settings["guidance"] if guidance is None else guidance
    temperature = settings["temperature"] if temperature is None else temperature
    sampler = sampler or settings.get("sampler", "exact")
    return guidance, temperature, sampler


__all__ = ["RunData", "load_run", "load_tokenizer", "sampling_settings", "write_run_file"]
