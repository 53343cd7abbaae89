"""Data for the trainer, one module per source: ImageNet-layout folders and file lists
(:mod:`~afd_fast.data.folder`) read by NVIDIA DALI when it is installed (:mod:`~afd_fast.data.dali`:
GPU decode on a GPU, CPU-only pipelines without one), else by a torchvision ``DataLoader`` with the
same augmentations (:mod:`~afd_fast.data.torchvision_loader`); CIFAR held on the device
(:mod:`~afd_fast.data.cifar`); and the embedded synthetic default (:mod:`~afd_fast.data.synthetic`).
:func:`build_loaders` picks the backend and returns its :class:`Loaders`."""
from __future__ import annotations

import os
import sys

import torch

from afd_fast.data.augment import Preparation
from afd_fast.data.cifar import CifarLoaders, find_cifar
from afd_fast.data.dali import DALILoaders, dali_available
from afd_fast.data.folder import BadDataError, list_image_folder, read_file_list
from afd_fast.data.loaders import Loaders
from afd_fast.data.synthetic import synthetic_image_folder
from afd_fast.data.torchvision_loader import TorchLoaders

BACKENDS = ("auto", "dali", "torch")


def build_loaders(root: str, image_size: int | Preparation, batch_size: int, workers: int, seed: int, rank: int = 0,
                  world_size: int = 1, backend: str = "auto", device: torch.device = torch.device("cpu"),
                  skip_bad: bool = False, hw_decoder_load: float = 0.65, prefetch: int = 2,
                  dtype: torch.dtype = torch.float32, verify: bool = False, val_split: str = "val") -> Loaders:
    """Loaders for an ImageNet-layout folder (``train/<class>/``, ``val/<class>/``), for the file
    lists ``train.txt`` and ``val.txt`` in root when it has both, or for CIFAR's python format.
    ``hw_decoder_load``, ``prefetch`` and ``dtype`` (float32, float16: DALI's own output type) apply
    to DALI; ``workers`` is DALI's thread count or the DataLoader's process count (and the decode
    check's with ``verify``, see :func:`list_image_folder`). ``val_split="train"``: ``val`` holds the
    training images instead, each once, prepared as validation images (``python -m afd_fast.evaluate --split train``).
    ``image_size``: one size (the training and validation crops, the validation resize the crop / 0.875)
    or a :class:`Preparation` (sizes, --auto-augment, --random-erasing). CIFAR keeps its 32 px and
    refuses the augmentations."""
    prep = image_size if isinstance(image_size, Preparation) else Preparation.of(image_size)
    if val_split not in ("train", "val"):
        raise ValueError(f"val_split must be 'train' or 'val', got {val_split!r}")
    if not os.path.isdir(root):
        raise BadDataError(f"data folder {root!r} does not exist")
    cifar = find_cifar(root)
    if cifar is not None:
        prep.refuse_augmentation("CIFAR loader")
        return CifarLoaders(cifar, batch_size, seed, rank, world_size, device, val_split)
    device_id = None
    if device.type == "cuda":  # a plain "cuda" device has no index: the current one
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    checks = dict(skip_bad=skip_bad, verify=verify, workers=max(workers, 1))
    if all(os.path.isfile(os.path.join(root, f"{split}.txt")) for split in ("train", "val")):
        train_list = read_file_list(os.path.join(root, "train.txt"), **checks)
        val_list = read_file_list(os.path.join(root, f"{val_split}.txt"), **checks)
        classes = max(train_list.classes, val_list.classes, key=len)
        train_list.classes = val_list.classes = classes
    else:
        train_list = list_image_folder(os.path.join(root, "train"), **checks)
        val_list = list_image_folder(os.path.join(root, val_split), **checks)
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
        return DALILoaders(train_list, val_list, prep, batch_size, seed, rank, world_size, options)
    return TorchLoaders(train_list, val_list, prep, batch_size, workers, seed, rank, world_size)


__all__ = ["BACKENDS", "BadDataError", "Loaders", "Preparation", "build_loaders", "list_image_folder",
           "synthetic_image_folder"]
