"""Networks split into feature extractor G (up to the last conv stage) and classifier head.

``build_network(name, num_classes)`` knows the ImageNet ResNets of torchvision and the paper's
CIFAR ResNets and wide ResNets; every network returns ``(feature_map, logits)`` from one forward.
"""
from __future__ import annotations

from afd_fast.models.base import SplitNetwork
from afd_fast.models.cifar import CIFAR_NETWORKS
from afd_fast.models.imagenet import IMAGENET_NETWORKS

NETWORKS = {**IMAGENET_NETWORKS, **CIFAR_NETWORKS}


def build_network(name: str, num_classes: int) -> SplitNetwork:
    """A fresh network by name (e.g. ``resnet18``, ``resnet32``, ``wrn-16-2``)."""
    key = name.lower()
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[key](num_classes)


__all__ = ["NETWORKS", "SplitNetwork", "build_network"]
