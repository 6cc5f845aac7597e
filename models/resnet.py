"""ResNet for CIFAR-10 with RobustBench's module names (model_zoo/architectures/resnet.py), so zoo
checkpoints load with strict key matching.

The stem is a stride-1 conv3x3 (no max-pool); the features are globally average-pooled, which for 32x32
inputs equals RobustBench's `avg_pool2d(out, 4)`. `ResNet` is width- and depth-generic so the small
Fashion-MNIST baseline (models/small.py) reuses the same blocks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two conv3x3 + BN with a projection shortcut (conv1x1 + BN) whenever the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """conv3x3 stem, stages `layer1..layerN` of BasicBlocks (stride 2 from the second), pool, `linear`."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(num_blocks) != len(widths) or not widths:
            raise ValueError("ResNet needs one width per stage")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for index, (blocks, width) in enumerate(zip(num_blocks, widths, strict=True)):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(in_planes, width, stride=2 if index > 0 and b == 0 else 1))
                in_planes = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return self.linear(out.mean(dim=(2, 3)))


def ResNet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 of RobustBench's zoo: 11,173,962 parameters for CIFAR-10."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_channels=in_channels)
