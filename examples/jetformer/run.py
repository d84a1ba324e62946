"""Build a JetFormer run (data, tokenizer, model, trainer) from a preset, and load it back.

A run directory holds ``run.json`` (the preset with overrides), ``tokenizer.model`` for
text conditioning, and what :class:`jetblocks.train.Trainer` writes: ``checkpoints/``,
``metrics.jsonl`` and ``samples/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jetblocks.checkpoint import load_model_weights, read_json, resolve_checkpoint
from jetblocks.integrations.datasets import ArraySource
from jetblocks.integrations.sentencepiece import EOS_ID, SentencePieceTokenizer
from jetblocks.integrations.torchdata import image_loader, open_source

from .data import (
    DIGIT_NAMES,
    CaptionedSource,
    Scene,
    describe,
    digit_captions,
    layout_captions,
    random_scene,
    shapes_dataset,
)
from .model import JetFormer, JetFormerConfig

SHAPES_TRAIN, SHAPES_TEST = 8000, 500
TOKENIZER_FILE = "tokenizer.model"


class RunData:
    """Train and test sources, the prompts for sample grids, and the tokenizer (text)."""

    def __init__(self, spec: dict[str, Any], out_dir: Path, create_tokenizer: bool):
        self.spec = spec
        jet = JetFormerConfig(**{**spec["model"], "vocab_size": 1}).jet_config
        self.image_size, self.channels = jet.image_size, jet.channels
        self.tokenizer: SentencePieceTokenizer | None = None
        self.scenes: list[Scene] = []  # the prompts' scenes (shapes)
        self.test_scenes: list[Scene] = []
        self.test_captions: list[str] = []
        if spec["conditioning"] == "class":
            self.train, self.test = (self._images(spec["data"], s) for s in ("train", "test"))
            classes = spec["model"]["vocab_size"]
            self.prompts = torch.arange(classes)[:, None]
            self.prompt_mask = torch.ones_like(self.prompts, dtype=torch.bool)
            self.prompt_texts = [str(c) for c in range(classes)]
        else:
            self._captioned(spec, out_dir, create_tokenizer)

    def _images(self, data: str, split: str):
        if data == "synthetic":  # random pixels and labels, for throughput measurements
            generator = torch.Generator().manual_seed(int(split == "test"))
            count = 4096 if split == "train" else 512
            pixels = torch.randint(
                0, 256, (count, self.channels, *self.image_size), generator=generator
            ).to(torch.uint8)
            classes = self.spec["model"]["vocab_size"]
            labels = torch.randint(0, classes, (count,), generator=generator)
            return ArraySource(pixels, labels, name="synthetic")
        return open_source(data, split, image_size=self.image_size[0], channels=self.channels)

    def _captioned(self, spec: dict[str, Any], out_dir: Path, create_tokenizer: bool) -> None:
        if spec["data"] == "shapes":
            train_images, _, train_captions = shapes_dataset(SHAPES_TRAIN, seed=0)
            test_images, self.test_scenes, test_captions = shapes_dataset(SHAPES_TEST, seed=1)
            train_labels = torch.full((len(train_images),), -1)
            test_labels = torch.full((len(test_images),), -1)
            rng = np.random.default_rng(2)
            self.scenes = [random_scene(rng) for _ in range(8)]
            self.prompt_texts = [describe(scene) for scene in self.scenes]
        else:  # a labelled digit set with generated captions
            train, test = (self._images(spec["data"], s) for s in ("train", "test"))
            train_images, train_labels = train.images, train.labels
            test_images, test_labels = test.images, test.labels
            train_captions = digit_captions(train_labels.tolist(), seed=0)
            test_captions = digit_captions(test_labels.tolist(), seed=1)
            self.prompt_texts = [f"a handwritten {name}" for name in DIGIT_NAMES]
        path = out_dir / TOKENIZER_FILE
        if create_tokenizer:
            self.tokenizer = SentencePieceTokenizer.train(train_captions, 64, model_type="word")
        else:
            self.tokenizer = SentencePieceTokenizer.load(path)
        self.train = CaptionedSource(train_images, train_labels, *self.encode(train_captions))
        self.test = CaptionedSource(test_images, test_labels, *self.encode(test_captions))
        self.test_captions = test_captions
        self.prompts, _, self.prompt_mask = self.encode(self.prompt_texts)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(text, text_loss, text_mask)`` of captions in the run's layout (``ignore_pad``)."""
        ids, with_eos = self.tokenizer.encode_batch(texts, self.spec["model"]["text_len"])
        ignore_pad = self.spec["task"].get("ignore_pad", False)
        return layout_captions(ids, with_eos, EOS_ID, ignore_pad)

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
        )


def write_run_file(out_dir: Path, name: str, spec: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").write_text(json.dumps({"preset": name, "spec": spec}, indent=2))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[JetFormer, RunData]:
    """The newest checkpoint of a run (eval mode, on ``device``) and its data."""
    run_dir = Path(run_dir)
    spec = read_json(run_dir / "run.json")["spec"]
    data = RunData(spec, run_dir, create_tokenizer=False)
    checkpoint = resolve_checkpoint(run_dir)
    model = JetFormer(JetFormerConfig.from_dict(read_json(checkpoint / "config.json")))
    load_model_weights(model, checkpoint)
    return model.to(device).eval(), data


__all__ = ["RunData", "load_run", "write_run_file"]
