"""A small CNN classifier whose penultimate layer gives features for FID/KID in the data's own domain
(the "FID with a LeNet" idea): cheap, offline, and sensitive to what matters for that data."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, channels: int, width: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.BatchNorm2d(4 * w), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, feature_dim), nn.ReLU(True),
        )
        self.head = nn.Linear(feature_dim, max(num_classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(m) -> dict[str, nn.Module]:
    return {"C": Classifier(m.channels, m.d_width, m.num_classes)}
