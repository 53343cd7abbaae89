"""The paper's CIFAR networks: ResNet-20/32/56/110 (He et al., 2016) and WRN-d-k (Zagoruyko &
Komodakis, 2016), feature map = output of the last stage (64 or 64k channels, 8x8 at 32 px).

The paper does not name the shortcut of its ResNets: a stage's first block projects with a strided
Conv1x1-BN (He et al.'s option B, as the public code of DML and ONE), not option A's zero padding.
Each network also splits at the last stage (``low_level`` / ``high_level``): ONE's branches
(:mod:`afd_fast.models.one`) share everything below it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afd_fast.models.base import SplitNetwork


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(SplitNetwork):
    low_level_modules = ("conv1", "bn1", "layer1", "layer2")

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv3x3(3, 16), nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = _stages(BasicBlock, 16, (16, 32, 64), n)
        self.fc = nn.Linear(64, num_classes)
        self.feature_channels = 64
        _init(self)

    def low_level(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))

    def high_level(self, low: torch.Tensor) -> torch.Tensor:
        return self.layer3(low)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(SplitNetwork):
    low_level_modules = ("conv1", "layer1", "layer2")

    def __init__(self, depth: int, width: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = _conv3x3(3, 16)
        self.layer1, self.layer2, self.layer3 = _stages(WideBlock, 16, widths, n)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = widths[-1]
        _init(self)

    def low_level(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.conv1(x)))

    def high_level(self, low: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layer3(low)))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


def _stages(block, cin: int, widths, blocks_per_stage: int) -> list[nn.Sequential]:
    """Three stages of blocks; the first block of stages 2 and 3 halves the spatial size."""
    stages = []
    for cout, stride in zip(widths, (1, 2, 2)):
        blocks = []
        for i in range(blocks_per_stage):
            blocks.append(block(cin, cout, stride if i == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return stages


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


CIFAR_NETWORKS = {
    **{f"resnet{d}": (lambda num_classes, d=d: CifarResNet(d, num_classes)) for d in (20, 32, 56, 110)},
    **{f"wrn-{d}-{k}": (lambda num_classes, d=d, k=k: WideResNet(d, k, num_classes))
       for d, k in ((16, 2), (16, 4), (28, 2), (28, 4), (28, 10))},
}
