"""Small CNN baselines for Fashion-MNIST and unit tests.

`small_resnet` is the feed-forward counterpart of MDEQ_TINY: a ResNet (RobustBench block layout, see
models/resnet.py) with stages of 16/32/64 channels and two blocks each, 174,970 parameters for
1x28x28 inputs, about the 175,162 of MDEQ_TINY.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.resnet import ResNet

SMALL_RESNET_WIDTHS = (16, 32, 64)
SMALL_RESNET_BLOCKS = (2, 2, 2)


def small_resnet(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    return ResNet(SMALL_RESNET_BLOCKS, SMALL_RESNET_WIDTHS, num_classes=num_classes, in_channels=in_channels)


class TinyCNN(nn.Module):
    """Two conv layers and a linear readout: a plain classifier for fast tests of attacks and records."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        return self.linear(out.mean(dim=(2, 3)))
