"""Data for the trainer: ImageNet-layout folders (``train/<class>/``, ``val/<class>/``) and the
embedded synthetic default. This is the torchvision ``DataLoader`` path; the DALI pipelines of the
data issue plug in behind ``build_loaders``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from afd_fast.data.synthetic import synthetic_image_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    num_classes: int
    classes: list[str]


def check_image_folder(root: str) -> None:
    """A clear error, before any work, for a path that is not an ImageNet-layout folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{root!r} has no {split}/ folder: expected {split}/<class>/<image> (ImageNet layout)")
        classes = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
        if not classes:
            raise FileNotFoundError(f"{path!r} has no class folders: expected {split}/<class>/<image>")


def build_loaders(root: str, image_size: int, batch_size: int, workers: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> Loaders:
    check_image_folder(root)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(int(round(image_size / 0.875))), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), normalize])
    train_set = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
    val_set = datasets.ImageFolder(os.path.join(root, "val"), val_tf)
    if val_set.classes != train_set.classes:
        raise ValueError(f"train/ and val/ of {root!r} have different class folders")
    # The sampler's permutation depends on (seed, epoch) only, which makes resuming exact.
    train_sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    # Validation: every image exactly once across processes (a DistributedSampler would pad).
    val_shard = Subset(val_set, range(rank, len(val_set), world_size))
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    train = DataLoader(train_set, batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(val_shard, batch_size, shuffle=False, **common)
    return Loaders(train, val, train_sampler, len(train_set.classes), train_set.classes)


__all__ = ["Loaders", "build_loaders", "check_image_folder", "synthetic_image_folder"]
