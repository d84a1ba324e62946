"""A small CNN digit classifier, trained on the real digits, that judges generated samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jetblocks.likelihood import pixels_to_unit


class DigitClassifier(nn.Module):
    """Two 3x3 conv layers, pooled to 4x4, then a linear layer; any input size >= 8."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.out = nn.Linear(64 * 16, classes)

    def forward(self, images: Tensor) -> Tensor:
        """Logits for float images in ``[-1, 1]``."""
        return self.out(self.features(images).flatten(1))


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int = 4, seed: int = 0
) -> DigitClassifier:
    """Fit on uint8 ``images [N, C, H, W]`` with Adam (batch 64, lr 2e-3)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(64):
            loss = F.cross_entropy(model(pixels_to_unit(images[index])), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor) -> Tensor:
    """Predicted classes of uint8 images."""
    return torch.cat([model(pixels_to_unit(chunk)).argmax(-1) for chunk in images.split(500)])


__all__ = ["DigitClassifier", "predict", "train_classifier"]
