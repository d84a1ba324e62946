"""Small CNN classifiers, trained on the real data, that judge generated samples: digits, and
the colour and shape of each object of a shapes scene."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks.likelihood import pixels_to_unit

from .data import SHAPES, object_labels, scene_halves


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
    (:func:`.data.scene_halves`), trained on real scenes."""
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


__all__ = [
    "DigitClassifier",
    "judged_agreement",
    "predict",
    "train_classifier",
    "train_object_judge",
]
