"""torchvision's ImageNet ResNets, split after layer4 (512x7x7 or 2048x7x7 at 224 px)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from afd_fast.models.base import SplitNetwork


class TorchvisionResNet(SplitNetwork):
    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        self.feature_channels = self.model.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model.fc(torch.flatten(self.model.avgpool(feature_map), 1))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.model.fc.parameters())

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Loads into ``torchvision.models.<arch>(num_classes=...)``."""
        return self.model.state_dict()

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


IMAGENET_NETWORKS = {
    arch: (lambda num_classes, arch=arch: TorchvisionResNet(arch, num_classes))
    for arch in ("resnet18", "resnet34", "resnet50")
}
