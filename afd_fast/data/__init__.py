"""Data for the trainer: ImageNet-layout folders (``train/<class>/``, ``val/<class>/``) through
NVIDIA DALI when it is installed (GPU decode on a GPU, CPU-only pipelines without one), else a
torchvision ``DataLoader`` with the same augmentations; and the embedded synthetic default."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from afd_fast.data.cifar import CifarLoader, find_cifar, load_cifar
from afd_fast.data.dali import DALILoader, dali_available
from afd_fast.data.folder import BadDataError, FileList, list_image_folder, read_file_list
from afd_fast.data.synthetic import RandomBatches, synthetic_image_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torch")


@dataclass
class Loaders:
    """``train_epoch(e)``: this process's batches of epoch e (the same whether or not the run was
    resumed); ``val``: this process's share of the validation set, every image once overall."""

    train_epoch: Callable[[int], Iterable]
    val: Iterable
    steps_per_epoch: int
    train_size: int
    classes: list[str]
    backend: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_loaders(root: str, image_size: int, batch_size: int, workers: int, seed: int, rank: int = 0,
                  world_size: int = 1, backend: str = "auto", device: torch.device = torch.device("cpu"),
                  skip_bad: bool = False, hw_decoder_load: float = 0.65, prefetch: int = 2,
                  dtype: torch.dtype = torch.float32, verify: bool = False) -> Loaders:
    """Loaders for an ImageNet-layout folder (``train/<class>/``, ``val/<class>/``), for the file
    lists ``train.txt`` and ``val.txt`` in root when it has both, or for CIFAR's python format.
    ``hw_decoder_load``, ``prefetch`` and ``dtype`` (float32, float16: DALI's own output type) apply
    to DALI; ``workers`` is DALI's thread count or the DataLoader's process count (and the decode
    check's with ``verify``, see :func:`list_image_folder`)."""
    if not os.path.isdir(root):
        raise BadDataError(f"data folder {root!r} does not exist")
    cifar = find_cifar(root)
    if cifar is not None:
        return _cifar_loaders(cifar, batch_size, seed, rank, world_size, device)
    device_id = None
    if device.type == "cuda":  # a plain "cuda" device has no index: the current one
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    checks = dict(skip_bad=skip_bad, verify=verify, workers=max(workers, 1))
    if all(os.path.isfile(os.path.join(root, f"{split}.txt")) for split in ("train", "val")):
        train_list = read_file_list(os.path.join(root, "train.txt"), **checks)
        val_list = read_file_list(os.path.join(root, "val.txt"), **checks)
        classes = max(train_list.classes, val_list.classes, key=len)
        train_list.classes = val_list.classes = classes
    else:
        train_list = list_image_folder(os.path.join(root, "train"), **checks)
        val_list = list_image_folder(os.path.join(root, "val"), **checks)
    if val_list.classes != train_list.classes:
        raise BadDataError(f"train/ and val/ of {root!r} have different class folders")
    skipped = len(train_list.skipped) + len(val_list.skipped)
    if skipped and rank == 0:
        print(f"skipped {skipped} unreadable or non-image files under {root!r}", file=sys.stderr)
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if backend == "torch" and rank == 0:
            print("NVIDIA DALI is not installed: using the torchvision DataLoader "
                  "(pip install nvidia-dali-cuda130 is faster)", file=sys.stderr)
    if backend == "dali":
        options = dict(threads=max(workers, 1), device_id=device_id, prefetch=prefetch,
                       hw_decoder_load=hw_decoder_load, dtype=dtype)
        return _dali_loaders(train_list, val_list, image_size, batch_size, seed, rank, world_size, options)
    return _torch_loaders(train_list, val_list, image_size, batch_size, workers, seed, rank, world_size)


def _dali_loaders(train_list: FileList, val_list: FileList, image_size, batch_size, seed, rank, world,
                  options: dict) -> Loaders:
    def train_epoch(epoch: int):
        return DALILoader(train_list, image_size, batch_size, train=True, seed=seed, epoch=epoch, shard_id=rank,
                          num_shards=world, **options)

    val = DALILoader(val_list, image_size, batch_size, train=False, shard_id=rank, num_shards=world, **options)
    # every shard runs the same number of steps: the smallest shard's count of full batches
    steps = (len(train_list.files) // world) // batch_size
    return Loaders(train_epoch, val, steps, len(train_list.files), train_list.classes, "dali")


def _cifar_loaders(folder: str, batch_size, seed, rank, world, device) -> Loaders:
    train_x, train_y, test_x, test_y, classes = load_cifar(folder)
    train = CifarLoader(train_x, train_y, batch_size, True, device, seed, rank, world)
    val = CifarLoader(test_x, test_y, batch_size, False, device, seed, rank, world)
    return Loaders(train.for_epoch, val, len(train), len(train_y), classes, "cifar")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, file_list: FileList, transform):
        self.file_list, self.transform = file_list, transform

    def __len__(self):
        return len(self.file_list.files)

    def __getitem__(self, i):
        path = self.file_list.files[i]
        try:
            image = datasets.folder.default_loader(path)
        except OSError as e:  # PIL: truncated or undecodable
            raise BadDataError(f"{path!r} cannot be decoded ({e}); leave such files out with "
                               "--verify-images --skip-bad-files") from None
        return self.transform(image), self.file_list.labels[i]


def _torch_loaders(train_list: FileList, val_list: FileList, image_size, batch_size, workers, seed, rank,
                   world) -> Loaders:
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_set = _ListDataset(train_list, transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    val_set = _ListDataset(val_list, transforms.Compose([
        transforms.Resize(int(round(image_size / 0.875))), transforms.CenterCrop(image_size), transforms.ToTensor(),
        normalize]))
    # The sampler's permutation depends on (seed, epoch) only, which makes resuming exact.
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=seed, drop_last=True)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    train = DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, **common)
    # Validation: every image exactly once across processes (a DistributedSampler would pad).
    val = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size, shuffle=False, **common)

    def train_epoch(epoch: int):
        sampler.set_epoch(epoch)
        return train

    return Loaders(train_epoch, val, len(train), len(train_set), train_list.classes, "torch")


__all__ = ["BACKENDS", "BadDataError", "Loaders", "RandomBatches", "build_loaders", "list_image_folder",
           "synthetic_image_folder"]
