"""CIFAR-10/100 from the standard python format (``cifar-10-batches-py`` / ``cifar-100-python``),
read offline, held whole on the training device as uint8; random crop with 4-pixel zero padding,
horizontal flip and normalisation run on that device, batch by batch. The permutation of epoch e
comes from (seed, epoch), the augmentation of its batch b from (seed, epoch, rank, b) alone, so an
epoch resumed at any batch continues exactly (``for_epoch(e, start_batch=b)``)."""
from __future__ import annotations

import os
import pickle

import torch

from afd_fast.data.loaders import Loaders, calibration_indices

# Per-channel mean and std of each data set's training images, by its number of classes.
NORMALISATION = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def find_cifar(root: str) -> str | None:
    """The CIFAR python folder at or directly under root, or None."""
    for path in (root, os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-100-python")):
        if os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isfile(os.path.join(path, "train")):
            return path
    return None


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file {path!r} is missing")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _images(batch: dict, path: str) -> torch.Tensor:
    data = batch.get(b"data")
    if data is None or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path!r} is not a CIFAR python batch (expected b'data' of shape [N, 3072])")
    return torch.from_numpy(data).view(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous()  # NHWC uint8


def load_cifar(folder: str):
    """(train_images, train_labels, test_images, test_labels, class_names); images NHWC uint8."""
    if os.path.isfile(os.path.join(folder, "data_batch_1")):  # CIFAR-10
        names = [f"data_batch_{i}" for i in range(1, 6)]
        batches = [_unpickle(os.path.join(folder, n)) for n in names]
        test = _unpickle(os.path.join(folder, "test_batch"))
        meta, label_key, names_key = _unpickle(os.path.join(folder, "batches.meta")), b"labels", b"label_names"
        train_x = torch.cat([_images(b, os.path.join(folder, n)) for b, n in zip(batches, names)])
        train_y = torch.tensor([y for b in batches for y in b[label_key]])
    else:  # CIFAR-100
        train = _unpickle(os.path.join(folder, "train"))
        test = _unpickle(os.path.join(folder, "test"))
        meta, label_key, names_key = _unpickle(os.path.join(folder, "meta")), b"fine_labels", b"fine_label_names"
        train_x, train_y = _images(train, os.path.join(folder, "train")), torch.tensor(train[label_key])
    test_x, test_y = _images(test, folder), torch.tensor(test[label_key])
    classes = [n.decode() for n in meta[names_key]]
    for y, what in ((train_y, "train"), (test_y, "test")):
        if y.numel() and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"CIFAR {what} labels in {folder!r} fall outside the {len(classes)} classes")
    return train_x, train_y, test_x, test_y, classes


class CifarLoader:
    """Batches ``(images [B, 3, 32, 32] channels-last float, labels [B])`` from device-resident uint8."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1, num_classes: int = 10):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.seed, self.rank, self.world = seed, rank, world_size
        mean, std = NORMALISATION[num_classes]
        self.mean = torch.tensor(mean, device=device) * 255
        self.std = torch.tensor(std, device=device) * 255
        self.epoch, self.start_batch = 0, 0
        n = len(self.labels)
        # training: equal full batches on every process; evaluation: every image once
        self.indices_per_rank = n // world_size if train else len(range(rank, n, world_size))

    def __len__(self) -> int:
        if self.train:
            return self.indices_per_rank // self.batch_size
        return -(-self.indices_per_rank // self.batch_size)

    def for_epoch(self, epoch: int, start_batch: int = 0, state=None) -> "CifarLoader":
        """The batches of epoch ``epoch`` from batch ``start_batch`` on (``state``: unused, the
        position alone determines the rest)."""
        self.epoch, self.start_batch = epoch, start_batch
        return self

    def _augmentation_seed(self, batch: int) -> int:
        return (((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1_000_033 + batch) % 2**63

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # same on every process
            order = torch.randperm(n, generator=g)[self.rank * self.indices_per_rank:(self.rank + 1) * self.indices_per_rank]
            order = order.to(self.device)
            aug = torch.Generator(device=self.device)
        else:
            order = torch.arange(self.rank, n, self.world, device=self.device)
        first = self.start_batch if self.train else 0
        for batch in range(first, len(self)):
            idx = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = augment(x, aug.manual_seed(self._augmentation_seed(batch)))
            yield self.normalise(x), self.labels[idx]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 images -> normalised float, an NCHW view in channels-last memory."""
        return ((x.float() - self.mean) / self.std).permute(0, 3, 1, 2)


class CifarLoaders(Loaders):
    """CIFAR held on the training device (see the module docstring)."""

    backend = "cifar"

    def __init__(self, folder: str, batch_size: int, seed: int, rank: int, world: int, device: torch.device,
                 val_split: str = "val"):
        train_x, train_y, test_x, test_y, classes = load_cifar(folder)
        self.train = CifarLoader(train_x, train_y, batch_size, True, device, seed, rank, world, len(classes))
        if val_split == "train":  # the training images as the test images are read (evaluate --split train)
            test_x, test_y = train_x, train_y
        val = CifarLoader(test_x, test_y, batch_size, False, device, seed, rank, world, len(classes))
        self.normalisation = NORMALISATION[len(classes)]
        super().__init__(val, len(self.train), len(train_y), classes)

    def train_epoch(self, epoch: int, start_batch: int = 0, state=None) -> CifarLoader:
        return self.train.for_epoch(epoch, start_batch, state)

    def calibration_batches(self, n: int):
        train = self.train
        indices = torch.tensor(calibration_indices(len(train.labels), n, train.batch_size, train.seed, train.rank,
                                                   train.world), dtype=torch.long, device=train.device)
        for idx in indices.split(train.batch_size):
            yield train.normalise(train.images[idx]), train.labels[idx]  # as the test images: no crop, no flip


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image and random horizontal flip, NHWC uint8, on x's device."""
    b, h, w, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device, generator=generator)
    flip = torch.rand(b, 1, 1, device=x.device, generator=generator) < 0.5
    rows = oy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cols = ox + torch.where(flip, w - 1 - cols, cols)
    return padded[torch.arange(b, device=x.device).view(b, 1, 1), rows, cols]
