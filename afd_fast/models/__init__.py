"""Networks split into feature extractor G (image -> last spatial feature map) and classifier head.

``build_network(name, num_classes, pretrained=None)`` knows every classification model of
torchvision by its own name (``resnet18``, ``mobilenet_v3_small``, ``convnext_tiny``, ...; split by
rule, :mod:`afd_fast.models.library`), ``timm:<name>`` for any timm model (``forward_features`` /
``forward_head``) and the paper's CIFAR ResNets and wide ResNets (``resnet20``, ``wrn-16-2``, ...).
Every network returns ``(feature_map, logits)`` from one forward.
"""
from __future__ import annotations

import os

import torch

from afd_fast.errors import ConfigError
from afd_fast.models.base import SplitNetwork
from afd_fast.models.cifar import CIFAR_NETWORKS
from afd_fast.models.library import (TIMM_PREFIX, UnsplittableNetwork, WeightsNotFound, build_timm,
                                     build_torchvision, is_timm_name, timm_problem, torchvision_names,
                                     torchvision_weights)

TORCHVISION_NETWORKS = {name: (lambda num_classes, name=name: build_torchvision(name, num_classes))
                        for name in torchvision_names()}
# every name --arch knows except timm's (those are timm:<name>)
NETWORKS = {**TORCHVISION_NETWORKS, **CIFAR_NETWORKS}

ARCH_HELP = ("a torchvision classifier by its own name (any of torchvision.models.list_models(): resnet18, "
             "mobilenet_v3_small, efficientnet_b0, convnext_tiny, regnet_y_400mf, densenet121, swin_t, ...; ViTs "
             "are refused, their head reads the class token), timm:<name> for a timm model (e.g. timm:resnet18, "
             "timm:efficientnet_b0; pip install timm), or one of the paper's CIFAR networks: "
             + ", ".join(CIFAR_NETWORKS))
PRETRAINED_HELP = ("one entry per network, comma-separated (one library entry alone applies to every network): "
                   "'torchvision' (torchvision's default ImageNet weights) or 'torchvision:IMAGENET1K_V2' (a named "
                   "one), 'timm' or 'timm:TAG' (timm's weights, e.g. timm:a1_in1k), a local state_dict file, or "
                   "empty for a fresh start (e.g. ',teacher.pt'). Library weights come from TORCH_HOME and the "
                   "Hugging Face cache (downloaded when missing); a head for another class count starts fresh "
                   "(printed), everything else loads strictly")


def network_problem(name: str) -> str | None:
    """Why ``name`` is not a network --arch can build (unknown, timm missing), or None."""
    key = name.lower()
    if key in NETWORKS:
        return None
    if is_timm_name(key):
        return timm_problem(key)
    return (f"unknown network {name!r}; known networks: the torchvision classifiers "
            f"{', '.join(TORCHVISION_NETWORKS)}; the paper's CIFAR networks {', '.join(CIFAR_NETWORKS)}; or "
            "timm:<name> for a timm model")


def build_network(name: str, num_classes: int, pretrained: str | None = None) -> SplitNetwork:
    """A network by name, fresh or from ``pretrained`` (an entry of :func:`parse_pretrained`:
    "torchvision[:WEIGHTS]", "timm[:TAG]", a local state_dict file, or None / "" for a fresh start)."""
    key = name.lower()
    problem = network_problem(key)
    if problem:
        raise ConfigError(problem)
    network = _build(key, num_classes, pretrained)
    note = batch_norm_note(key, network)
    if note:
        print(note, flush=True)
    return network


def _build(key: str, num_classes: int, pretrained: str | None) -> SplitNetwork:
    source, _, tag = (pretrained or "").partition(":")
    if source == "torchvision":
        return build_torchvision(key, num_classes, weights=tag or "DEFAULT")
    if source == "timm":
        return build_timm(key, num_classes, pretrained=tag)
    network = build_timm(key, num_classes) if is_timm_name(key) else NETWORKS[key](num_classes)
    if pretrained:  # a local file, loaded strictly
        network.load_plain_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
    return network


def batch_norm_note(name: str, network: torch.nn.Module) -> str | None:
    """A note for networks whose batch norms keep their running statistics with a momentum below
    PyTorch's 0.1 (torchvision's MobileNet v3, EfficientNet b5-b7, MaxViT: 0.01; MNASNet: 0.0003):
    evaluation uses those statistics, which follow the weights only over ~1/momentum steps, so a
    short run is evaluated with statistics far from its weights' (the model's own setting, kept)."""
    momenta = {m.momentum for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    slow = min((m for m in momenta if m is not None), default=0.1)
    if slow >= 0.1:
        return None
    steps = round(1 / slow)
    return (f"note: {name}'s batch norms keep their running statistics with momentum {slow:.2g} (PyTorch's "
            f"default: 0.1), as its library builds it: these statistics, which evaluation uses, follow the "
            f"weights over ~{steps} steps (1/momentum; fresh, they start at mean 0 and variance 1), so a run of "
            f"not many times {steps} steps is evaluated with statistics far from its weights' (accuracy can stay "
            "near chance although the network learns; README, 'Your own networks'): --bn-recalibrate 50 "
            "recomputes them before each evaluation and the export; or start from pre-trained weights or train "
            "longer")


def parse_pretrained(value, archs) -> tuple[str, ...] | None:
    """--pretrained: one entry per network (see PRETRAINED_HELP); a library entry alone applies to all.
    Checks what can be checked before any work: the file exists, the library has weights for the network."""
    if not value:
        return None
    entries = value.split(",") if isinstance(value, str) else [str(v or "") for v in value]
    entries = [e.strip() for e in entries]
    if len(entries) == 1 and entries[0].partition(":")[0] in ("torchvision", "timm"):
        entries = entries * len(archs)
    if len(entries) != len(archs):
        raise ConfigError(f"--pretrained needs one entry per network ({len(archs)}), got {len(entries)}")
    out = []
    for arch, entry in zip(archs, entries):
        source, _, tag = entry.partition(":")
        if source == "torchvision":
            if arch not in TORCHVISION_NETWORKS:
                raise ConfigError(f"--pretrained {entry}: {arch} is not a torchvision classifier")
            try:
                torchvision_weights(arch, tag or "DEFAULT")
            except ValueError as e:
                raise ConfigError(f"--pretrained {entry}: {e}") from None
            out.append(f"torchvision:{tag}" if tag else "torchvision")
        elif source == "timm":
            if not is_timm_name(arch):
                raise ConfigError(f"--pretrained {entry}: {arch} is not a timm model (name it timm:<name>)")
            out.append(entry)
        elif entry:
            if not os.path.isfile(entry):
                raise ConfigError(f"--pretrained file {entry!r} does not exist")
            out.append(os.path.abspath(entry))
        else:
            out.append("")
    return tuple(out)


__all__ = ["ARCH_HELP", "NETWORKS", "PRETRAINED_HELP", "SplitNetwork", "TIMM_PREFIX", "TORCHVISION_NETWORKS",
           "UnsplittableNetwork", "WeightsNotFound", "build_network", "network_problem", "parse_pretrained"]
