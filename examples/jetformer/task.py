"""JetFormer as a :class:`jetblocks.train.Task`: its loss, held-out metrics and samples.

Per training example (randomness from the trainer's resumable, rank-aware uniform noise):

1. text first with probability ``text_first_prob`` (else image first: captioning);
2. noise curriculum on the uint8 pixels (``NoiseCurriculum``; not on image-first rows with
   ``rgb_noise_on_image_prefix=False``), then ``U[0, 1/127.5)`` dequantization;
3. for text-first examples, the whole prefix is replaced by NOLABEL tokens with probability
   ``drop_prob`` (classifier-free guidance);
4. only the suffix is trained: ``image_bits`` (JetFormer's image NLL, bits per pixel-dim)
   for text-first examples, ``text_weight * text_nll`` (nats per caption token) for
   image-first ones, whose image prefix reaches Jet with the gradient stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from jetblocks import rng
from jetblocks.jetformer import NoiseCurriculum
from jetblocks.likelihood import dequantize

from .sampling import sample_images


@dataclasses.dataclass
class TaskConfig:
    """How a JetFormer is trained and how the trainer's sample grids are drawn."""

    conditioning: str = "class"  # "class" (labels) or "text" (captions)
    text_first_prob: float = 1.0
    drop_prob: float = 0.1
    text_weight: float = 1.0
    sigma_start: float = 64.0
    sigma_end: float = 0.0
    curriculum_steps: int = 1
    rgb_noise_on_image_prefix: bool = True  # False: captioning rows get no curriculum noise
    ignore_pad: bool = False  # caption layout (see data.layout_captions)
    guidance: float = 0.0  # for the sample grids written during training

    def __post_init__(self) -> None:
        if self.conditioning not in ("class", "text"):
            raise ValueError(f"conditioning must be 'class' or 'text', got {self.conditioning!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def text_of(batch: dict[str, Tensor], ignore_pad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(text, text_loss, text_mask)``, ``[B, L]`` each: the captions (see
    :func:`.data.layout_captions`), or the class label as one token. ``text_mask`` is None
    unless the layout hides pads (``ignore_pad``): every position is then visible."""
    if "text" in batch:
        mask = batch["text_mask"].bool() if ignore_pad else None
        return batch["text"], batch["text_loss"].bool(), mask
    label = batch["label"][:, None]
    return label, torch.ones_like(label, dtype=torch.bool), None


class JetFormerTask:
    """Loss, evaluation and samples for :class:`jetblocks.train.Trainer`."""

    def __init__(self, config: TaskConfig, prompts: Tensor, prompt_mask: Tensor | None = None):
        self.config, self.prompts, self.prompt_mask, self.step = config, prompts, prompt_mask, 0
        self.curriculum = NoiseCurriculum(
            config.sigma_start, config.sigma_end, max(1, config.curriculum_steps)
        )

    def set_step(self, step: int) -> None:
        self.step = step

    def loss(self, model: nn.Module, batch: dict[str, Tensor], generator) -> Tensor:
        cfg, pixels = self.config, batch["image"]
        text, text_loss, text_mask = text_of(batch, cfg.ignore_pad)
        coins = rng.rand((len(pixels), 2), generator=generator, like=pixels.float())
        text_first = coins[:, 0] < cfg.text_first_prob
        drop = (coins[:, 1] < cfg.drop_prob) & text_first
        noised = None if cfg.rgb_noise_on_image_prefix else text_first
        noisy = self.curriculum(pixels, self.step, rows=noised, generator=generator)
        images = dequantize(noisy, generator=generator)
        out = model(
            images, text, text_loss, text_first, drop, text_mask=text_mask, generator=generator
        )
        per_example = torch.where(text_first, out["image_bits"], cfg.text_weight * out["text_nll"])
        return per_example.mean()

    def evaluate(
        self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Held-out image bits/dim (no curriculum noise, no dropout); caption NLL for text."""
        pixels = batch["image"]
        text, text_loss, text_mask = text_of(batch, self.config.ignore_pad)
        images = dequantize(pixels, generator=generator).to(next(model.parameters()).dtype)
        ones = torch.ones(len(pixels), dtype=torch.bool, device=pixels.device)

        def losses(text_first: Tensor) -> dict[str, Tensor]:
            return model(images, text, text_loss, text_first, text_mask=text_mask)

        metrics = {"bits_per_dim": losses(ones)["image_bits"]}
        if self.config.text_first_prob < 1.0:
            metrics["caption_nll"] = losses(~ones)["text_nll"]
        return metrics

    def sample(
        self, model: nn.Module, n: int, temperature: float, generator: torch.Generator
    ) -> Tensor:
        """``n`` images for the prompts in turn (class ``i % 10`` or caption ``i % P``)."""
        index = torch.arange(n) % len(self.prompts)
        device = next(model.parameters()).device
        mask = None if self.prompt_mask is None else self.prompt_mask[index].to(device)
        return sample_images(
            model,
            self.prompts[index].to(device),
            text_mask=mask,
            guidance=self.config.guidance,
            temperature=temperature,
            generator=generator,
        )


__all__ = ["JetFormerTask", "TaskConfig", "text_of"]
