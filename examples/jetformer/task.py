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
from jetblocks.config import Config, setting
from jetblocks.curriculum import NoiseCurriculum
from jetblocks.diagnostics import diagnose
from jetblocks.likelihood import dequantize
from jetblocks.train import TrainConfig, reference_optimizer
from jetblocks.validation import FLAG, GUIDANCE, NON_NEGATIVE, POSITIVE_INT, Choice, Number

from .sampling import sample_images

_PROBABILITY = Number(float, low=0, high=1)


@dataclasses.dataclass
class TaskConfig(Config):
    """How a JetFormer is trained and how the trainer's sample grids are drawn."""

    conditioning: str = setting("class", Choice(("class", "text")), "labels or captions")
    text_first_prob: float = setting(1.0, _PROBABILITY, "share of text-first examples")
    drop_prob: float = setting(0.1, _PROBABILITY, "prefix dropped (classifier-free guidance)")
    text_weight: float = setting(1.0, NON_NEGATIVE, "weight of the caption NLL")
    sigma_start: float = setting(64.0, NON_NEGATIVE, "curriculum noise at step 0")
    sigma_end: float = setting(0.0, NON_NEGATIVE, "curriculum noise at the last step")
    curriculum_steps: int = setting(1, POSITIVE_INT, "steps of the noise curriculum")
    rgb_noise_on_image_prefix: bool = setting(
        True, FLAG, "False: captioning rows get no curriculum noise"
    )
    ignore_pad: bool = setting(False, FLAG, "caption layout (see data.layout_captions)")
    guidance: float = setting(0.0, GUIDANCE, "for the sample grids written during training")


def jetformer_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """JetFormer's recipe: the reference optimizer with weight decay on the kernels only
    (``nn.Linear`` weights; not embeddings, biases, norms or position embeddings)."""
    kernels = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    rest = [p for p in model.parameters() if id(p) not in kernels]
    groups = [{"params": list(kernels.values())}, {"params": rest, "weight_decay": 0.0}]
    return reference_optimizer(groups, config)


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

    def diagnose(
        self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Any]:
        """Jet's couplings and loss split (:func:`jetblocks.diagnostics.diagnose` of
        ``model.jet``, standard-normal prior) and, apart, the held-out image bits/dim and
        caption NLL of the whole model, under ``"jetformer"``."""
        seed = generator.initial_seed()
        result = diagnose(model.jet, batch["image"], generator=generator)
        again = torch.Generator(generator.device).manual_seed(seed)  # the same noise
        losses = self.evaluate(model, batch, again)
        names = {"bits_per_dim": "image_bits_per_dim", "caption_nll": "text_nll"}
        return {**result, "jetformer": {names[k]: v.mean().item() for k, v in losses.items()}}

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
